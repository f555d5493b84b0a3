//! NTS-KE over TLS 1.3 (rustls, ALPN `ntske/1`) on its own threads, and the master keys that it
//! and the NTP workers share. Bounded: at most `max_connections` at once, each with a deadline.

use super::NtsConfig;
use super::cookie::{COOKIE_LEN, CookieJar, KEY_LEN, KeySet, NewCookies, SessionKeys, epoch_at};
use super::ke::{self, EXPORTER_LABEL, Negotiation, Outcome};
use crate::policy::{Action, Limit, SharedPolicy};
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

pub const ALPN: &[u8] = b"ntske/1";

/// The master keys in force, published to the workers like the policy: one atomic load of the
/// generation per batch, a full load only when it changed.
pub struct SharedKeys {
    current: ArcSwap<KeySet>,
    generation: AtomicU64,
}

impl SharedKeys {
    pub fn new(keys: KeySet) -> SharedKeys {
        SharedKeys {
            current: ArcSwap::from_pointee(keys),
            generation: AtomicU64::new(1),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn load(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    pub fn replace(&self, keys: KeySet) -> u64 {
        self.current.store(Arc::new(keys));
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads the fleet secret, refusing a file others may read (it opens every cookie of the fleet).
pub fn read_secret(path: &Path) -> io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: the NTS secret must not be readable by group or others (chmod 600)",
                path.display()
            ),
        ));
    }
    let secret = std::fs::read(path)?;
    if secret.len() < 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: the NTS secret needs at least 32 bytes", path.display()),
        ));
    }
    Ok(secret)
}

/// The TLS 1.3-only server config with ALPN `ntske/1`, from PEM files.
pub fn tls_config(certificate: &Path, private_key: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    let bad = |p: &Path, e: String| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(|e| bad(certificate, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(certificate, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(certificate, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(private_key).map_err(|e| bad(private_key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(certificate, e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The TLS config in force, swapped in whole when the certificate is re-read (certificates are
/// renewed every few months; a connection in progress keeps the config it started with).
pub struct Certificate {
    current: ArcSwap<rustls::ServerConfig>,
    certificate: std::path::PathBuf,
    private_key: std::path::PathBuf,
}

impl Certificate {
    /// Re-reads the PEM files of the running config; on any error the old certificate stays.
    pub fn reload(&self) -> io::Result<()> {
        let fresh = tls_config(&self.certificate, &self.private_key)?;
        self.current.store(fresh);
        Ok(())
    }

    fn load(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }
}

/// What became of one KE connection. Flat and `Copy`, so each connection counts one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
pub enum KeOutcome {
    /// Cookies sent.
    Served,
    /// Closed at once: `max_connections` were in service.
    RefusedBusy,
    /// Closed at once by an `ignore` or `deny` rule.
    RefusedPolicy,
    /// Closed at once by the rate limiter (`limited`, `nts-only`).
    RateLimited,
    /// TLS failed: not TLS 1.3, no ALPN `ntske/1`, a bad ClientHello, a refused certificate.
    HandshakeFailed,
    /// The exchange did not end within `timeout` (a slow or silent client).
    Timeout,
    /// A malformed or too long KE request, or one answered with an Error record or no cookie.
    BadRequest,
    /// The client went away (EOF, reset) before the response was sent.
    Closed,
}

impl KeOutcome {
    pub const COUNT: usize = 8;
    pub const ALL: [KeOutcome; KeOutcome::COUNT] = [
        KeOutcome::Served,
        KeOutcome::RefusedBusy,
        KeOutcome::RefusedPolicy,
        KeOutcome::RateLimited,
        KeOutcome::HandshakeFailed,
        KeOutcome::Timeout,
        KeOutcome::BadRequest,
        KeOutcome::Closed,
    ];

    /// The counter's name in `gnomon stats`; the metric's `outcome` label is the part after `ke_`.
    pub const fn name(self) -> &'static str {
        match self {
            KeOutcome::Served => "ke_served",
            KeOutcome::RefusedBusy => "ke_refused_busy",
            KeOutcome::RefusedPolicy => "ke_refused_policy",
            KeOutcome::RateLimited => "ke_rate_limited",
            KeOutcome::HandshakeFailed => "ke_handshake_failed",
            KeOutcome::Timeout => "ke_timeout",
            KeOutcome::BadRequest => "ke_bad_request",
            KeOutcome::Closed => "ke_closed_early",
        }
    }

    /// Why an exchange failed, from the I/O error it ended with.
    fn of_io(e: &io::Error) -> KeOutcome {
        match e.kind() {
            // A socket timeout shows as EAGAIN (WouldBlock) on Linux.
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => KeOutcome::Timeout,
            _ => KeOutcome::Closed,
        }
    }
}

/// Counts of the KE server, for the control socket and the metrics endpoint.
#[derive(Default)]
pub struct KeStats {
    /// Connections accepted from the kernel; each ends in exactly one outcome.
    pub accepted: AtomicU64,
    outcomes: [AtomicU64; KeOutcome::COUNT],
}

impl KeStats {
    pub fn count(&self, o: KeOutcome) {
        self.outcomes[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: KeOutcome) -> u64 {
        self.outcomes[o as usize].load(Ordering::Relaxed)
    }

    /// `ke_accepted` and every outcome by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut v = vec![("ke_accepted", self.accepted.load(Ordering::Relaxed))];
        v.extend(KeOutcome::ALL.iter().map(|&o| (o.name(), self.get(o))));
        v
    }
}

/// Everything bound and read before privileges are dropped.
pub struct Prepared {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    secret: Vec<u8>,
    config: NtsConfig,
}

impl Prepared {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the KE port and reads the certificate, key and secret (as root, if started so).
pub fn prepare(config: &NtsConfig) -> io::Result<Prepared> {
    super::check_cpu()?;
    let tls = tls_config(&config.certificate, &config.private_key)?;
    let secret = match &config.secret_file {
        Some(p) => read_secret(p)?,
        None => {
            let mut s = vec![0u8; 32];
            getrandom::fill(&mut s).map_err(|e| io::Error::other(e.to_string()))?;
            s
        }
    };
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| io::Error::new(e.kind(), format!("NTS-KE listen {}: {e}", config.listen)))?;
    Ok(Prepared {
        listener,
        tls,
        secret,
        config: config.clone(),
    })
}

/// The running KE server: its accept thread and the key rotation thread.
pub struct KeServer {
    pub keys: Arc<SharedKeys>,
    pub certificate: Arc<Certificate>,
    pub stats: Arc<KeStats>,
    pub local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl KeServer {
    pub fn is_finished(&self) -> bool {
        self.threads.iter().any(|t| t.is_finished())
    }

    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts the accept and key rotation threads; both end when `stop` is set. Each connection
/// meets the access table and rate limiter of `policy` first, as an NTP request would.
pub fn spawn(p: Prepared, policy: Arc<SharedPolicy>, stop: Arc<AtomicBool>) -> io::Result<KeServer> {
    let period = p.config.key_rotation.as_secs().max(1);
    let kept = p.config.keys_kept;
    let mut epoch = epoch_at(unix_now(), period);
    let keys = Arc::new(SharedKeys::new(KeySet::derive(&p.secret, epoch, kept)));
    let stats = Arc::new(KeStats::default());
    let local_addr = p.listener.local_addr()?;
    let certificate = Arc::new(Certificate {
        current: ArcSwap::new(p.tls),
        certificate: p.config.certificate.clone(),
        private_key: p.config.private_key.clone(),
    });
    // Accept with a timeout so the thread notices `stop`.
    p.listener.set_nonblocking(true)?;
    let mut threads = Vec::new();
    {
        let (keys, stop, secret) = (keys.clone(), stop.clone(), p.secret);
        threads.push(std::thread::Builder::new().name("nts-keys".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = epoch_at(unix_now(), period);
                if now != epoch {
                    epoch = now;
                    let set = KeySet::derive(&secret, epoch, kept);
                    log::info!("NTS master key rotated: key id {}", set.current_id());
                    keys.replace(set);
                }
            }
        })?);
    }
    {
        let (keys, stats, stop) = (keys.clone(), stats.clone(), stop);
        let (listener, tls, config) = (p.listener, certificate.clone(), p.config);
        threads.push(
            std::thread::Builder::new()
                .name("nts-ke".into())
                .spawn(move || accept_loop(listener, tls, config, keys, policy, stats, stop))?,
        );
    }
    Ok(KeServer {
        keys,
        certificate,
        stats,
        local_addr,
        threads,
    })
}

fn accept_loop(
    listener: TcpListener,
    tls: Arc<Certificate>,
    config: NtsConfig,
    keys: Arc<SharedKeys>,
    policy: Arc<SharedPolicy>,
    stats: Arc<KeStats>,
    stop: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let negotiation = Arc::new(Negotiation {
        server: config.ntp_server.clone(),
        port: config.ntp_port,
    });
    let mut last_error_log: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                // EMFILE and the like: logged at most once a minute, then retried after a pause.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    log::warn!("NTS-KE accept: {e}");
                    last_error_log = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if let Err(refused) = admitted(&policy, peer.ip()) {
            stats.count(refused);
            drop(stream);
            continue;
        }
        if active.load(Ordering::Acquire) >= config.max_connections {
            stats.count(KeOutcome::RefusedBusy);
            drop(stream);
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (c_tls, c_keys, c_stats, c_active, c_negotiation) = (
            tls.load(),
            keys.clone(),
            stats.clone(),
            active.clone(),
            negotiation.clone(),
        );
        let timeout = config.timeout;
        let spawned = std::thread::Builder::new().name("nts-ke-conn".into()).spawn(move || {
            let outcome = serve_connection(stream, c_tls, &c_keys, &c_negotiation, timeout);
            c_stats.count(outcome.err().unwrap_or(KeOutcome::Served));
            c_active.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            // No thread to be had: as good as busy.
            active.fetch_sub(1, Ordering::AcqRel);
            stats.count(KeOutcome::RefusedBusy);
        }
    }
}

/// Whether the access table and the rate limiter let `ip` run a key exchange. A refused client
/// gets its connection closed: a KoD has no meaning on TCP.
fn admitted(policy: &SharedPolicy, ip: std::net::IpAddr) -> Result<(), KeOutcome> {
    let set = policy.load();
    match set.access.action(ip) {
        Action::Serve | Action::Exempt => Ok(()),
        Action::Ignore | Action::Deny => Err(KeOutcome::RefusedPolicy),
        // An nts-only client needs its cookies: its KE meets the limiter like its requests.
        Action::Limited | Action::NtsOnly => {
            let now = crate::clock::realtime_ns() as u64;
            let mut random = [0u8; 4];
            let _ = getrandom::fill(&mut random);
            match set.limiter.check_detail(ip, now, u32::from_le_bytes(random)).limit {
                Limit::Allow | Limit::Leak => Ok(()),
                Limit::Drop | Limit::Kod => Err(KeOutcome::RateLimited),
            }
        }
    }
}

/// One KE exchange: handshake, request, response, close, all before `timeout`; an error is
/// why it failed.
fn serve_connection(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    keys: &SharedKeys,
    negotiation: &Negotiation,
    timeout: Duration,
) -> Result<(), KeOutcome> {
    let io = |e: io::Error| KeOutcome::of_io(&e);
    let deadline = Instant::now() + timeout;
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let mut conn = rustls::ServerConnection::new(tls).map_err(|_| KeOutcome::HandshakeFailed)?;
    let mut sock = DeadlineStream { stream, deadline };
    let mut request = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    let records_end = loop {
        while conn.wants_write() {
            conn.write_tls(&mut sock).map_err(io)?;
        }
        if !conn.is_handshaking() {
            if conn.alpn_protocol() != Some(ALPN) {
                return Err(KeOutcome::HandshakeFailed);
            }
            match ke::decode(&request) {
                Ok(_) => break request.len(),
                Err(ke::DecodeError::Malformed) => return Err(KeOutcome::BadRequest),
                Err(ke::DecodeError::Incomplete) => {}
            }
        }
        if conn.read_tls(&mut sock).map_err(io)? == 0 {
            return Err(KeOutcome::Closed);
        }
        conn.process_new_packets().map_err(|_| {
            // Tell the client why before closing.
            let _ = conn.write_tls(&mut sock);
            if conn.is_handshaking() {
                KeOutcome::HandshakeFailed
            } else {
                KeOutcome::BadRequest
            }
        })?;
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    request.extend_from_slice(&buf[..n]);
                    if request.len() > ke::MAX_REQUEST_LEN {
                        return Err(KeOutcome::BadRequest);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(io(e)),
            }
        }
    };
    let records = ke::decode(&request[..records_end]).map_err(|_| KeOutcome::BadRequest)?;
    let (mut response, outcome) = ke::respond(&records, negotiation);
    let served = match outcome {
        Outcome::Cookies { aead } => {
            let session = export_keys(&conn, aead).map_err(io)?;
            let jar = CookieJar::new(&keys.load());
            let mut new = NewCookies::new(&session);
            for _ in 0..ke::COOKIES_PER_KE {
                let mut nonce = [0u8; 16];
                getrandom::fill(&mut nonce).map_err(|_| KeOutcome::Closed)?;
                new.push(&jar, &nonce);
            }
            let mut cookies = [[0u8; COOKIE_LEN]; ke::COOKIES_PER_KE];
            jar.seal_all(&new, &mut cookies);
            for cookie in &cookies[..new.len()] {
                ke::push_cookie(&mut response, cookie);
            }
            ke::finish(&mut response);
            true
        }
        Outcome::NoCookies => false,
    };
    conn.writer().write_all(&response).map_err(io)?;
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut sock).map_err(io)?;
    }
    if served { Ok(()) } else { Err(KeOutcome::BadRequest) }
}

/// C2S and S2C from the TLS exporter (RFC 8915 section 5.1).
fn export_keys(conn: &rustls::ServerConnection, aead: u16) -> io::Result<SessionKeys> {
    let mut s = SessionKeys {
        aead,
        c2s: [0; KEY_LEN],
        s2c: [0; KEY_LEN],
    };
    conn.export_keying_material(&mut s.c2s, EXPORTER_LABEL, Some(&ke::exporter_context(aead, false)))
        .map_err(io::Error::other)?;
    conn.export_keying_material(&mut s.s2c, EXPORTER_LABEL, Some(&ke::exporter_context(aead, true)))
        .map_err(io::Error::other)?;
    Ok(s)
}

/// A socket whose every read and write gives up at one deadline for the whole exchange, so a
/// slow client cannot hold a connection slot longer than the timeout.
struct DeadlineStream {
    stream: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        Ok(left)
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}
