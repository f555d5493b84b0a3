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
    /// With `--nts`: what the key exchange and the authenticated reply gave.
    pub nts: Option<NtsResult>,
}

/// The NTS side of a `query --nts`.
#[derive(Clone, Debug)]
pub struct NtsResult {
    pub ke_server: SocketAddr,
    pub aead: u16,
    /// Cookies from the key exchange, and in the authenticated reply.
    pub ke_cookies: usize,
    pub reply_cookies: usize,
}

/// Where and how to run NTS-KE for `query --nts`.
#[derive(Clone, Debug)]
pub struct NtsQuery {
    /// The name the certificate must carry (the host as given).
    pub server_name: String,
    pub ke_port: u16,
    /// Trust anchors (PEM); the system's roots by default.
    pub ca: std::path::PathBuf,
}

#[derive(Debug)]
pub enum QueryError {
    Resolve(String),
    Io(io::Error),
    Timeout,
    /// A reply came that is not an answer to our request.
    BadReply(&'static str),
    /// NTS-KE failed (TLS, certificate, records).
    KeyExchange(String),
    /// The server refused the cookie (NTS NAK, kiss code NTSN).
    Nak,
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Resolve(m) => write!(f, "cannot resolve: {m}"),
            QueryError::Io(e) => write!(f, "{e}"),
            QueryError::Timeout => write!(f, "no reply (timed out)"),
            QueryError::BadReply(why) => write!(f, "invalid reply: {why}"),
            QueryError::KeyExchange(why) => write!(f, "NTS-KE: {why}"),
            QueryError::Nak => write!(f, "NTS NAK (kiss code NTSN): the server refused the cookie"),
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
    exchange(server, version, timeout, None)
}

/// The host part of `HOST`, `HOST:PORT` or `[V6]:PORT`: the name a certificate is checked for.
pub fn host_of(target: &str) -> &str {
    if let Some(rest) = target.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match target.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
        _ => target,
    }
}

/// One NTS-KE with `target`'s host at `nts.ke_port`, then one authenticated exchange with the NTP
/// server it names (or `target` itself).
pub fn query_nts(target: SocketAddr, nts: &NtsQuery, timeout: Duration) -> Result<QueryResult, QueryError> {
    use crate::nts::ke_client;
    let ke_server = SocketAddr::new(target.ip(), nts.ke_port);
    let roots = ke_client::roots(&nts.ca).map_err(|e| QueryError::KeyExchange(e.to_string()))?;
    let ke = ke_client::key_exchange(ke_server, &nts.server_name, roots, timeout)
        .map_err(|e| QueryError::KeyExchange(e.to_string()))?;
    let server = match &ke.ntp_server {
        Some(host) => resolve_with_port(host, ke.ntp_port.unwrap_or(123))?,
        None => SocketAddr::new(target.ip(), ke.ntp_port.unwrap_or(target.port())),
    };
    let (aead, ke_cookies) = (ke.aead, ke.cookies.len());
    let mut session = crate::nts::client::Session::new(ke);
    let mut r = exchange(server, 4, timeout, Some(&mut session))?;
    if let Some(n) = &mut r.nts {
        (n.ke_server, n.aead, n.ke_cookies) = (ke_server, aead, ke_cookies);
    }
    Ok(r)
}

fn resolve_with_port(host: &str, port: u16) -> Result<SocketAddr, QueryError> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, port)),
        Err(_) => (host, port)
            .to_socket_addrs()
            .map_err(|e| QueryError::Resolve(format!("{host}: {e}")))?
            .next()
            .ok_or_else(|| QueryError::Resolve(format!("{host}: no address"))),
    }
}

fn exchange(
    server: SocketAddr,
    version: u8,
    timeout: Duration,
    mut nts: Option<&mut crate::nts::client::Session>,
) -> Result<QueryResult, QueryError> {
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
    let (bytes, pending) = match nts.as_deref_mut() {
        Some(s) => {
            let uid = crate::nts::ke_client::random();
            let (b, p) = s
                .request(&req.to_bytes(), uid, crate::nts::ke_client::random())
                .ok_or_else(|| QueryError::KeyExchange("no cookie".into()))?;
            (b, Some(p))
        }
        None => (req.to_bytes().to_vec(), None),
    };
    sock.send(&bytes).map_err(QueryError::Io)?;
    let mut buf = [0u8; 1500];
    let mut nts_result = None;
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
        if let (Some(s), Some(p)) = (nts.as_deref_mut(), &pending) {
            match s.reply(&buf[..n], p) {
                Ok(cookies) => {
                    nts_result = Some(NtsResult {
                        ke_server: server,
                        aead: s.ke.aead,
                        ke_cookies: 0,
                        reply_cookies: cookies,
                    })
                }
                Err(crate::nts::client::ReplyError::Nak) => return Err(QueryError::Nak),
                // An unauthenticated answer is no answer: a spoofer may have sent it.
                Err(_) => continue,
            }
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
            nts: nts_result,
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
    if let Some(n) = &r.nts {
        let aead = match n.aead {
            crate::nts::ke::AEAD_AES_SIV_CMAC_256 => "AEAD_AES_SIV_CMAC_256".to_string(),
            id => format!("AEAD {id}"),
        };
        let _ = writeln!(out, "nts             authenticated ({aead}), NTS-KE {}", n.ke_server);
        let _ = writeln!(
            out,
            "cookies         {} from NTS-KE, {} in the reply",
            n.ke_cookies, n.reply_cookies
        );
    }
    out
}

fn fmt_secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.3} us", s * 1e6)
    } else {
        format!("{:.3} ms", s * 1e3)
    }
}
