//! The `recvmmsg`/`sendmmsg` backend: batched receive and send on plain syscalls, for kernels or
//! sandboxes without io_uring. One receive and one send syscall per batch, never per packet.

use super::socket::{BUF_LEN, CTRL_WORDS, RxQueueDrops, build_pktinfo, parse_cmsgs, send_batch, sockaddr_to_std};
use super::{Datagram, Handler};
use socket2::Socket;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Datagrams taken per receive syscall.
pub const BATCH: usize = 64;

/// Buffers and headers for one socket, allocated once and reused for every batch.
struct MmsgBatch {
    bufs: Box<[[u8; BUF_LEN]]>,
    addrs: Box<[libc::sockaddr_storage]>,
    ctrl: Box<[[u64; CTRL_WORDS]]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    // The send side points into `bufs` and `addrs`, with its own cmsg space for pktinfo.
    send_iovs: Box<[libc::iovec]>,
    send_ctrl: Box<[[u64; CTRL_WORDS]]>,
    send_hdrs: Box<[libc::mmsghdr]>,
    rx_ns: Box<[i64]>,
    /// Whether replies need a pktinfo cmsg (socket bound to a wildcard address).
    set_source: bool,
    rx_drops: RxQueueDrops,
}

// SAFETY: the raw pointers inside the iovecs and msghdrs only ever point into this struct's own
// boxed buffers, which move with it; nothing is shared with another thread.
unsafe impl Send for MmsgBatch {}

impl MmsgBatch {
    fn new(set_source: bool) -> Box<MmsgBatch> {
        // SAFETY (for every `zeroed` below): iovec, mmsghdr and sockaddr_storage are plain C
        // structs for which all-zero bytes are a valid value (null pointers, zero lengths).
        let zero_iov = unsafe { zeroed::<libc::iovec>() };
        let zero_hdr = unsafe { zeroed::<libc::mmsghdr>() };
        let zero_addr = unsafe { zeroed::<libc::sockaddr_storage>() };
        let mut b = Box::new(MmsgBatch {
            bufs: vec![[0u8; BUF_LEN]; BATCH].into_boxed_slice(),
            addrs: vec![zero_addr; BATCH].into_boxed_slice(),
            ctrl: vec![[0u64; CTRL_WORDS]; BATCH].into_boxed_slice(),
            iovs: vec![zero_iov; BATCH].into_boxed_slice(),
            hdrs: vec![zero_hdr; BATCH].into_boxed_slice(),
            send_iovs: vec![zero_iov; BATCH].into_boxed_slice(),
            send_ctrl: vec![[0u64; CTRL_WORDS]; BATCH].into_boxed_slice(),
            send_hdrs: vec![zero_hdr; BATCH].into_boxed_slice(),
            rx_ns: vec![0i64; BATCH].into_boxed_slice(),
            set_source,
            rx_drops: RxQueueDrops::default(),
        });
        for i in 0..BATCH {
            b.iovs[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: BUF_LEN,
            };
            let iov_ptr: *mut libc::iovec = &mut b.iovs[i];
            let addr_ptr: *mut libc::sockaddr_storage = &mut b.addrs[i];
            let ctrl_ptr = b.ctrl[i].as_mut_ptr();
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_iov = iov_ptr;
            h.msg_iovlen = 1;
            h.msg_name = addr_ptr.cast();
            h.msg_control = ctrl_ptr.cast();
        }
        b.reset_recv(BATCH);
        b
    }

    /// The kernel rewrites name/control lengths on receive; restore them for the next call.
    fn reset_recv(&mut self, n: usize) {
        for h in &mut self.hdrs[..n] {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_controllen = CTRL_WORDS * 8;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
    }

    /// Hands `n` received datagrams to the handler, then sends every reply in one syscall.
    fn process<H: Handler>(&mut self, fd: libc::c_int, n: usize, handler: &mut H) {
        handler.begin_batch();
        let mut replies = 0usize;
        let mut rx_dropped = 0u64;
        for i in 0..n {
            let hdr = &self.hdrs[i];
            let len = hdr.msg_len as usize;
            let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > BUF_LEN;
            // SAFETY: the kernel just filled this msghdr, whose control buffer is ours.
            let info = unsafe { parse_cmsgs(&hdr.msg_hdr) };
            rx_dropped += self.rx_drops.new_drops(info.rx_queue_drops);
            let Some(peer) = sockaddr_to_std(&self.addrs[i], hdr.msg_hdr.msg_namelen) else {
                continue;
            };
            let rx = info.rx_realtime_ns;
            let reply_len = handler.handle(Datagram {
                buf: &mut self.bufs[i],
                len: len.min(BUF_LEN),
                truncated,
                peer,
                rx_realtime_ns: rx,
                destination: info.destination,
            });
            if reply_len == 0 {
                continue;
            }
            let r = replies;
            replies += 1;
            self.rx_ns[r] = rx.unwrap_or(0);
            self.send_iovs[r] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: reply_len,
            };
            let ctrl_len = if self.set_source {
                build_pktinfo(&mut self.send_ctrl[r], info.local)
            } else {
                0
            };
            let iov_ptr: *mut libc::iovec = &mut self.send_iovs[r];
            let sh = &mut self.send_hdrs[r].msg_hdr;
            sh.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            sh.msg_namelen = self.hdrs[i].msg_hdr.msg_namelen;
            sh.msg_iov = iov_ptr;
            sh.msg_iovlen = 1;
            sh.msg_control = if ctrl_len > 0 {
                self.send_ctrl[r].as_mut_ptr().cast()
            } else {
                std::ptr::null_mut()
            };
            sh.msg_controllen = ctrl_len;
            sh.msg_flags = 0;
        }
        if replies > 0 {
            // T3 once for the batch, as late as possible: after every reply is built.
            let tx = handler.transmit_stamp();
            for r in 0..replies {
                let iov = self.send_iovs[r];
                // SAFETY: iov points into one of our receive buffers with a length the handler
                // returned, which never exceeds the buffer.
                let reply = unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast::<u8>(), iov.iov_len) };
                handler.stamp(reply, self.rx_ns[r], &tx);
            }
            send_batch(fd, &mut self.send_hdrs[..replies], handler);
        }
        if rx_dropped > 0 {
            handler.rx_queue_dropped(rx_dropped);
        }
        handler.end_batch(n, replies);
    }
}

/// Serves `sockets` until `stop` is set. With one socket the receive blocks (the socket's read
/// timeout bounds how long a stop takes); with several, `poll` waits for any of them.
pub fn run<H: Handler>(sockets: &[Socket], handler: &mut H, stop: &AtomicBool) -> io::Result<()> {
    let mut batches: Vec<Box<MmsgBatch>> = sockets
        .iter()
        .map(|s| MmsgBatch::new(super::needs_pktinfo(s)))
        .collect();
    let fds: Vec<libc::c_int> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        if fds.len() == 1 {
            recv_and_process(fds[0], &mut batches[0], libc::MSG_WAITFORONE, handler)?;
            continue;
        }
        // SAFETY: pollfds is a live, correctly sized array of pollfd.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 100) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            handler.idle();
            continue;
        }
        for (k, p) in pollfds.iter_mut().enumerate() {
            if p.revents & libc::POLLIN != 0 {
                recv_and_process(fds[k], &mut batches[k], libc::MSG_DONTWAIT, handler)?;
            }
            p.revents = 0;
        }
    }
    Ok(())
}

fn recv_and_process<H: Handler>(
    fd: libc::c_int,
    b: &mut MmsgBatch,
    flags: libc::c_int,
    handler: &mut H,
) -> io::Result<()> {
    // SAFETY: hdrs holds BATCH initialised mmsghdrs pointing at buffers owned by `b`.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            b.hdrs.as_mut_ptr(),
            BATCH as libc::c_uint,
            flags,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {
                handler.idle();
                Ok(())
            }
            // ICMP errors from earlier sends surface here on some kernels; not our problem.
            Some(libc::ECONNREFUSED) | Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => Ok(()),
            _ => Err(e),
        };
    }
    let n = n as usize;
    b.process(fd, n, handler);
    b.reset_recv(n);
    Ok(())
}
