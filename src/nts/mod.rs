//! Network Time Security (RFC 8915): NTS-KE records, cookies and master keys, and the NTP-side
//! request handling, all sans-IO; `server` runs NTS-KE over TLS on its own threads.
#![forbid(unsafe_code)]

pub mod client;
pub mod cookie;
pub mod ke;
pub mod ntp;
