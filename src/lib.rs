//! gnomon: a public NTP server. This library holds everything the binary, the benches,
//! the integration tests, the fuzz targets and the load generator share.

pub mod clock;
pub mod proto;
pub mod sync;
