//! The local control socket: `gnomon stats` (and later sources/status/reload) ask the running
//! server over a Unix socket with mode 0600. Aggregation of worker stats happens here, off the
//! hot path.

pub mod stats_view;

use crate::server::stats::WorkerStats;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
}

impl ControlContext {
    pub fn new(stats: Vec<Arc<WorkerStats>>, extra: Option<Extra>) -> ControlContext {
        let n = stats.len();
        ControlContext {
            stats,
            started: Instant::now(),
            rates: Mutex::new(stats_view::RateTracker::new(n)),
            extra,
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
            Some(_) => match &self.extra {
                Some(f) => f(line).unwrap_or_else(|| format!("error: unknown command `{line}`\n")),
                None => format!("error: unknown command `{line}`\n"),
            },
            None => "error: empty command\n".to_string(),
        }
    }
}

/// Serves the control socket on its own thread until `stop`.
pub fn spawn(path: &Path, ctx: Arc<ControlContext>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a process that died is in the way; a live one is not ours to take.
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("gnomon-control".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut r) = ctx.rates.lock() {
                    r.tick(&ctx.stats);
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = handle_client(stream, &ctx);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => {
                        log::warn!("control socket: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        })
}

fn handle_client(stream: UnixStream, ctx: &ControlContext) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply = ctx.answer(line.trim());
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
