//! The sync side: polling upstream servers, filtering, selecting and combining them, and
//! disciplining the published clock snapshot.
//!
//! Everything but [`shell`] is sans-IO: plain functions and state machines fed with reply
//! bytes and times (nanoseconds of the raw timeline, see [`kernel`]) by the caller, so the
//! simulation tests drive the same code on virtual time. [`shell`] is the small I/O layer: the
//! sync thread with its UDP socket, DNS lookups and the publisher; [`adjtimex`] is the kernel
//! clock.

pub mod adjtimex;
pub mod discipline;
pub mod engine;
pub mod filter;
pub mod kernel;
pub mod leap;
pub mod report;
pub mod select;
pub mod shell;
pub mod source;

pub use discipline::{ClockModeError, Discipline, SystemEstimate, check_system_mode};
pub use engine::{LookupRequest, SyncCore};
pub use filter::{ClockFilter, Estimate, Sample};
pub use kernel::{ClockReading, KernelClock, KernelEvent, SimulatedKernel, Timeline};
pub use leap::{LeapConfig, LeapList, LeapListError, LeapMode};
pub use report::{SourceReport, StrayReport, SyncReport, SystemReport, render_sources, render_status};
pub use select::{Candidate, Outcome, Selection, Verdict, select};
pub use shell::{SyncHandle, SyncReporter, spawn};
pub use source::{Rejection, Source, validate};

/// How the corrected time reaches clients.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ClockMode {
    /// The kernel clock is left alone; replies are corrected through the snapshot.
    #[default]
    Software,
    /// The kernel clock is steered too, with adjtimex (needs CAP_SYS_TIME); the snapshot then
    /// corrects only what the kernel has not caught up with yet. See [`kernel`].
    System,
}

impl ClockMode {
    pub fn name(self) -> &'static str {
        match self {
            ClockMode::Software => "software",
            ClockMode::System => "system",
        }
    }
}

/// One `[[upstream]]` (or pool) entry, as parsed from the config file.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UpstreamConfig {
    /// Host name or IP address.
    pub address: String,
    pub port: u16,
    /// A pool: the name resolves to several servers, each used as a source.
    pub pool: bool,
    /// Start with a burst of quick polls so the first synchronisation takes seconds.
    pub iburst: bool,
    /// log2 seconds.
    pub minpoll: i8,
    /// log2 seconds.
    pub maxpoll: i8,
    /// Becomes the system peer whenever it survives selection.
    pub prefer: bool,
    /// Its interval decides which region of agreement wins, even without a majority.
    pub trust: bool,
    /// A pool: members at once (chrony's `maxsources`); a dead member is replaced, never added
    /// to. Between 1 and [`MAX_POOL_SOURCES`].
    pub max_sources: u8,
    /// Authenticate with NTS (RFC 8915): NTS-KE first, then only authenticated replies count.
    pub nts: Option<NtsUpstream>,
}

/// How to reach an upstream's NTS-KE server and whom to trust there.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NtsUpstream {
    /// TCP port of NTS-KE on the upstream's address (4460 by default).
    pub ke_port: u16,
    /// Trust anchors (PEM): a private CA; the system's roots when `None`.
    pub ca: Option<std::path::PathBuf>,
}

impl UpstreamConfig {
    /// Defaults as in ntpd/chrony: port 123, poll between 64 s and 1024 s.
    pub fn new(address: &str) -> UpstreamConfig {
        UpstreamConfig {
            address: address.to_string(),
            port: 123,
            pool: false,
            iburst: false,
            minpoll: 6,
            maxpoll: 10,
            prefer: false,
            trust: false,
            max_sources: DEFAULT_POOL_SOURCES,
            nts: None,
        }
    }
}

/// Everything the sync thread needs from the config file.
#[derive(Clone, PartialEq, Debug)]
pub struct SyncConfig {
    pub upstreams: Vec<UpstreamConfig>,
    pub mode: ClockMode,
    /// Holdover limit: once root dispersion passes this many seconds, replies say LI 3.
    pub max_root_dispersion: f64,
    /// With no upstreams: serve the local clock at this stratum (refid LOCL).
    pub local_stratum: Option<u8>,
    /// When a correction may step instead of slew (chrony's `makestep`), as configured. Not
    /// configured: the kernel clock (mode system) follows [`MakeStep::DEFAULT`], and served time
    /// steps only at its first update, before anything was served as synchronised.
    pub makestep: Option<MakeStep>,
    /// The largest correction followed (ntpd's panic threshold), as `[makestep]` sets it.
    pub panic: Panic,
    /// `[leap]`: whether and how leap seconds are announced and applied.
    pub leap: LeapConfig,
}

/// ntpd's panic threshold: an upstream that wants the clock moved further than this at once is
/// insane (a GPS week rollover, a misconfigured server, a spoofer), so the correction is refused
/// and the reason shown, rather than served.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Panic {
    /// Seconds; `None`: no limit.
    pub threshold: Option<f64>,
    /// The first correction may be of any size (ntpd's `-g`): for a machine whose clock is known
    /// to start wrong (no RTC). Later ones still meet the threshold.
    pub allow_first: bool,
}

impl Panic {
    pub const DEFAULT_THRESHOLD: f64 = 1000.0;

    /// Whether a correction of `error_s` is refused (`first`: nothing served as synchronised yet).
    pub fn refuses(&self, first: bool, error_s: f64) -> bool {
        !(first && self.allow_first) && self.threshold.is_some_and(|t| error_s.abs() > t)
    }
}

impl Default for Panic {
    fn default() -> Self {
        Panic {
            threshold: Some(Panic::DEFAULT_THRESHOLD),
            allow_first: false,
        }
    }
}

/// chrony's `makestep THRESHOLD LIMIT`: in the first `limit` clock updates, an error larger than
/// `threshold` is corrected at once instead of slewed. Later updates always slew. The served
/// time's very first correction is always a step: nothing was served as synchronised before.
/// A kernel step never moves served time (the snapshot takes it out).
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct MakeStep {
    /// Seconds.
    pub threshold: f64,
    /// Updates counted from the first; `None`: any update may step.
    pub limit: Option<u32>,
}

impl MakeStep {
    /// chrony's recommended (and Debian's) `makestep 1.0 3`.
    pub const DEFAULT: MakeStep = MakeStep {
        threshold: 1.0,
        limit: Some(3),
    };

    /// Whether update number `update` (1 for the first) may correct `error_s` by a step.
    pub fn allows(&self, update: u32, error_s: f64) -> bool {
        error_s.abs() > self.threshold && self.limit.is_none_or(|l| update <= l)
    }
}

impl Default for MakeStep {
    fn default() -> Self {
        MakeStep::DEFAULT
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            upstreams: Vec::new(),
            mode: ClockMode::Software,
            max_root_dispersion: 1.0,
            local_stratum: None,
            makestep: None,
            panic: Panic::default(),
            leap: LeapConfig::default(),
        }
    }
}

/// Poll exponents accepted from the config: 1 s to 36 h (RFC 5905 MAXPOLL 17).
pub const MIN_POLL: i8 = 0;
pub const MAX_POLL: i8 = 17;

/// Members of one pool at once unless `max_sources` says otherwise (chrony's default), and the
/// most `max_sources` may ask for.
pub const DEFAULT_POOL_SOURCES: u8 = 4;
pub const MAX_POOL_SOURCES: u8 = 16;
/// Sources in total: selection costs grow with the cube of their number, and DNS must never be
/// able to grow the table without bound.
pub const MAX_SOURCES: usize = 64;

/// chrony's `maxdistance`: a source whose root distance is larger is not usable.
pub const MAX_DISTANCE: f64 = 3.0;

pub(crate) fn nanos_to_secs(ns: i64) -> f64 {
    ns as f64 * 1e-9
}

pub(crate) fn secs_to_nanos(s: f64) -> i64 {
    (s * 1e9).round() as i64
}
