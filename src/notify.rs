//! systemd's service notifications (sd_notify(3)) without libsystemd: datagrams to the Unix
//! socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`).
//! READY=1 once every worker serves, STATUS= with the sync state whenever it changes, and
//! WATCHDOG=1 while every worker keeps publishing its counters (they do at least every 200 ms,
//! idle or busy), so a hung worker gets the service restarted. Without `$NOTIFY_SOCKET`
//! nothing is sent. Only safe std socket calls; the decisions are plain functions of the
//! workers' publication counts and the time, tested on their own.

use crate::sync::SystemReport;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// A worker whose publication count has not moved for this long is hung: 10 of its publication
/// intervals, so a busy machine never looks hung.
pub const STALL: Duration = Duration::from_secs(2);
/// How often the sync state is looked at for a STATUS= change.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The notification socket of the service manager.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

/// The address `$NOTIFY_SOCKET` names.
fn parse_address(name: &str) -> io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None if name.starts_with('/') => SocketAddr::from_pathname(name),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET `{name}` is neither a path nor an abstract name (@...)"),
        )),
    }
}

impl Notifier {
    /// The socket named by `$NOTIFY_SOCKET`, if it is set.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let name = name.to_string_lossy();
        let addr = parse_address(&name)?;
        Ok(Some(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
        }))
    }

    /// Sends newline-separated `KEY=VALUE` assignments in one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.addr).map(drop)
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// advises, when it is set for this process (`$WATCHDOG_PID`, if set, is our pid).
pub fn watchdog_from_env() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse() != Ok(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The sync state in one line, for STATUS=: changes only when the state does (no offsets).
pub fn status_line(s: &SystemReport) -> String {
    let source = s.system_peer.clone().unwrap_or_else(|| s.refid.clone());
    let line = match (s.synced, s.holdover) {
        (true, false) => format!("serving stratum {}, synchronised to {source}", s.stratum),
        (true, true) => format!(
            "serving stratum {}, holdover: no source selected (last {source})",
            s.stratum
        ),
        (false, _) => format!(
            "serving unsynchronised (LI 3): {}",
            s.why_unsynced.as_deref().unwrap_or("no usable source")
        ),
    };
    line.replace('\n', " ")
}

/// Which workers are alive: each one's publication count must move within [`STALL`].
#[derive(Debug, Default)]
pub struct Liveness {
    /// Per worker: the count last seen and when it last moved.
    seen: Vec<(u64, Instant)>,
}

impl Liveness {
    /// Takes the workers' counts at `now`; returns the first worker that has not published
    /// for [`STALL`] and for how long, or None when all are alive. A worker never seen before
    /// starts its grace period now.
    pub fn observe(&mut self, counts: &[u64], now: Instant) -> Option<(usize, Duration)> {
        self.seen.resize(counts.len(), (u64::MAX, now));
        let mut stalled = None;
        for (i, (&c, seen)) in counts.iter().zip(self.seen.iter_mut()).enumerate() {
            if c != seen.0 {
                *seen = (c, now);
            }
            let quiet = now.saturating_duration_since(seen.1);
            if stalled.is_none() && quiet >= STALL {
                stalled = Some((i, quiet));
            }
        }
        stalled
    }
}

/// What to tell systemd, decided once per supervisor tick.
pub struct Systemd {
    notifier: Option<Notifier>,
    watchdog: Option<Duration>,
    ready: bool,
    status: String,
    status_checked: Option<Instant>,
    last_ping: Option<Instant>,
    liveness: Liveness,
    /// The stalled worker last logged, so a hang is logged once, not at every tick.
    stall_logged: Option<usize>,
}

impl Systemd {
    pub fn new(notifier: Option<Notifier>, watchdog: Option<Duration>) -> Systemd {
        Systemd {
            notifier,
            watchdog,
            ready: false,
            status: String::new(),
            status_checked: None,
            last_ping: None,
            liveness: Liveness::default(),
            stall_logged: None,
        }
    }

    /// From the environment systemd sets; inert without `$NOTIFY_SOCKET`.
    pub fn from_env() -> io::Result<Systemd> {
        let notifier = Notifier::from_env()?;
        let watchdog = notifier.as_ref().and(watchdog_from_env());
        Ok(Systemd::new(notifier, watchdog))
    }

    pub fn active(&self) -> bool {
        self.notifier.is_some()
    }

    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The messages due at `now`, given each worker's publication count and a way to read the
    /// sync state (called at most once a second). Pure: [`Systemd::tick`] sends them.
    pub fn due(&mut self, counts: &[u64], status: impl FnOnce() -> String, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        if self.notifier.is_none() {
            return out;
        }
        let stalled = self.liveness.observe(counts, now);
        if self
            .status_checked
            .is_none_or(|t| now.saturating_duration_since(t) >= STATUS_EVERY)
        {
            self.status_checked = Some(now);
            let s = status();
            if s != self.status {
                self.status = s;
                if self.ready {
                    out.push(format!("STATUS={}", self.status));
                }
            }
        }
        // Every worker has run its loop at least once: its sockets are being read.
        if !self.ready && !counts.is_empty() && counts.iter().all(|&c| c > 0) {
            self.ready = true;
            out.push(format!("READY=1\nSTATUS={}", self.status));
        }
        match stalled {
            // Before READY a slow start is systemd's start timeout to judge, not a hang.
            _ if !self.ready => {}
            Some((worker, quiet)) => {
                if self.stall_logged != Some(worker) {
                    self.stall_logged = Some(worker);
                    log::error!(
                        "worker {worker} has not published its counters for {:.1} s: it looks hung{}",
                        quiet.as_secs_f64(),
                        if self.watchdog.is_some() {
                            "; the systemd watchdog is no longer fed"
                        } else {
                            ""
                        }
                    );
                }
            }
            None => {
                if let Some(worker) = self.stall_logged.take() {
                    log::info!("worker {worker} publishes its counters again");
                }
                if let Some(every) = self.watchdog
                    && self.last_ping.is_none_or(|t| now.saturating_duration_since(t) >= every)
                {
                    self.last_ping = Some(now);
                    out.push("WATCHDOG=1".to_string());
                }
            }
        }
        out
    }

    /// Sends what [`Systemd::due`] says. A lost notification is logged, never fatal: systemd
    /// then times the start out, or the watchdog restarts the service.
    pub fn tick(&mut self, counts: &[u64], status: impl FnOnce() -> String, now: Instant) {
        for m in self.due(counts, status, now) {
            if m.starts_with("READY") {
                log::info!("systemd: ready");
            }
            self.send(&m);
        }
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, m: &str) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.send(m)
        {
            log::warn!("systemd notification `{}`: {e}", m.lines().next().unwrap_or(""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(watchdog: Option<Duration>) -> Systemd {
        // A notifier that goes nowhere: `due` only decides.
        let n = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            addr: SocketAddr::from_pathname("/nonexistent/notify").unwrap(),
        };
        Systemd::new(Some(n), watchdog)
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert_eq!(
            parse_address("/run/systemd/notify").unwrap().as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(
            parse_address("@gnomon/x").unwrap().as_abstract_name(),
            Some(&b"gnomon/x"[..])
        );
        assert!(parse_address("relative").is_err());
    }

    #[test]
    fn ready_once_every_worker_ran_then_status_only_on_change() {
        let mut s = armed(None);
        let t0 = Instant::now();
        let st = |v: &str| {
            let v = v.to_string();
            move || v
        };
        assert!(s.due(&[1, 0], st("a"), t0).is_empty(), "worker 1 has not run yet");
        assert_eq!(s.due(&[1, 1], st("a"), t0), vec!["READY=1\nSTATUS=a"]);
        assert!(s.due(&[2, 2], st("a"), t0 + STATUS_EVERY).is_empty(), "same state");
        assert_eq!(s.due(&[3, 3], st("b"), t0 + 2 * STATUS_EVERY), vec!["STATUS=b"]);
        // The state is read at most once a second.
        assert!(s.due(&[4, 4], st("c"), t0 + 2 * STATUS_EVERY).is_empty());
        let inert = &mut Systemd::new(None, Some(Duration::from_millis(1)));
        assert!(inert.due(&[1], st("a"), t0).is_empty());
    }

    #[test]
    fn the_watchdog_is_fed_only_while_every_worker_publishes() {
        let every = Duration::from_millis(500);
        let mut s = armed(Some(every));
        let t0 = Instant::now();
        let pings = |m: Vec<String>| m.iter().filter(|m| *m == "WATCHDOG=1").count();
        assert_eq!(pings(s.due(&[1, 1], String::new, t0)), 1);
        assert_eq!(pings(s.due(&[2, 2], String::new, t0 + every / 2)), 0, "not due yet");
        assert_eq!(pings(s.due(&[3, 3], String::new, t0 + every)), 1);
        // Worker 1 stops publishing: pings go on within STALL, then stop.
        let mut t = t0 + every;
        let mut c0 = 3;
        let mut last_ping = t;
        while t < t0 + every + STALL * 2 {
            t += Duration::from_millis(100);
            c0 += 1;
            if pings(s.due(&[c0, 3], String::new, t)) > 0 {
                last_ping = t;
            }
        }
        assert!(last_ping < t0 + every + STALL, "pinged at {:?}", last_ping - t0);
        assert!(last_ping + every >= t0 + every + STALL - every, "stopped too early");
        // It recovers: pings resume at once.
        assert_eq!(pings(s.due(&[c0 + 1, 4], String::new, t + every)), 1);
    }

    #[test]
    fn status_lines() {
        let mut r = crate::sync::SystemReport {
            synced: true,
            why_unsynced: None,
            holdover: false,
            stratum: 2,
            refid: "192.0.2.1".into(),
            system_peer: Some("a.example (192.0.2.1)".into()),
            offset_s: 0.0,
            correction_s: 0.0,
            frequency_ppm: 0.0,
            root_delay_s: 0.0,
            root_dispersion_s: 0.0,
            leap: "normal".into(),
            last_update_unix_s: None,
            since_update_s: None,
            mode: "software".into(),
            kernel_frequency_ppm: 0.0,
            external_steps: 0,
            kernel_event: None,
            leap_note: None,
            leaps_applied: 0,
            refused: None,
            few_sources: None,
        };
        assert_eq!(
            status_line(&r),
            "serving stratum 2, synchronised to a.example (192.0.2.1)"
        );
        r.holdover = true;
        assert!(status_line(&r).contains("holdover"));
        r.synced = false;
        r.why_unsynced = Some("no source\nreachable".into());
        assert_eq!(status_line(&r), "serving unsynchronised (LI 3): no source reachable");
    }
}
