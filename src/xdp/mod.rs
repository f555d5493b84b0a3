//! The AF_XDP path (issue 16): frames that are plainly NTP requests for us are redirected by an
//! XDP program to user space and answered in the same frame, before the kernel's UDP stack.
//!
//! `frame` is the sans-IO part (no `unsafe`): which frames are ours, and the reply. `program`
//! assembles the XDP program applying the same rules in the kernel (no compiler on the server).
//! `sys` (raw `bpf()` calls) and `xsk` (the AF_XDP socket and its rings) are the I/O layer and
//! the only places here with `unsafe`.
//!
//! Why assembled bytecode and raw `bpf()` rather than `aya`: the program is about 130
//! instructions of header compares, which the tests check against `frame::classify` in the
//! kernel itself (BPF_PROG_TEST_RUN), while an `aya-bpf` program would need nightly Rust and
//! bpf-linker to build; loading it takes five `bpf()` commands, and the `bpf_link` that attaches
//! it is detached by the kernel when its fd closes, crash included.
//!
//! Needs kernel 6.1+ (`bpf_ktime_get_tai_ns`), CAP_BPF and CAP_NET_ADMIN (or root).
//!
//! On veth (and virtio with offloads) a peer on the same host sends UDP checksums as
//! CHECKSUM_PARTIAL: the frame holds only the pseudo-header sum, the kernel path trusts the skb
//! flag, but `frame::parse` sees a wrong checksum and drops the request. Frames from a real wire
//! carry complete checksums; on a test veth, turn TX checksum offload off on the client's end.

pub mod frame;
pub mod program;
pub mod sys;
pub mod xsk;
