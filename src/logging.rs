//! A small stderr logger: level from `GNOMON_LOG` (error, warn, info, debug, trace), default info.
//! Nothing logs per packet; this only carries start-up, state changes and errors. State changes
//! go through one shared [`Limiter`], so a flapping source or a storm of events cannot flood the
//! log. Under systemd (stderr is the journal: `JOURNAL_STREAM` is set) each line starts with its
//! syslog priority, `<4>` for a warning, which journald turns into the entry's priority.

use std::sync::Mutex;
use std::time::Instant;

struct StderrLogger {
    journal: bool,
}

/// The syslog priority journald reads from a `<N>` prefix (sd-daemon(3)).
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether stderr is the stream `JOURNAL_STREAM` (`DEVICE:INODE`, systemd.exec(5)) names: set by
/// systemd for the service, it is inherited by anything the service starts with its stderr
/// elsewhere, so the variable alone is not enough.
fn stderr_is_journal(var: Option<&str>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = var.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// One log line. journald adds the time, name and pid itself, so the journal line carries the
/// priority instead.
fn format_line(level: log::Level, msg: &std::fmt::Arguments, journal: bool) -> String {
    if journal {
        format!("<{}>{msg}", priority(level))
    } else {
        format!(
            "gnomon[{}] {}: {msg}",
            std::process::id(),
            level.as_str().to_lowercase()
        )
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("{}", format_line(r.level(), r.args(), self.journal));
        }
    }

    fn flush(&self) {}
}

static LOGGER: std::sync::OnceLock<StderrLogger> = std::sync::OnceLock::new();

pub fn init() {
    let level = std::env::var("GNOMON_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger = LOGGER.get_or_init(|| StderrLogger {
        journal: stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

/// A state change worth one log line: `kind` and `key` (a source's name, or empty) decide what
/// the rate limit counts together.
#[derive(Clone, PartialEq, Debug)]
pub struct Event {
    pub level: log::Level,
    pub kind: &'static str,
    pub key: String,
    pub text: String,
}

impl Event {
    pub fn warn(kind: &'static str, key: &str, text: String) -> Event {
        Event {
            level: log::Level::Warn,
            kind,
            key: key.to_string(),
            text,
        }
    }

    pub fn info(kind: &'static str, key: &str, text: String) -> Event {
        Event {
            level: log::Level::Info,
            kind,
            key: key.to_string(),
            text,
        }
    }
}

/// Lines one (kind, key) may write at once: a source lost and back within a minute is said
/// as it happens; past that, one line per [`WINDOW_NS`].
pub const BURST: u32 = 3;
/// One more line per (kind, key) per window, up to [`BURST`].
pub const WINDOW_NS: i64 = 60_000_000_000;
/// (kind, key) pairs remembered; past this the oldest is forgotten, so memory stays fixed
/// whatever the keys are.
const SLOTS: usize = 256;

#[derive(Clone, Debug)]
struct Slot {
    kind: &'static str,
    key: String,
    tokens: u32,
    /// When the last token came (or the slot was made).
    refilled_ns: i64,
    suppressed: u64,
    /// The last suppressed event: it is the current state, so the summary says it.
    pending: Option<Event>,
}

impl Slot {
    fn refill(&mut self, now_ns: i64) {
        let due = (now_ns - self.refilled_ns).max(0) / WINDOW_NS;
        if due > 0 {
            self.tokens = (self.tokens as i64 + due).min(BURST.into()) as u32;
            self.refilled_ns += due * WINDOW_NS;
        }
        if self.tokens == BURST {
            self.refilled_ns = now_ns;
        }
    }
}

/// The rate limit of state-change lines, on the caller's clock (sans-IO: tests drive it on
/// virtual time): a token bucket per (kind, key), [`BURST`] lines at once and one per
/// [`WINDOW_NS`] after that. What it holds back is summed up by [`Limiter::flush`] in one line
/// with the latest of the held-back events and their count, so the log always ends on the true
/// state.
#[derive(Default, Debug)]
pub struct Limiter {
    slots: Vec<Slot>,
}

impl Limiter {
    /// Appends the line to write now for `e`, if it is not held back.
    pub fn offer(&mut self, e: Event, now_ns: i64, out: &mut Vec<(log::Level, String)>) {
        let i = match self.slots.iter().position(|s| s.kind == e.kind && s.key == e.key) {
            Some(i) => i,
            None => {
                if self.slots.len() >= SLOTS
                    && let Some(oldest) = (0..self.slots.len()).min_by_key(|&i| self.slots[i].refilled_ns)
                {
                    self.slots.swap_remove(oldest);
                }
                self.slots.push(Slot {
                    kind: e.kind,
                    key: e.key.clone(),
                    tokens: BURST,
                    refilled_ns: now_ns,
                    suppressed: 0,
                    pending: None,
                });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[i];
        s.refill(now_ns);
        if s.tokens == 0 {
            s.suppressed += 1;
            s.pending = Some(e);
            return;
        }
        s.tokens -= 1;
        // A summary due but not yet written: this line is newer, so only the count stays.
        let held = std::mem::take(&mut s.suppressed);
        s.pending = None;
        out.push((e.level, with_count(&e.text, held)));
    }

    /// Summaries of held-back events, for pairs that may write again.
    pub fn flush(&mut self, now_ns: i64, out: &mut Vec<(log::Level, String)>) {
        for s in &mut self.slots {
            s.refill(now_ns);
            if s.tokens > 0
                && let Some(e) = s.pending.take()
            {
                s.tokens -= 1;
                out.push((e.level, with_count(&e.text, std::mem::take(&mut s.suppressed) - 1)));
            }
        }
    }
}

fn with_count(text: &str, held: u64) -> String {
    match held {
        0 => text.to_string(),
        n => format!("{text} ({n} more like it suppressed in the last minute)"),
    }
}

struct Shared {
    limiter: Limiter,
    origin: Instant,
}

static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

/// Runs `f` on the process's limiter with its clock, then writes what it let out.
fn with_shared(f: impl FnOnce(&mut Limiter, i64, &mut Vec<(log::Level, String)>)) {
    let mut out = Vec::new();
    {
        let mut g = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        let s = g.get_or_insert_with(|| Shared {
            limiter: Limiter::default(),
            origin: Instant::now(),
        });
        let now = s.origin.elapsed().as_nanos() as i64;
        // Far from zero, so the first line of every pair goes out.
        f(&mut s.limiter, now + WINDOW_NS, &mut out);
    }
    for (level, line) in out {
        log::log!(level, "{line}");
    }
}

/// Logs a state change through the process's shared rate limit.
pub fn state_change(e: Event) {
    with_shared(|l, now, out| l.offer(e, now, out));
}

/// Writes the summaries that are due; callers tick it about once a second.
pub fn flush_suppressed() {
    with_shared(|l, now, out| l.flush(now, out));
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn a_flood_gives_a_bounded_number_of_lines_and_ends_on_the_true_state() {
        let mut l = Limiter::default();
        let mut out = Vec::new();
        // Three sources flapping ten times a second for ten minutes, and a flush every second.
        let mut n = 0;
        for t in 0..6000 {
            let now = t * S / 10;
            for src in ["a", "b", "c"] {
                let up = t % 2 == 0;
                let e = if up {
                    Event::info("reach", src, format!("source {src} reachable"))
                } else {
                    Event::warn("reach", src, format!("source {src} unreachable"))
                };
                l.offer(e, now, &mut out);
                n += 1;
            }
            if t % 10 == 0 {
                l.flush(now, &mut out);
            }
        }
        l.flush(700 * S, &mut out);
        assert_eq!(n, 18_000);
        // Per source: the burst, then one line a minute for ten minutes, and a final summary.
        let most = 3 * (BURST as usize + 10 + 1);
        assert!(out.len() <= most, "{} lines: {out:#?}", out.len());
        assert!(out.len() >= 3 * 10, "{} lines", out.len());
        let last_a = out.iter().rev().find(|l| l.1.starts_with("source a")).unwrap();
        // The last event was t = 5999, odd: unreachable, and a warning.
        assert_eq!(last_a.0, log::Level::Warn, "{last_a:?}");
        assert!(last_a.1.starts_with("source a unreachable ("), "{last_a:?}");
        assert!(last_a.1.contains("more like it suppressed"), "{last_a:?}");
    }

    #[test]
    fn a_burst_goes_out_at_once_then_one_a_minute_per_kind_and_key() {
        let mut l = Limiter::default();
        let mut out = Vec::new();
        let flap = |l: &mut Limiter, out: &mut Vec<_>, key: &str, n: i64, at: i64| {
            for k in 0..n {
                let text = format!("{key} {}", if k % 2 == 0 { "down" } else { "up" });
                l.offer(Event::warn("reach", key, text), at + k, out);
            }
        };
        flap(&mut l, &mut out, "a", 5, 0);
        assert_eq!(out.len(), BURST as usize, "{out:?}");
        flap(&mut l, &mut out, "b", 1, 0);
        l.offer(Event::warn("select", "a", "a deselected".into()), 0, &mut out);
        assert_eq!(out.len(), BURST as usize + 2, "other keys and kinds are counted apart");
        l.flush(30 * S, &mut out);
        assert_eq!(out.len(), BURST as usize + 2, "no token yet");
        l.flush(61 * S, &mut out);
        assert_eq!(
            out.last().unwrap().1,
            "a down (1 more like it suppressed in the last minute)",
            "the latest held-back state, with the count of the others"
        );
        l.flush(400 * S, &mut out);
        assert_eq!(out.len(), BURST as usize + 3, "nothing more held back");
        flap(&mut l, &mut out, "a", 3, 400 * S);
        assert_eq!(out.len(), BURST as usize + 6, "the bucket filled up again meanwhile");
    }

    #[test]
    fn memory_stays_fixed_whatever_the_keys() {
        let mut l = Limiter::default();
        let mut out = Vec::new();
        for i in 0..10_000 {
            l.offer(Event::warn("dns", &format!("n{i}"), "x".into()), i, &mut out);
        }
        assert_eq!(l.slots.len(), SLOTS);
    }

    #[test]
    fn journal_lines_carry_the_priority() {
        let line = format_line(log::Level::Warn, &format_args!("source a unreachable"), true);
        assert_eq!(line, "<4>source a unreachable");
        assert!(format_line(log::Level::Info, &format_args!("x"), false).ends_with("info: x"));
        assert_eq!(priority(log::Level::Info), 6);
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata("/proc/self/fd/2").unwrap();
        assert!(stderr_is_journal(Some(&format!("{}:{}", m.dev(), m.ino()))));
        assert!(!stderr_is_journal(Some(&format!("{}:{}", m.dev(), m.ino() + 1))));
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
    }
}
