//! `gnomon query`: one SNTP exchange with a server, and what it said, for operators.

use crate::clock::realtime_ns;
use crate::proto::{Header, LeapIndicator, Mode, NtpTimestamp};
use std::fmt::Write;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

/// The outcome of one exchange.
#[derive(Clone, Debug)]
pub struct QueryResult {
    pub server: SocketAddr,
    pub reply: Header,
    /// Seconds; server clock minus ours.
    pub offset: f64,
    /// Seconds, round trip minus server processing.
    pub delay: f64,
}

#[derive(Debug)]
pub enum QueryError {
    Resolve(String),
    Io(io::Error),
    Timeout,
    /// A reply came that is not an answer to our request.
    BadReply(&'static str),
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Resolve(m) => write!(f, "cannot resolve: {m}"),
            QueryError::Io(e) => write!(f, "{e}"),
            QueryError::Timeout => write!(f, "no reply (timed out)"),
            QueryError::BadReply(why) => write!(f, "invalid reply: {why}"),
        }
    }
}

impl std::error::Error for QueryError {}

/// `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address; port 123 by default.
pub fn resolve(target: &str) -> Result<SocketAddr, QueryError> {
    if let Ok(a) = crate::config::parse_listen(target) {
        return Ok(a);
    }
    let with_port = if target.contains(':') {
        target.to_string()
    } else {
        format!("{target}:123")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| QueryError::Resolve(format!("{target}: {e}")))?
        .next()
        .ok_or_else(|| QueryError::Resolve(format!("{target}: no address")))
}

/// Sends one NTPv`version` client request and waits for the matching reply.
pub fn query(server: SocketAddr, version: u8, timeout: Duration) -> Result<QueryResult, QueryError> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind).map_err(QueryError::Io)?;
    sock.connect(server).map_err(QueryError::Io)?;
    sock.set_read_timeout(Some(timeout)).map_err(QueryError::Io)?;
    let t1_ns = realtime_ns();
    let t1 = NtpTimestamp::from_unix_nanos(t1_ns as i128);
    let req = Header {
        version,
        mode: Mode::Client,
        transmit_timestamp: t1,
        ..Header::default()
    };
    sock.send(&req.to_bytes()).map_err(QueryError::Io)?;
    let mut buf = [0u8; 1500];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(QueryError::Timeout);
            }
            Err(e) => return Err(QueryError::Io(e)),
        };
        let t4_ns = realtime_ns();
        let Ok(reply) = Header::decode(&buf[..n]) else { continue };
        if reply.origin_timestamp != t1 {
            // Not ours (late reply to someone else, or spoofed): keep waiting.
            continue;
        }
        if reply.mode != Mode::Server {
            return Err(QueryError::BadReply("mode is not 4 (server)"));
        }
        let pivot = t1_ns / 1_000_000_000;
        let t2 = reply.receive_timestamp.to_unix_nanos(pivot) as f64 * 1e-9;
        let t3 = reply.transmit_timestamp.to_unix_nanos(pivot) as f64 * 1e-9;
        let (t1s, t4s) = (t1_ns as f64 * 1e-9, t4_ns as f64 * 1e-9);
        return Ok(QueryResult {
            server,
            reply,
            offset: ((t2 - t1s) + (t3 - t4s)) / 2.0,
            delay: (t4s - t1s) - (t3 - t2),
        });
    }
}

/// The operator's view of a reply.
pub fn render(r: &QueryResult) -> String {
    let h = &r.reply;
    let mut out = String::new();
    let _ = writeln!(out, "server          {}", r.server);
    if h.is_refusal()
        && let Some(code) = h.kiss_code()
    {
        let _ = writeln!(
            out,
            "kiss code       {} (Kiss-o'-Death: the server refuses to serve this client)",
            code.display(0)
        );
        return out;
    }
    let li = match h.leap {
        LeapIndicator::NoWarning => "0 (no warning)",
        LeapIndicator::AddSecond => "1 (leap second will be inserted)",
        LeapIndicator::DeleteSecond => "2 (leap second will be deleted)",
        LeapIndicator::Unsynchronized => "3 (unsynchronised: clients must not use this time)",
    };
    let _ = writeln!(out, "offset          {:+.6} s", r.offset);
    let _ = writeln!(out, "delay           {:.6} s", r.delay);
    let stratum = if h.stratum == 0 {
        "0 (unspecified)".to_string()
    } else {
        h.stratum.to_string()
    };
    let _ = writeln!(out, "stratum         {stratum}");
    let _ = writeln!(out, "refid           {}", h.reference_id.display(h.stratum));
    let _ = writeln!(out, "leap indicator  {li}");
    let _ = writeln!(out, "version         {}", h.version);
    let _ = writeln!(
        out,
        "precision       {} (2^{} s)",
        fmt_secs(2f64.powi(h.precision as i32)),
        h.precision
    );
    let _ = writeln!(out, "root delay      {}", fmt_secs(h.root_delay.to_seconds_f64()));
    let _ = writeln!(out, "root dispersion {}", fmt_secs(h.root_dispersion.to_seconds_f64()));
    out
}

fn fmt_secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.3} us", s * 1e6)
    } else {
        format!("{:.3} ms", s * 1e3)
    }
}
