//! One AF_XDP socket with its own UMEM, bound to one RX queue of an interface in copy mode:
//! the frames the XDP program redirects are answered through the same [`Handler`] as the kernel
//! path, the reply built in the frame it arrived in and sent from the same UMEM chunk.
//!
//! T2 is the XDP program's `bpf_ktime_get_tai_ns` stamp from the frame's metadata (copy mode copies
//! it into the UMEM), converted to CLOCK_REALTIME with one TAI-realtime offset per batch; a
//! frame without a plausible stamp gets the time its batch was taken.
//!
//! Memory is fixed at creation (UMEM, rings, the per-batch table): nothing is allocated per
//! frame. Each batch costs one `poll` when idle and one `sendto` kick per 32 replies.

use super::frame::{self, Request, Target};
use super::program::META_LEN;
use crate::proto::Destination;
use crate::server::{Datagram, Handler};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_PGOFF_RX_RING: libc::off_t = 0;
const XDP_PGOFF_TX_RING: libc::off_t = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: libc::off_t = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: libc::off_t = 0x1_8000_0000;
const XDP_COPY: u16 = 1 << 1;
const XDP_ZEROCOPY: u16 = 1 << 2;
const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;
/// In a ring's flags word: the kernel waits for a syscall before it touches this ring again.
const XDP_RING_NEED_WAKEUP: u32 = 1;

/// UMEM chunk size: one frame per chunk (aligned mode needs a power of two of at least 2048).
pub const FRAME_SIZE: u32 = 2048;
/// Chunks in a server socket's UMEM, and the size of each of its rings (a power of two).
pub const FRAMES: u32 = 1024;
/// Frames taken from the RX ring at once.
pub const BATCH: usize = 64;
/// Frames the kernel sends per `sendto` kick in copy mode (its TX_BATCH_SIZE).
const KERNEL_TX_BATCH: usize = 32;
/// TTL / hop limit of the replies (Linux's default).
pub const TTL: u8 = 64;

#[repr(C)]
struct UmemReg {
    addr: u64,
    len: u64,
    chunk_size: u32,
    headroom: u32,
    flags: u32,
    tx_metadata_len: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fr: RingOffset,
    cr: RingOffset,
}

#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}

/// A descriptor of the RX and TX rings (`struct xdp_desc`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    options: u32,
}

/// A mapping of ours, unmapped on drop.
struct Mmap {
    ptr: *mut u8,
    len: usize,
}

impl Mmap {
    fn new(len: usize, fd: Option<(libc::c_int, libc::off_t)>) -> io::Result<Mmap> {
        let (flags, fd, off) = match fd {
            Some((fd, off)) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd, off),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE, -1, 0),
        };
        // SAFETY: a fresh mapping at an address the kernel picks; nothing aliases it yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap { ptr: ptr.cast(), len })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no reference into it outlives it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One single-producer/single-consumer ring shared with the kernel.
struct Ring<T> {
    _map: Mmap,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    desc: *mut T,
    mask: u32,
}

impl<T: Copy> Ring<T> {
    fn map(fd: libc::c_int, off: &RingOffset, pgoff: libc::off_t, size: u32) -> io::Result<Ring<T>> {
        let len = off.desc as usize + size as usize * size_of::<T>();
        let map = Mmap::new(len, Some((fd, pgoff)))?;
        // SAFETY: the kernel's offsets lie inside the mapping it just sized for this ring.
        let (producer, consumer, flags, desc) = unsafe {
            (
                map.ptr.add(off.producer as usize) as *const AtomicU32,
                map.ptr.add(off.consumer as usize) as *const AtomicU32,
                map.ptr.add(off.flags as usize) as *const AtomicU32,
                map.ptr.add(off.desc as usize) as *mut T,
            )
        };
        Ok(Ring {
            _map: map,
            producer,
            consumer,
            flags,
            desc,
            mask: size - 1,
        })
    }
    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into our live mapping; the kernel updates it only atomically.
        unsafe { &*self.producer }
    }
    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { &*self.consumer }
    }
    /// Whether the kernel asks for a syscall to go on with this ring (only set when the socket
    /// was bound with XDP_USE_NEED_WAKEUP; without it the kernel never waits).
    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        unsafe { &*self.flags }.load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }
    fn read(&self, idx: u32) -> T {
        // SAFETY: idx is masked into the ring; the entry was published by the producer's
        // release store that our acquire load saw.
        unsafe { self.desc.add((idx & self.mask) as usize).read() }
    }
    fn write(&self, idx: u32, v: T) {
        // SAFETY: idx is masked into the ring, in a slot the consumer has released.
        unsafe { self.desc.add((idx & self.mask) as usize).write(v) }
    }
    /// As consumer: entries ready to take, up to `max`, starting at the returned index.
    fn peek(&self, max: u32) -> (u32, u32) {
        let cons = self.consumer().load(Ordering::Relaxed);
        let prod = self.producer().load(Ordering::Acquire);
        (cons, prod.wrapping_sub(cons).min(max))
    }
    fn release(&self, n: u32) {
        let cons = self.consumer().load(Ordering::Relaxed);
        self.consumer().store(cons.wrapping_add(n), Ordering::Release);
    }
    /// As producer: free slots.
    fn free(&self) -> (u32, u32) {
        let prod = self.producer().load(Ordering::Relaxed);
        let cons = self.consumer().load(Ordering::Acquire);
        (prod, (self.mask + 1) - prod.wrapping_sub(cons))
    }
    fn submit(&self, n: u32) {
        let prod = self.producer().load(Ordering::Relaxed);
        self.producer().store(prod.wrapping_add(n), Ordering::Release);
    }
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a live timespec; clock_gettime only writes it.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn setsockopt<T>(fd: libc::c_int, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` is a live value of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            opt,
            (v as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A reply of the batch waiting for its T3.
#[derive(Clone, Copy)]
struct Pending {
    addr: u64,
    req: Request,
    reply_len: usize,
    rx_realtime_ns: i64,
}

/// What happened to one batch.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BatchResult {
    pub received: usize,
    pub replied: usize,
    /// Redirected frames `frame::parse` refused (bad checksums): dropped, as the kernel would.
    pub malformed: usize,
    /// Requests whose T2 came from the XDP program's timestamp (the rest got the batch's time).
    pub stamped: usize,
    /// TX kicks (sendto) made for this batch: one per 32 replies at most (copy mode's limit per
    /// call), none where a zero-copy driver is still sending.
    pub kicks: usize,
}

/// The kernel's counters of one AF_XDP socket (`struct xdp_statistics`), since it was bound.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct XskStats {
    /// Frames dropped for reasons other than a full RX ring or an empty fill ring.
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full (the worker fell behind).
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
}

/// An AF_XDP socket bound to one queue, with its UMEM.
pub struct Xsk {
    fd: OwnedFd,
    umem: Mmap,
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<Desc>,
    tx: Ring<Desc>,
    target: Target,
    pending: [Option<Pending>; BATCH],
    /// Chunks to give back to the fill ring (dropped requests, completed replies).
    recycle: Box<[u64]>,
    recycled: usize,
    /// The sockaddr_xdp flags it was bound with.
    flags: u16,
    /// A generator's socket: chunks below this address are for sending only and come back
    /// from the completion ring to `send_pool`, never to the fill ring (0 for a server).
    send_end: u64,
    send_pool: Vec<u64>,
}

// SAFETY: every mapping and fd of an `Xsk` is owned by it alone (no other value points into its
// UMEM or rings), so moving it whole to the worker thread that then uses it is sound; it is not
// `Sync`, so only one thread touches the rings at a time.
unsafe impl Send for Xsk {}

impl Xsk {
    /// Creates the socket and its UMEM and binds it to queue `queue` of interface `ifindex` (of
    /// the calling thread's network namespace): zero-copy where the driver offers it, else copy
    /// mode; with need-wakeup where the kernel has it (5.4+), so an idle or keeping-up kernel
    /// side costs no syscalls.
    pub fn bind(ifindex: u32, queue: u32, target: Target) -> io::Result<Xsk> {
        Xsk::bind_sending(ifindex, queue, target, FRAMES, 0)
    }

    /// As [`Xsk::bind`], with `frames` chunks (a power of two, also each ring's size) of which
    /// the first `send_chunks` (at most half) are kept for [`Xsk::send_frames`] (a load
    /// generator's requests) and the rest are for receiving.
    pub fn bind_sending(ifindex: u32, queue: u32, target: Target, frames: u32, send_chunks: u32) -> io::Result<Xsk> {
        assert!(frames.is_power_of_two(), "ring sizes are powers of two");
        let mut last = None;
        for flags in [
            XDP_ZEROCOPY | XDP_USE_NEED_WAKEUP,
            XDP_COPY | XDP_USE_NEED_WAKEUP,
            XDP_COPY,
        ] {
            match Xsk::bind_with(ifindex, queue, target, flags, frames, send_chunks.min(frames / 2)) {
                Ok(x) => return Ok(x),
                // No AF_XDP at all, or no right to it: no other mode helps.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EPERM)) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// Whether the driver took the UMEM in zero-copy mode (else frames are copied, as on veth).
    pub fn zero_copy(&self) -> bool {
        self.flags & XDP_ZEROCOPY != 0
    }

    /// Whether the socket was bound with XDP_USE_NEED_WAKEUP.
    pub fn need_wakeup(&self) -> bool {
        self.flags & XDP_USE_NEED_WAKEUP != 0
    }

    fn bind_with(
        ifindex: u32,
        queue: u32,
        target: Target,
        flags: u16,
        frames: u32,
        send_chunks: u32,
    ) -> io::Result<Xsk> {
        // SAFETY: plain socket creation; the fd is owned right after.
        let raw = unsafe { libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem = Mmap::new((frames * FRAME_SIZE) as usize, None)?;
        let reg = UmemReg {
            addr: umem.ptr as u64,
            len: umem.len as u64,
            chunk_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, XDP_UMEM_REG, &reg)?;
        for opt in [XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING, XDP_TX_RING] {
            setsockopt(raw, opt, &frames)?;
        }
        let mut off = MmapOffsets::default();
        let mut len = size_of::<MmapOffsets>() as libc::socklen_t;
        // SAFETY: `off` is a live buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                raw,
                SOL_XDP,
                XDP_MMAP_OFFSETS,
                (&mut off as *mut MmapOffsets).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let fill = Ring::map(raw, &off.fr, XDP_UMEM_PGOFF_FILL_RING, frames)?;
        let comp = Ring::map(raw, &off.cr, XDP_UMEM_PGOFF_COMPLETION_RING, frames)?;
        let rx = Ring::map(raw, &off.rx, XDP_PGOFF_RX_RING, frames)?;
        let tx = Ring::map(raw, &off.tx, XDP_PGOFF_TX_RING, frames)?;
        let sa = SockaddrXdp {
            family: AF_XDP as u16,
            flags,
            ifindex,
            queue_id: queue,
            shared_umem_fd: 0,
        };
        // SAFETY: `sa` is a live sockaddr_xdp of the size passed.
        let r = unsafe {
            libc::bind(
                raw,
                (&sa as *const SockaddrXdp).cast(),
                size_of::<SockaddrXdp>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // Every chunk not kept for sending starts in the fill ring: the kernel may write any.
        let (idx, free) = fill.free();
        let receive = (frames - send_chunks).min(free);
        for i in 0..receive {
            fill.write(idx.wrapping_add(i), ((send_chunks + i) * FRAME_SIZE) as u64);
        }
        fill.submit(receive);
        Ok(Xsk {
            fd,
            umem,
            fill,
            comp,
            rx,
            tx,
            target,
            pending: [None; BATCH],
            recycle: vec![0u64; frames as usize].into_boxed_slice(),
            recycled: 0,
            flags,
            send_end: u64::from(send_chunks * FRAME_SIZE),
            send_pool: (0..send_chunks).rev().map(|i| u64::from(i * FRAME_SIZE)).collect(),
        })
    }

    /// The kernel's ring-full / fill-empty / drop counters for this socket (one syscall: for
    /// the stats thread, not per batch).
    pub fn stats(&self) -> io::Result<XskStats> {
        let mut st = XskStats::default();
        let mut len = size_of::<XskStats>() as libc::socklen_t;
        // SAFETY: `st` is a live buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_XDP,
                XDP_STATISTICS,
                (&mut st as *mut XskStats).cast(),
                &mut len,
            )
        };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(st) }
    }

    /// The socket's fd, for the program's XSKMAP.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn frame(&mut self, addr: u64, len: usize) -> &mut [u8] {
        let start = addr as usize;
        assert!(start + len <= self.umem.len);
        // SAFETY: inside our UMEM, in a chunk that is ours alone: handed to us through the RX
        // ring, or a send chunk from `send_pool` (never given to the kernel yet, or returned by
        // it through the completion ring); the kernel does not touch it until we give it back
        // through the fill or TX ring.
        unsafe { std::slice::from_raw_parts_mut(self.umem.ptr.add(start), len) }
    }

    /// The program's receive stamp before the frame at `addr`, if there is a plausible one (at
    /// most a second old); cleared, so a later frame in this chunk never reuses it.
    fn take_stamp(&mut self, addr: u64, now_tai: i64) -> Option<i64> {
        let meta = META_LEN as u64;
        if addr % u64::from(FRAME_SIZE) < meta {
            return None;
        }
        let m = self.frame(addr - meta, META_LEN);
        let stamp = i64::from_ne_bytes(m[..8].try_into().unwrap());
        m.fill(0);
        let age = now_tai - stamp;
        (0..1_000_000_000).contains(&age).then_some(stamp)
    }

    fn give_back(&mut self, addr: u64) {
        self.recycle[self.recycled] = addr & !(FRAME_SIZE as u64 - 1);
        self.recycled += 1;
    }

    /// Waits up to `timeout_ms` for frames, answers one batch through `handler` and sends the
    /// replies (one kick per 32 of them in copy mode).
    pub fn serve_batch<H: Handler>(&mut self, handler: &mut H, timeout_ms: i32) -> io::Result<BatchResult> {
        self.reclaim();
        let (mut idx, mut n) = self.rx.peek(BATCH as u32);
        if n > 0 && self.fill.needs_wakeup() {
            // Zero-copy drivers stop receiving when the fill ring ran dry until told it has
            // chunks again; `poll` below does that when idle, this when busy.
            // SAFETY: a zero-length, non-blocking recvfrom on our socket only wakes the driver.
            unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
        if n == 0 {
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            (idx, n) = self.rx.peek(BATCH as u32);
            if n == 0 {
                handler.idle();
                return Ok(BatchResult::default());
            }
        }
        // T2: the XDP program's CLOCK_TAI stamp in the frame's metadata, moved to the realtime
        // scale with one offset per batch; the time the batch is taken where there is none.
        let batch_ns = crate::clock::realtime_ns();
        let batch_tai = clock_ns(libc::CLOCK_TAI);
        let tai_minus_real = batch_tai - batch_ns;
        handler.begin_batch();
        let mut res = BatchResult {
            received: n as usize,
            ..Default::default()
        };
        let target = self.target;
        for i in 0..n {
            let d = self.rx.read(idx.wrapping_add(i));
            self.pending[i as usize] = None;
            let t2 = match self.take_stamp(d.addr, batch_tai) {
                Some(tai) => {
                    res.stamped += 1;
                    tai - tai_minus_real
                }
                None => batch_ns,
            };
            let f = self.frame(d.addr, d.len as usize);
            let req = match frame::parse(f, &target) {
                Ok(r) => r,
                Err(_) => {
                    res.malformed += 1;
                    self.give_back(d.addr);
                    continue;
                }
            };
            let reply_len = handler.handle(Datagram {
                buf: &mut f[req.payload..req.payload + req.payload_len],
                len: req.payload_len,
                truncated: false,
                peer: req.peer,
                rx_realtime_ns: Some(t2),
                destination: Some(Destination {
                    addr: req.destination,
                    spec_dst: None,
                }),
            });
            if reply_len == 0 {
                self.give_back(d.addr);
                continue;
            }
            self.pending[i as usize] = Some(Pending {
                addr: d.addr,
                req,
                reply_len,
                rx_realtime_ns: t2,
            });
        }
        self.rx.release(n);
        let replies = self.pending[..n as usize].iter().filter(|p| p.is_some()).count();
        if replies > 0 {
            let tx = handler.transmit_stamp();
            let (tidx, free) = self.tx.free();
            let mut sent = 0u32;
            for i in 0..n as usize {
                let Some(p) = self.pending[i] else { continue };
                let f = self.frame(p.addr, p.req.payload + p.req.payload_len);
                let payload = p.req.payload;
                handler.stamp(&mut f[payload..payload + p.reply_len], p.rx_realtime_ns, &tx);
                let flen = frame::build_reply(f, &p.req, p.reply_len, TTL);
                if sent < free {
                    self.tx.write(
                        tidx.wrapping_add(sent),
                        Desc {
                            addr: p.addr,
                            len: flen as u32,
                            options: 0,
                        },
                    );
                    sent += 1;
                } else {
                    self.give_back(p.addr);
                }
            }
            self.tx.submit(sent);
            res.replied = sent as usize;
            res.kicks = self.kick_tx()?;
        }
        handler.end_batch(res.received, res.replied);
        self.reclaim();
        Ok(res)
    }

    /// A generator's send: up to `n` new frames, each written by `build(i, chunk)` (returning
    /// its length) into a chunk kept for sending, then one kick per 32. Returns how many went
    /// into the TX ring: fewer than `n` when the kernel has not yet completed enough earlier
    /// ones (the caller counts those as not sent).
    pub fn send_frames(&mut self, n: usize, mut build: impl FnMut(usize, &mut [u8]) -> usize) -> io::Result<usize> {
        self.reclaim();
        let (tidx, free) = self.tx.free();
        let k = n.min(self.send_pool.len()).min(free as usize).min(BATCH);
        for i in 0..k {
            let addr = self.send_pool.pop().expect("counted");
            let len = build(i, self.frame(addr, FRAME_SIZE as usize));
            self.tx.write(
                tidx.wrapping_add(i as u32),
                Desc {
                    addr,
                    len: len as u32,
                    options: 0,
                },
            );
        }
        self.tx.submit(k as u32);
        if k > 0 {
            self.kick_tx()?;
        }
        Ok(k)
    }

    /// A generator's receive: every frame waiting in the RX ring (up to [`BATCH`]) that
    /// [`frame::parse`] takes as UDP for the socket's target goes to `f` with its parts; the
    /// rest are dropped. No wait: the caller polls [`Xsk::raw_fd`]. Returns the frames taken.
    pub fn recv_frames(&mut self, mut f: impl FnMut(&Request, &[u8])) -> usize {
        let (idx, n) = self.rx.peek(BATCH as u32);
        let target = self.target;
        for i in 0..n {
            let d = self.rx.read(idx.wrapping_add(i));
            let frame = self.frame(d.addr, d.len as usize);
            if let Ok(r) = frame::parse(frame, &target) {
                f(&r, frame);
            }
            self.give_back(d.addr);
        }
        self.rx.release(n);
        self.reclaim();
        n as usize
    }

    /// Has the kernel send what the TX ring holds; returns the kicks (sendto calls) made.
    ///
    /// Copy mode sends in the syscall, but at most 32 frames per call (the kernel's
    /// TX_BATCH_SIZE), answering EAGAIN while more wait: a batch of up to [`BATCH`] replies
    /// takes two kicks, or its tail would leave only with the next batch's syscall, later than
    /// its T3 says. With need-wakeup, a zero-copy driver still draining the ring needs none.
    fn kick_tx(&mut self) -> io::Result<usize> {
        let mut kicks = 0;
        while kicks <= BATCH / KERNEL_TX_BATCH && (!self.need_wakeup() || self.tx.needs_wakeup()) {
            let before = self.tx.consumer().load(Ordering::Acquire);
            kicks += 1;
            // SAFETY: a zero-length sendto on our socket only triggers the TX ring's processing.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if r >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // More to send, and the last kick made progress: go on.
                Some(libc::EAGAIN) if self.tx.consumer().load(Ordering::Acquire) != before => {}
                // The completion ring or the device queue is full: the next batch retries.
                Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ENOBUFS) => break,
                _ => return Err(e),
            }
        }
        Ok(kicks)
    }

    /// Completed TX chunks and dropped requests go back to the fill ring; a generator's send
    /// chunks go back to `send_pool` instead.
    fn reclaim(&mut self) {
        let (cidx, done) = self.comp.peek(self.recycle.len() as u32);
        for i in 0..done {
            let a = self.comp.read(cidx.wrapping_add(i));
            if a < self.send_end {
                self.send_pool.push(a & !(FRAME_SIZE as u64 - 1));
            } else {
                self.give_back(a);
            }
        }
        self.comp.release(done);
        if self.recycled == 0 {
            return;
        }
        let (fidx, free) = self.fill.free();
        let k = (self.recycled as u32).min(free);
        for i in 0..k {
            self.fill
                .write(fidx.wrapping_add(i), self.recycle[self.recycled - 1 - i as usize]);
        }
        self.fill.submit(k);
        self.recycled -= k as usize;
    }
}
