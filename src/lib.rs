//! gnomon: a public NTP server. This library holds everything the binary, the benches,
//! the integration tests, the fuzz targets and the load generator share.

pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod logging;
pub mod notify;
pub mod nts;
pub mod policy;
pub mod proto;
pub mod query;
pub mod server;
pub mod sync;
pub mod xdp;
