//! The local control socket: `gnomon stats` (and later sources/status/reload) ask the running
//! server over a Unix socket with mode 0600. Aggregation of worker stats happens here, off the
//! hot path.

pub mod clients;
pub mod metrics;
pub mod stats_view;

use crate::logging::Event;
use crate::server::stats::{Counter, WorkerStats};
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A command handler the daemon plugs in for commands beyond `stats` (e.g. sources, reload).
pub type Extra = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What the control socket can see.
pub struct ControlContext {
    pub stats: Vec<Arc<WorkerStats>>,
    pub started: Instant,
    pub rates: Mutex<stats_view::RateTracker>,
    pub extra: Option<Extra>,
    /// The busiest clients, from the workers' samples (`gnomon clients`).
    pub clients: Mutex<clients::ClientTable>,
    /// The AF_XDP program's and sockets' counters, when `io = "xdp"` runs.
    pub xdp: Option<Arc<crate::server::xdp::XdpCounters>>,
    /// With `[nts]`: the KE server's counts, shown by `stats`.
    pub ke: Option<Arc<crate::nts::server::KeStats>>,
}

impl ControlContext {
    pub fn new(stats: Vec<Arc<WorkerStats>>, extra: Option<Extra>) -> ControlContext {
        let n = stats.len();
        ControlContext {
            stats,
            started: Instant::now(),
            rates: Mutex::new(stats_view::RateTracker::new(n)),
            extra,
            clients: Mutex::new(clients::ClientTable::new(n)),
            xdp: None,
            ke: None,
        }
    }

    /// The answer to one request line (without its newline); always ends in a newline. Public
    /// so the fuzz target drives the dispatch without a socket.
    pub fn answer(&self, line: &str) -> String {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("stats") => {
                let snap = stats_view::collect(self);
                let rest: Vec<&str> = words.collect();
                if rest.contains(&"reset") {
                    self.stats.iter().for_each(|s| s.reset_histograms());
                }
                if rest.contains(&"json") {
                    serde_json::to_string_pretty(&snap).unwrap_or_default() + "\n"
                } else {
                    stats_view::render(&snap)
                }
            }
            Some("clients") => {
                let top = match words.next().map(str::parse::<usize>) {
                    None => 10,
                    Some(Ok(n)) if n > 0 => n,
                    Some(_) => return "error: `clients N` wants a positive count\n".to_string(),
                };
                let mut t = self.clients.lock().unwrap_or_else(|p| p.into_inner());
                t.drain(&self.stats);
                t.render(top)
            }
            Some(_) => match &self.extra {
                Some(f) => f(line).unwrap_or_else(|| format!("error: unknown command `{line}`\n")),
                None => format!("error: unknown command `{line}`\n"),
            },
            None => "error: empty command\n".to_string(),
        }
    }
}

/// The longest request line the server reads; commands are a few words.
pub const MAX_REQUEST_LINE: usize = 4096;
/// Clients served at once; one more is told the server is busy.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its line or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// The bound control socket, not yet served. Dropped unserved (the server failed to start),
/// it removes its socket file.
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    served: bool,
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        if !self.served {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket. Only a stale socket (no server answers on it) is removed first;
/// anything else at `path` is the operator's and stays, with a start-up error.
pub fn bind(path: &Path) -> io::Result<ControlListener> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(ctx)?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx(e)),
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ctx(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "a running server answers on it",
                )));
            }
            std::fs::remove_file(path).map_err(ctx)?;
        }
        Ok(m) => {
            let kind = if m.file_type().is_symlink() {
                "a symbolic link"
            } else if m.is_dir() {
                "a directory"
            } else if m.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            return Err(ctx(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "the path is {kind}, not a socket; it is left alone (remove it or set `control_socket` elsewhere)"
                ),
            )));
        }
    }
    // Unix sockets refused altogether (a seccomp profile, clknetsim's shim) read as Unsupported,
    // which the daemon tells from a path that is in the way.
    let listener = UnixListener::bind(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EAFNOSUPPORT) => io::Error::new(io::ErrorKind::Unsupported, e),
            _ => e,
        })
        .map_err(ctx)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(ctx)?;
    listener.set_nonblocking(true).map_err(ctx)?;
    Ok(ControlListener {
        listener,
        path: path.to_path_buf(),
        served: false,
    })
}

/// `gnomon explain ADDR`: the rule that decides for `ADDR` (with its line in `source`), what
/// that action does, and the client's rate-limit state now, read without changing it.
pub fn explain(policy: &crate::policy::PolicySet, source: &str, arg: &str, now_ns: i64) -> String {
    use crate::policy::Action;
    let Ok(ip) = arg.trim().parse::<std::net::IpAddr>() else {
        return format!("error: `{}` is not an IP address\n", arg.trim());
    };
    let m = policy.access.lookup(ip);
    let cfg = &policy.config;
    let at = |line: Option<&usize>| match line {
        Some(l) => format!("{source}:{l}"),
        None => source.to_string(),
    };
    let rule = match m.rule {
        Some(i) => {
            let r = &cfg.rules[i as usize];
            format!(
                "restrict {} action {} ({})",
                r.prefix,
                r.action,
                at(cfg.lines.rules.get(i as usize))
            )
        }
        None => match cfg.lines.default {
            Some(l) => format!("default action {} ({source}:{l})", cfg.default),
            None => format!("default action {} (no `default` rule: built in)", cfg.default),
        },
    };
    let what = match m.action {
        Action::Serve => "answered, never rate limited",
        Action::Exempt => "answered, never rate limited (exempt)",
        Action::Ignore => "dropped without an answer (counted as drop_ignored)",
        Action::Deny => "answered with Kiss-o'-Death DENY, those answers rate limited",
        Action::Limited => "answered within the rate limit",
        Action::NtsOnly => {
            "NTS-authenticated requests answered within the rate limit; plain ones dropped (counted as drop_not_nts)"
        }
    };
    let mut out = format!(
        "client          {ip}\nrule            {rule}\naction          {}: {what}\n",
        m.action
    );
    let rl = &cfg.rate_limit;
    if m.action.rate_limited() {
        let p = policy.limiter.peek(ip, now_ns as u64);
        let state = if !p.tracked {
            format!("idle: a burst of {} may come at once", rl.burst)
        } else if p.burst_left > 0 {
            format!(
                "{} more back to back within the limit (backlog {:.3} s)",
                p.burst_left, p.backlog_s
            )
        } else {
            format!(
                "over the limit: its requests are {} for {:.3} s more",
                if rl.kod {
                    "dropped (one KoD RATE per window)"
                } else {
                    "dropped"
                },
                p.conforms_in_s
            )
        };
        let _ = writeln!(
            out,
            "rate limit      {state}; limit {} s interval, burst {}, leak 1 in {}",
            rl.interval, rl.burst, rl.leak
        );
    } else {
        out.push_str("rate limit      not applied to this action\n");
    }
    out
}

/// Receive-queue overflow, from the counters the workers publish (never on the hot path): one
/// line when the kernel starts dropping requests, one when it has not for [`OVERLOAD_QUIET_NS`].
#[derive(Default, Debug)]
pub struct OverloadWatch {
    last: Option<(u64, i64)>,
    /// The episode under way: drops counted before it, and the last time the count rose.
    episode: Option<(u64, i64)>,
}

/// An overload ends after this long without a receive-queue drop.
pub const OVERLOAD_QUIET_NS: i64 = 60_000_000_000;

impl OverloadWatch {
    /// `drops` is the `drop_kernel_rx_queue` total now; looked at once a second.
    pub fn tick(&mut self, drops: u64, now_ns: i64) -> Option<Event> {
        let Some((before, at)) = self.last else {
            self.last = Some((drops, now_ns));
            return None;
        };
        if now_ns - at < 1_000_000_000 {
            return None;
        }
        self.last = Some((drops, now_ns));
        match self.episode {
            None if drops > before => {
                self.episode = Some((before, now_ns));
                Some(Event::warn(
                    "overload",
                    "",
                    format!(
                        "overload: the kernel dropped {} requests in {:.1} s (receive queue full, drop_kernel_rx_queue); \
                         the workers cannot keep up",
                        drops - before,
                        (now_ns - at) as f64 * 1e-9
                    ),
                ))
            }
            Some((start, _)) if drops > before => {
                self.episode = Some((start, now_ns));
                None
            }
            Some((start, last)) if now_ns - last >= OVERLOAD_QUIET_NS => {
                self.episode = None;
                Some(Event::info(
                    "overload",
                    "",
                    format!(
                        "overload over: no receive-queue drop for {} s ({} dropped in all)",
                        OVERLOAD_QUIET_NS / 1_000_000_000,
                        drops - start
                    ),
                ))
            }
            _ => None,
        }
    }
}

/// Counts a client thread for as long as it lives.
struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ControlListener {
    /// Serves the socket until `stop`: the accept loop on its own thread, each client on a
    /// thread of its own (at most [`MAX_CLIENTS`]), so a client that sends nothing holds only
    /// itself, and only for [`CLIENT_TIMEOUT`].
    pub fn spawn(mut self, ctx: Arc<ControlContext>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
        let listener = self.listener.try_clone()?;
        let path = self.path.clone();
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("gnomon-control".into())
            .spawn(move || {
                let mut overload = OverloadWatch::default();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut r) = ctx.rates.lock() {
                        r.tick(&ctx.stats);
                    }
                    if let Ok(mut t) = ctx.clients.lock() {
                        t.drain(&ctx.stats);
                    }
                    let drops = ctx.stats.iter().map(|s| s.get(Counter::KernelRxQueue)).sum();
                    if let Some(e) = overload.tick(drops, ctx.started.elapsed().as_nanos() as i64) {
                        crate::logging::state_change(e);
                    }
                    match listener.accept() {
                        Ok((stream, _)) => serve_client(stream, &ctx, &active),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => {
                            log::warn!("control socket: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
                let _ = std::fs::remove_file(&path);
            })
            .inspect(|_| self.served = true)
    }
}

fn serve_client(stream: UnixStream, ctx: &Arc<ControlContext>, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
        active.fetch_sub(1, Ordering::Relaxed);
        // Never wait on a client here: one that does not read loses the answer.
        let _ = stream.set_nonblocking(true);
        let _ = (&stream).write_all(b"error: too many control clients at once, try again\n");
        return;
    }
    let slot = ClientSlot(active.clone());
    let ctx = ctx.clone();
    let spawned = std::thread::Builder::new()
        .name("gnomon-control-client".into())
        .spawn(move || {
            let _slot = slot;
            let _ = handle_client(stream, &ctx);
        });
    if let Err(e) = spawned {
        log::warn!("control socket: no thread for a client: {e}");
    }
}

fn handle_client(stream: UnixStream, ctx: &ControlContext) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_REQUEST_LINE as u64 + 1)).read_until(b'\n', &mut line)?;
    // A full-length line with its newline is `MAX_REQUEST_LINE + 1` bytes and is fine.
    let reply = if line.len() > MAX_REQUEST_LINE && !line.ends_with(b"\n") {
        format!("error: request line longer than {MAX_REQUEST_LINE} bytes\n")
    } else {
        match std::str::from_utf8(&line) {
            Ok(l) => ctx.answer(l.trim()),
            Err(_) => "error: request is not UTF-8\n".to_string(),
        }
    };
    (&stream).write_all(reply.as_bytes())
}

/// Sends one command to a running server and returns its answer.
pub fn request(path: &Path, command: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot reach the server at {}: {e}", path.display())))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    io::Read::read_to_string(&mut s, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_gives_one_line_when_drops_start_and_one_when_they_stop() {
        const S: i64 = 1_000_000_000;
        let mut w = OverloadWatch::default();
        let mut lines = Vec::new();
        let mut drops = 0;
        // Quiet, then five minutes dropping every second, then quiet again; ticked every 50 ms.
        for t in 0..(20 * 60 * 10) {
            let now = t * S / 20;
            if (60 * S..360 * S).contains(&now) {
                drops += 3;
            }
            lines.extend(w.tick(drops, now));
        }
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].level, log::Level::Warn);
        assert!(lines[0].text.starts_with("overload: the kernel dropped"), "{lines:?}");
        assert_eq!(lines[1].level, log::Level::Info);
        assert!(
            lines[1].text.contains(&format!("({drops} dropped in all)")),
            "{lines:?}"
        );
    }
}
