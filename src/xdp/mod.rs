//! The AF_XDP path (issue 16): frames that are plainly NTP requests for us are redirected by an
//! XDP program to user space and answered in the same frame, before the kernel's UDP stack.
//!
//! `frame` is the sans-IO part (no `unsafe`): which frames are ours, and the reply.

pub mod frame;
