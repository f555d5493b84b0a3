//! NTP wire format and server reply rules. Pure: no sockets, no clock reads, no allocation
//! in the reply path, no logging.
#![forbid(unsafe_code)]

pub mod address;
pub mod packet;
pub mod reply;
pub mod timestamp;

pub use address::{Destination, Unanswerable, check_addresses};
pub use packet::{DecodeError, HEADER_LEN, Header, LeapIndicator, Mode, RefId};
pub use reply::{
    MAX_REQUEST_LEN, ReplyTemplate, RequestError, ServerInfo, check_request, respond, stamp_transmit, write_reply,
};
pub use timestamp::{NtpDuration, NtpShort, NtpTimestamp};
