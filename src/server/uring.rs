//! The io_uring backend: multishot `RecvMsgMulti` over a provided-buffer ring per worker, replies
//! built in place in the ring's buffers and sent with one `sendmmsg` per batch, buffers returned
//! to the ring once per batch. One `io_uring_enter` wait and one `sendmmsg` per batch.
//!
//! Replies go out either with one `sendmmsg` per batch (`io = "uring"`: the send is synchronous,
//! so buffers go straight back to the ring) or as one io_uring `SendMsg` per reply, submitted
//! with the next wait (`io = "uring-send"`: each buffer goes back when its send completes).
//! `benches/compare.sh` measures both; README says which won here.

use super::socket::{
    BUF_LEN, CTRL_WORDS, RECV_CONTROL_LEN, RxQueueDrops, SendError, build_pktinfo, parse_cmsgs, send_batch,
    sockaddr_to_std,
};
use super::{Datagram, Handler};
use io_uring::{IoUring, Probe, cqueue, opcode, types};
use socket2::Socket;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Provided buffers per worker (a power of two). Multishot receive stops when the ring runs dry,
/// so keep far more than one batch in flight.
const RING_ENTRIES: u16 = 2048;
/// Completions handled per batch (and per `sendmmsg`).
const BATCH: usize = 64;
/// Marks a send completion's user_data (the low 16 bits are the buffer id).
const SEND_TAG: u64 = 1 << 63;
const BGID: u16 = 0;
/// Room for a sockaddr_in6 (28 bytes; v4 fits too), rounded up so that the control data that
/// follows it in the buffer is 8-byte aligned, as `cmsghdr` requires.
const NAME_LEN: usize = (size_of::<libc::sockaddr_in6>() + 7) & !7;
const _: () = assert!((HEADER_LEN + NAME_LEN).is_multiple_of(8));
/// Room for SCM_TIMESTAMPNS + IP(V6)_PKTINFO + SO_RXQ_OVFL (a cmsg that does not fit is cut
/// off, and the kernel flags the datagram MSG_CTRUNC).
const CONTROL_LEN: usize = 128;
const _: () = assert!(RECV_CONTROL_LEN <= CONTROL_LEN && CONTROL_LEN.is_multiple_of(8));
/// Marks the cancel-everything request sent at shutdown.
const CANCEL_TAG: u64 = 1 << 62;
/// io_uring_recvmsg_out header, then name, control and payload (see `RecvMsgOut`).
const HEADER_LEN: usize = 16;
const PAYLOAD_OFFSET: usize = HEADER_LEN + NAME_LEN + CONTROL_LEN;
const BUF_SIZE: usize = (PAYLOAD_OFFSET + BUF_LEN + 63) & !63;

/// Why io_uring cannot be used; the worker then runs the mmsg backend.
#[derive(Debug)]
pub struct Unsupported(pub String);

/// Checks, once at start, that this kernel and sandbox allow everything the backend needs:
/// io_uring itself (seccomp and `kernel.io_uring_disabled` refuse it with EPERM/ENOSYS),
/// `RECVMSG` (multishot needs 6.0) and provided-buffer rings (5.19).
pub fn probe() -> Result<(), Unsupported> {
    let ring = build_ring(8).map_err(|e| Unsupported(format!("io_uring_setup: {e}")))?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| Unsupported(format!("probe: {e}")))?;
    if !p.is_supported(opcode::RecvMsg::CODE) {
        return Err(Unsupported("the kernel lacks IORING_OP_RECVMSG".into()));
    }
    let br = BufRing::new(8).map_err(|e| Unsupported(format!("buffer ring: {e}")))?;
    let registered = br
        .register(&ring)
        .map_err(|e| Unsupported(format!("register_buf_ring (needs Linux 5.19): {e}")));
    // SAFETY: the ring is closed before the buffer ring it registered is freed (no request was
    // ever submitted, but the registration holds the memory until then).
    drop(ring);
    drop(br);
    registered
}

fn build_ring(entries: u32) -> io::Result<IoUring> {
    // The fastest set-up measured here; older kernels refuse the flags, so fall back to defaults.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(entries)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
        .or_else(|_| IoUring::new(entries))
}

/// The provided-buffer ring and the buffers it hands out.
struct BufRing {
    ring: *mut types::BufRingEntry,
    ring_layout: Layout,
    bufs: *mut u8,
    bufs_layout: Layout,
    entries: u16,
    tail: u16,
}

// SAFETY: the pointers are owned allocations used only by the thread that owns the BufRing.
unsafe impl Send for BufRing {}

impl BufRing {
    fn new(entries: u16) -> io::Result<BufRing> {
        let ring_layout = Layout::from_size_align(entries as usize * size_of::<types::BufRingEntry>(), 4096)
            .map_err(io::Error::other)?;
        let bufs_layout = Layout::from_size_align(entries as usize * BUF_SIZE, 4096).map_err(io::Error::other)?;
        // SAFETY: both layouts have non-zero size; the memory is zeroed, which is a valid state
        // for ring entries, and freed in Drop with the same layouts.
        let (ring, bufs): (*mut types::BufRingEntry, *mut u8) =
            unsafe { (alloc_zeroed(ring_layout).cast(), alloc_zeroed(bufs_layout)) };
        if ring.is_null() || bufs.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "buffer ring allocation"));
        }
        let mut br = BufRing {
            ring,
            ring_layout,
            bufs,
            bufs_layout,
            entries,
            tail: 0,
        };
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    /// A ring that owns nothing (what is left in a `Worker` whose buffers were leaked).
    fn empty() -> BufRing {
        BufRing {
            ring: std::ptr::null_mut(),
            ring_layout: Layout::new::<u8>(),
            bufs: std::ptr::null_mut(),
            bufs_layout: Layout::new::<u8>(),
            entries: 0,
            tail: 0,
        }
    }

    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the ring memory is page aligned, `entries` long, and lives as long as `self`,
        // which the caller keeps alive until the io_uring is closed (`Worker`'s field order).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(self.ring as u64, self.entries, BGID, 0)
        }
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < entries (the kernel only returns ids we provided), so the offset is in bounds.
        unsafe { self.bufs.add(bid as usize * BUF_SIZE) }
    }

    /// Puts a buffer back (visible to the kernel after `publish`).
    fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: idx < entries; we are the only writer of entries past the published tail.
        let e = unsafe { &mut *self.ring.add(idx) };
        e.set_addr(self.buf(bid) as u64);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's `resv` (io_uring ABI), a u16 the kernel reads
        // with acquire semantics; a release store makes the entries written before it visible.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.ring.is_null() {
            return;
        }
        // SAFETY: allocated in `new` with exactly these layouts.
        unsafe {
            dealloc(self.ring.cast(), self.ring_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}

/// Per-socket state: the recvmsg template the kernel reads for every multishot completion, and
/// the send side for `sendmmsg`.
struct SocketState {
    fd: libc::c_int,
    template: Box<libc::msghdr>,
    set_source: bool,
    armed: bool,
    send_hdrs: Box<[libc::mmsghdr]>,
    send_iovs: Box<[libc::iovec]>,
    send_ctrl: Box<[[u64; CTRL_WORDS]]>,
    rx_ns: Box<[i64]>,
    bids: Box<[u16]>,
    pending: usize,
    rx_drops: RxQueueDrops,
}

/// The msghdr of a reply in flight as an io_uring send; one per buffer id, because it must live
/// until the send completes, past the batch that built it.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    ctrl: [u64; CTRL_WORDS],
}

impl SocketState {
    fn new(sock: &Socket) -> SocketState {
        // SAFETY (all `zeroed` here): plain C structs, all-zero is valid (null pointers, zero lengths).
        let mut template: Box<libc::msghdr> = Box::new(unsafe { zeroed() });
        template.msg_namelen = NAME_LEN as libc::socklen_t;
        template.msg_controllen = CONTROL_LEN;
        SocketState {
            fd: sock.as_raw_fd(),
            template,
            set_source: super::needs_pktinfo(sock),
            armed: false,
            send_hdrs: vec![unsafe { zeroed::<libc::mmsghdr>() }; BATCH].into_boxed_slice(),
            send_iovs: vec![unsafe { zeroed::<libc::iovec>() }; BATCH].into_boxed_slice(),
            send_ctrl: vec![[0u64; CTRL_WORDS]; BATCH].into_boxed_slice(),
            rx_ns: vec![0i64; BATCH].into_boxed_slice(),
            bids: vec![0u16; BATCH].into_boxed_slice(),
            pending: 0,
            rx_drops: RxQueueDrops::default(),
        }
    }
}

/// One completion, copied out of the CQ so the ring can be used while it is processed.
#[derive(Clone, Copy, Default)]
struct Completion {
    user_data: u64,
    result: i32,
    flags: u32,
}

/// The io_uring and everything the kernel reads or writes on its behalf.
///
/// SAFETY: the fields drop in declaration order, and this order is what keeps the kernel from
/// writing into freed memory: `Drop` first cancels every request and waits for them to end,
/// then `ring` is closed, and only then are the memory areas that its requests pointed at freed:
/// the provided buffers (`bufring`), the msghdrs of io_uring sends (`slots`), the recvmsg
/// templates (`socks`). This holds on every way out of `run`, the fallback to mmsg included.
struct Worker {
    ring: IoUring,
    bufring: BufRing,
    slots: Box<[SendSlot]>,
    socks: Vec<SocketState>,
    /// io_uring sends submitted and not yet completed.
    sends_in_flight: usize,
}

impl Worker {
    fn new(sockets: &[Socket]) -> Result<Worker, Unsupported> {
        let ring = build_ring(256).map_err(|e| Unsupported(format!("io_uring_setup: {e}")))?;
        // Saves a file-table lookup on every io_uring_enter; optional.
        let _ = ring.submitter().register_ring_fd();
        let bufring = BufRing::new(RING_ENTRIES).map_err(|e| Unsupported(e.to_string()))?;
        let w = Worker {
            ring,
            bufring,
            slots: (0..RING_ENTRIES)
                // SAFETY: plain C structs; all-zero is a valid (empty) value.
                .map(|_| SendSlot {
                    hdr: unsafe { zeroed() },
                    iov: unsafe { zeroed() },
                    ctrl: [0; CTRL_WORDS],
                })
                .collect(),
            socks: sockets.iter().map(SocketState::new).collect(),
            sends_in_flight: 0,
        };
        w.bufring
            .register(&w.ring)
            .map_err(|e| Unsupported(format!("register_buf_ring: {e}")))?;
        Ok(w)
    }

    /// Cancels every request and waits, bounded, until none is left: no armed multishot
    /// receive, no send in flight. False if some were still running at the deadline.
    fn quiesce(&mut self) -> bool {
        let busy = |w: &Worker| w.sends_in_flight > 0 || w.socks.iter().any(|s| s.armed);
        if !busy(self) {
            return true;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request points at no memory.
        if unsafe { self.ring.submission().push(&cancel) }.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&cancel) };
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        let timeout = types::Timespec::from(Duration::from_millis(50));
        while busy(self) && Instant::now() < deadline {
            let args = types::SubmitArgs::new().timespec(&timeout);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            for cqe in self.ring.completion() {
                let ud = cqe.user_data();
                if ud & SEND_TAG != 0 {
                    self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
                } else if ud & CANCEL_TAG == 0
                    && !cqueue::more(cqe.flags())
                    && let Some(s) = self.socks.get_mut(ud as usize)
                {
                    s.armed = false;
                }
            }
        }
        !busy(self)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.quiesce() {
            // The kernel may still write into these: leak them rather than free them under it.
            log::warn!("io_uring requests did not end at shutdown; leaking their buffers");
            let bufring = std::mem::replace(&mut self.bufring, BufRing::empty());
            std::mem::forget(bufring);
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(std::mem::take(&mut self.socks));
        }
    }
}

/// Queues a multishot receive for every socket that has none.
fn arm(ring: &mut IoUring, socks: &mut [SocketState]) {
    for (i, s) in socks.iter_mut().enumerate() {
        if !s.armed {
            let sqe = opcode::RecvMsgMulti::new(types::Fd(s.fd), &*s.template as *const libc::msghdr, BGID)
                .build()
                .user_data(i as u64);
            // SAFETY: the msghdr template is boxed and lives in the `Worker` (with the buffer
            // group registered) until the ring is closed.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break;
            }
            s.armed = true;
        }
    }
}

/// Serves `sockets` until `stop`; `Err(Unsupported)` if the kernel refuses multishot receive
/// before any datagram was served (the caller then falls back to mmsg).
pub fn run<H: Handler>(
    sockets: &[Socket],
    handler: &mut H,
    stop: &AtomicBool,
    uring_send: bool,
) -> Result<(), Unsupported> {
    let mut w = Worker::new(sockets)?;
    let Worker {
        ring,
        bufring,
        slots,
        socks,
        sends_in_flight,
    } = &mut w;
    let mut served_any = false;
    let mut completions = [Completion::default(); BATCH];
    let timeout = types::Timespec::from(Duration::from_millis(100));
    let mut returned: Vec<u16> = Vec::with_capacity(BATCH);

    while !stop.load(Ordering::Relaxed) {
        arm(ring, socks);
        let args = types::SubmitArgs::new().timespec(&timeout);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(Unsupported(format!("io_uring_enter: {e}"))),
        }
        let mut got_any = false;
        loop {
            let mut n = 0;
            for cqe in ring.completion().take(BATCH) {
                completions[n] = Completion {
                    user_data: cqe.user_data(),
                    result: cqe.result(),
                    flags: cqe.flags(),
                };
                n += 1;
            }
            if n == 0 {
                break;
            }
            got_any = true;
            handler.begin_batch();
            let mut received = 0;
            let mut rx_dropped = 0u64;
            returned.clear();
            for c in &completions[..n] {
                if c.user_data & SEND_TAG != 0 {
                    // An io_uring send finished: its buffer can take a new datagram.
                    *sends_in_flight = sends_in_flight.saturating_sub(1);
                    bufring.push(c.user_data as u16);
                    if c.result < 0 {
                        handler.send_failed(SendError::from_errno(-c.result), 1);
                    }
                    continue;
                }
                let s = &mut socks[c.user_data as usize];
                if !cqueue::more(c.flags) {
                    s.armed = false;
                }
                if c.result < 0 {
                    if c.result == -libc::EINVAL && !served_any {
                        return Err(Unsupported("multishot recvmsg refused (needs Linux 6.0)".into()));
                    }
                    // -ENOBUFS: the ring ran dry; buffers come back below and it is re-armed.
                    continue;
                }
                let Some(bid) = cqueue::buffer_select(c.flags) else {
                    continue;
                };
                returned.push(bid);
                received += 1;
                served_any = true;
                let base = bufring.buf(bid);
                // SAFETY: the kernel wrote this buffer (BUF_SIZE bytes, ours) and handed it to us
                // with this completion; it is not reused until we push it back below.
                let whole = unsafe { std::slice::from_raw_parts_mut(base, BUF_SIZE) };
                let Ok(out) = types::RecvMsgOut::parse(whole, &s.template) else {
                    continue;
                };
                let truncated = out.is_payload_truncated();
                let len = out.payload_data().len();
                let name_len = out.incoming_name_len().min(NAME_LEN as u32);
                let ctrl = out.control_data();
                // SAFETY: a msghdr that only describes the control bytes the kernel wrote in
                // this buffer, so the CMSG walk stays inside them.
                let info = unsafe {
                    let mut h: libc::msghdr = zeroed();
                    h.msg_control = ctrl.as_ptr().cast_mut().cast();
                    h.msg_controllen = ctrl.len();
                    parse_cmsgs(&h)
                };
                rx_dropped += s.rx_drops.new_drops(info.rx_queue_drops);
                // SAFETY: a sockaddr_storage is larger than NAME_LEN; copy the name bytes in.
                let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
                let name = out.name_data();
                // SAFETY: name has at most NAME_LEN bytes, smaller than sockaddr_storage.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        name.as_ptr(),
                        (&mut storage as *mut libc::sockaddr_storage).cast(),
                        name.len(),
                    );
                }
                let Some(peer) = sockaddr_to_std(&storage, name_len) else {
                    continue;
                };
                // SAFETY: the payload region starts at PAYLOAD_OFFSET and holds BUF_LEN bytes
                // inside this buffer; `out` (a shared view) is not used after this point.
                let payload = unsafe { std::slice::from_raw_parts_mut(base.add(PAYLOAD_OFFSET), BUF_LEN) };
                let reply_len = handler.handle(Datagram {
                    buf: payload,
                    len: len.min(BUF_LEN),
                    truncated,
                    peer,
                    rx_realtime_ns: info.rx_realtime_ns,
                    destination: info.destination,
                });
                if reply_len == 0 {
                    continue;
                }
                let r = s.pending;
                s.pending += 1;
                s.bids[r] = bid;
                if uring_send {
                    // Held until its send completes (pushed last just above).
                    returned.pop();
                }
                s.rx_ns[r] = info.rx_realtime_ns.unwrap_or(0);
                s.send_iovs[r] = libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: reply_len,
                };
                let ctrl_len = if s.set_source {
                    build_pktinfo(&mut s.send_ctrl[r], info.local)
                } else {
                    0
                };
                let iov_ptr: *mut libc::iovec = &mut s.send_iovs[r];
                let h = &mut s.send_hdrs[r].msg_hdr;
                // The peer's address stays in the buffer's name region, where the kernel wrote it.
                // SAFETY: HEADER_LEN is inside the buffer.
                h.msg_name = unsafe { base.add(HEADER_LEN) }.cast();
                h.msg_namelen = name_len;
                h.msg_iov = iov_ptr;
                h.msg_iovlen = 1;
                h.msg_control = if ctrl_len > 0 {
                    s.send_ctrl[r].as_mut_ptr().cast()
                } else {
                    std::ptr::null_mut()
                };
                h.msg_controllen = ctrl_len;
                h.msg_flags = 0;
            }
            let mut replied = 0;
            if socks.iter().any(|s| s.pending > 0) {
                // T3 once, after every reply of the batch is built.
                let tx = handler.transmit_stamp();
                for s in socks.iter_mut().filter(|s| s.pending > 0) {
                    for r in 0..s.pending {
                        let iov = s.send_iovs[r];
                        // SAFETY: iov points at a reply the handler wrote in one of our buffers.
                        let reply = unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast::<u8>(), iov.iov_len) };
                        handler.stamp(reply, s.rx_ns[r], &tx);
                    }
                    if uring_send {
                        for r in 0..s.pending {
                            let bid = s.bids[r];
                            let slot = &mut slots[bid as usize];
                            slot.iov = s.send_iovs[r];
                            slot.ctrl = s.send_ctrl[r];
                            slot.hdr = s.send_hdrs[r].msg_hdr;
                            slot.hdr.msg_iov = &mut slot.iov;
                            if slot.hdr.msg_controllen > 0 {
                                slot.hdr.msg_control = slot.ctrl.as_mut_ptr().cast();
                            }
                            let sqe = opcode::SendMsg::new(types::Fd(s.fd), &slot.hdr)
                                .build()
                                .user_data(SEND_TAG | u64::from(bid));
                            // SAFETY: the slot (msghdr, iovec, cmsg) and the buffer it points
                            // at stay untouched until this send's completion returns the bid.
                            let mut queued = unsafe { ring.submission().push(&sqe) }.is_ok();
                            // Queue full: hand what is queued to the kernel, then retry once.
                            if !queued && ring.submit().is_ok() {
                                // SAFETY: as above.
                                queued = unsafe { ring.submission().push(&sqe) }.is_ok();
                            }
                            if queued {
                                *sends_in_flight += 1;
                            } else {
                                // Never submitted: the buffer goes back with the batch's others.
                                returned.push(bid);
                                handler.send_failed(SendError::BufferFull, 1);
                            }
                        }
                        replied += s.pending;
                        s.pending = 0;
                        continue;
                    }
                    send_batch(s.fd, &mut s.send_hdrs[..s.pending], handler);
                    replied += s.pending;
                    s.pending = 0;
                }
            }
            // Buffers of dropped requests and of synchronous sends go back now; io_uring sends
            // return theirs on completion.
            for &bid in returned.iter() {
                bufring.push(bid);
            }
            bufring.publish();
            if rx_dropped > 0 {
                handler.rx_queue_dropped(rx_dropped);
            }
            handler.end_batch(received, replied);
        }
        if !got_any {
            handler.idle();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::socket::{SocketOptions, bind_udp};

    #[test]
    fn shutdown_ends_every_request_before_the_memory_goes() {
        if let Err(Unsupported(why)) = probe() {
            eprintln!("SKIPPED: io_uring unavailable ({why})");
            return;
        }
        let opts = SocketOptions {
            recv_buffer: 1 << 16,
            send_buffer: 1 << 16,
            read_timeout: None,
            nonblocking: true,
        };
        let socks: Vec<Socket> = (0..2)
            .map(|_| bind_udp("127.0.0.1:0".parse().unwrap(), &opts).unwrap())
            .collect();
        let mut w = Worker::new(&socks).unwrap();
        arm(&mut w.ring, &mut w.socks);
        w.ring.submit().unwrap();
        assert!(w.socks.iter().all(|s| s.armed));
        // What `Drop` does before the ring closes and the buffers are freed.
        assert!(w.quiesce(), "armed receives survived the cancel");
        assert!(w.socks.iter().all(|s| !s.armed));
        drop(w);
    }
}
