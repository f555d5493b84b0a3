//! The AF_XDP path (issue 16): frames that are plainly NTP requests for us are redirected by an
//! XDP program to user space and answered in the same frame, before the kernel's UDP stack.
//!
//! `frame` is the sans-IO part (no `unsafe`): which frames are ours, and the reply. `program`
//! assembles the XDP program applying the same rules in the kernel (no compiler on the server).
//! `sys` (raw `bpf()` calls) and `xsk` (the AF_XDP socket and its rings) are the I/O layer and
//! the only places here with `unsafe`.

pub mod frame;
pub mod program;
pub mod sys;
pub mod xsk;
