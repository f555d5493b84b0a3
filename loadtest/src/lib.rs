//! gnomon-load: an open-loop load generator and reply validator for NTP servers over
//! loopback (or, with `--xdp`, through AF_XDP on a veth pair). Many clients (one 127/8 source
//! address each), Zipf and abuser populations, fixed-rate, as-fast-as-possible and ramp shapes;
//! every reply is checked.

pub mod net;
pub mod nts;
pub mod population;
pub mod report;
pub mod run;
pub mod snmp;
pub mod tracker;
pub mod validate;
pub mod xdp;

pub use report::Report;
pub use run::{Abuser, RampPlan, RunConfig, RunError, Shape, run};
pub use validate::{Invalid, Kiss, ReplyKind};
