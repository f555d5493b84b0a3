//! The TOML config file: parsing and validation into plain typed structs. Every error names the
//! file, the line and the key. No serde type leaves this module.

pub mod convert;

use crate::policy::{Action, PolicyConfig, Rule};
use crate::server::ServeOptions;
use crate::sync::{ClockMode, MAX_POOL_SOURCES, MakeStep, SyncConfig, UpstreamConfig};
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where `gnomon serve` looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/gnomon/gnomon.toml";
/// The config used when no file is given or found; also shipped as `deploy/gnomon.toml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../deploy/gnomon.toml");
/// How the embedded default names itself in messages.
pub const EMBEDDED_NAME: &str = "<embedded default>";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/gnomon/gnomon.sock";
pub const NTP_PORT: u16 = 123;

/// A config problem, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ": key `{k}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from (a path, or `<embedded default>`).
    pub source: String,
    pub serve: ServeOptions,
    /// Upstream sources, clock mode, holdover limit and the LOCAL clock stratum.
    pub sync: SyncConfig,
    pub control_socket: PathBuf,
    /// Access rules and rate limits: the part `gnomon reload` can change without a restart.
    pub policy: PolicyConfig,
    /// `user` (and `group`): who the server becomes after binding, when started as root.
    pub run_as: Option<crate::server::privileges::Account>,
    /// Where the Prometheus metrics endpoint listens (`[metrics] listen`); None: no endpoint.
    pub metrics: Option<SocketAddr>,
    /// `[nts]`: NTS-KE and authenticated NTP, off unless the table is there.
    pub nts: Option<crate::nts::NtsConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestrict {
    address: Spanned<String>,
    action: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Spanned<String>,
    port: Option<Spanned<i64>>,
    iburst: Option<bool>,
    minpoll: Option<Spanned<i64>>,
    maxpoll: Option<Spanned<i64>>,
    prefer: Option<bool>,
    trust: Option<bool>,
    max_sources: Option<Spanned<i64>>,
    nts: Option<Spanned<bool>>,
    nts_port: Option<Spanned<i64>>,
    nts_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    interval: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    ipv4_prefix: Option<Spanned<i64>>,
    ipv6_prefix: Option<Spanned<i64>>,
    table_bytes: Option<Spanned<i64>>,
    leak: Option<Spanned<i64>>,
    kod: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMakeStep {
    threshold: Option<Spanned<f64>>,
    limit: Option<Spanned<i64>>,
    max_correction: Option<Spanned<f64>>,
    allow_large_first: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeap {
    mode: Option<Spanned<String>>,
    list: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawXdp {
    interface: Spanned<String>,
    queues: Option<Spanned<Vec<i64>>>,
    required: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Vec<Spanned<String>>>,
    workers: Option<Spanned<i64>>,
    io: Option<Spanned<String>>,
    cpus: Option<Spanned<Vec<i64>>>,
    local_stratum: Option<Spanned<i64>>,
    control_socket: Option<String>,
    steering: Option<Spanned<String>>,
    recv_buffer: Option<Spanned<i64>>,
    send_buffer: Option<Spanned<i64>>,
    clock_mode: Option<Spanned<String>>,
    max_root_dispersion: Option<Spanned<f64>>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    pool: Vec<RawUpstream>,
    #[serde(default)]
    restrict: Vec<RawRestrict>,
    rate_limit: Option<RawRateLimit>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    makestep: Option<RawMakeStep>,
    leap: Option<RawLeap>,
    metrics: Option<RawMetrics>,
    nts: Option<RawNts>,
    xdp: Option<Spanned<RawXdp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNts {
    certificate: Spanned<String>,
    private_key: Spanned<String>,
    listen: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    key_rotation: Option<Spanned<i64>>,
    keys_kept: Option<Spanned<i64>>,
    ntp_server: Option<Spanned<String>>,
    ntp_port: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    timeout: Option<Spanned<f64>>,
}

/// Turns a byte offset into a 1-based line number and the key written on that line.
struct Locator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn key_on_line(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        let start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let end = self.text[offset..].find('\n').map_or(self.text.len(), |i| offset + i);
        let line = self.text[start..end].trim();
        if let Some((k, _)) = line.split_once('=') {
            return Some(k.trim().trim_matches('"').to_string());
        }
        let header = line.trim_start_matches('[').trim_end_matches(']').trim();
        (!header.is_empty() && line.starts_with('[')).then(|| header.to_string())
    }

    fn at(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfigError {
        let key = self.key_on_line(span.start);
        let message = with_value(message.into(), self.text.get(span.clone()), key.as_deref());
        ConfigError {
            file: self.file.to_string(),
            line: Some(self.line_of(span.start)),
            key,
            message,
        }
    }

    fn value<T>(&self, v: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.at(v.span(), message)
    }
}

/// The message with the value as written in the file (`raw`, the span's text) added, unless the
/// message already shows it or the span is not a value (a key, a table, several lines).
fn with_value(message: String, raw: Option<&str>, key: Option<&str>) -> String {
    let Some(raw) = raw.map(str::trim) else { return message };
    let bare = raw.trim_matches('"');
    if bare.is_empty() || raw.contains('\n') || raw.len() > 200 || key == Some(bare) || message.contains(bare) {
        return message;
    }
    format!("{message}, got {raw}")
}

/// `Some(hint)` when an upstream address is written as HOST:PORT (or a bracketed IPv6 address),
/// which no resolver reads as a host name; a bare IPv6 address has colons too and is fine.
fn host_port_hint(address: &str) -> Option<String> {
    if address.parse::<IpAddr>().is_ok() {
        return None;
    }
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(port) => (host, port),
            None if after.is_empty() => {
                return Some(format!(
                    "`{address}`: write an IPv6 address without brackets: address = \"{host}\""
                ));
            }
            None => return None,
        }
    } else {
        match address.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, port),
            _ => return None,
        }
    };
    let port = if port.is_empty() { "PORT" } else { port };
    Some(format!(
        "`{address}` looks like HOST:PORT, which is not a host name: write the port apart, \
         address = \"{host}\" and port = {port}"
    ))
}

fn int_in<T: TryFrom<i64>>(loc: &Locator, v: &Spanned<i64>, lo: i64, hi: i64, what: &str) -> Result<T, ConfigError> {
    let x = *v.get_ref();
    if x < lo || x > hi {
        return Err(loc.value(v, format!("{what} must be between {lo} and {hi}, got {x}")));
    }
    T::try_from(x).map_err(|_| loc.value(v, format!("{what} out of range: {x}")))
}

/// Reads `ADDR:PORT`, `[V6]:PORT`, or a bare address (port 123).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, NTP_PORT))
        .map_err(|_| format!("`{s}` is not an address (expected e.g. 0.0.0.0:123, [::]:123 or 192.0.2.1)"))
}

/// Reads the metrics endpoint's `ADDR:PORT`, `[V6]:PORT`, or a bare address (port 9975).
/// Addresses only: a name would need DNS at start-up for a local endpoint.
pub fn parse_metrics_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, crate::control::metrics::DEFAULT_PORT))
        .map_err(|_| format!("`{s}` is not an address (expected e.g. 127.0.0.1:9975 or [::1]:9975)"))
}

impl Config {
    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let loc = Locator { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => loc.at(span, e.message().to_string()),
            None => ConfigError {
                file: file.to_string(),
                line: None,
                key: None,
                message: e.message().to_string(),
            },
        })?;
        let mut serve = ServeOptions::default();
        match &raw.listen {
            Some(list) => {
                for l in list {
                    serve
                        .listen
                        .push(parse_listen(l.get_ref()).map_err(|m| loc.value(l, m))?);
                }
                if serve.listen.is_empty() {
                    return Err(ConfigError {
                        file: file.to_string(),
                        line: None,
                        key: Some("listen".into()),
                        message: "at least one listen address is needed".into(),
                    });
                }
            }
            None => serve.listen = default_listen(),
        }
        if let Some(w) = &raw.workers {
            serve.workers = int_in(&loc, w, 0, 1024, "workers")?;
        }
        if let Some(io) = &raw.io {
            serve.io = io.get_ref().parse().map_err(|m: String| loc.value(io, m))?;
        }
        serve.xdp = raw.xdp.as_ref().map(|x| parse_xdp(&loc, x.get_ref())).transpose()?;
        match (&raw.io, &raw.xdp) {
            (Some(io), None) if serve.io == crate::server::IoMode::Xdp => {
                return Err(loc.value(io, "io = \"xdp\" needs an [xdp] table with `interface`"));
            }
            (io, Some(x)) if serve.io != crate::server::IoMode::Xdp => {
                let at = io.as_ref().map_or(x.span(), |i| i.span());
                return Err(loc.at(at, "[xdp] is used only with io = \"xdp\""));
            }
            _ => {}
        }
        if let Some(st) = &raw.steering {
            serve.steering = st.get_ref().parse().map_err(|m: String| loc.value(st, m))?;
        }
        if let Some(c) = &raw.cpus {
            let n = core_affinity::get_core_ids().map_or(usize::MAX, |v| v.len());
            for &cpu in c.get_ref() {
                if cpu < 0 || cpu as usize >= n.max(1) {
                    return Err(loc.value(c, format!("cpu {cpu} does not exist (this machine has {n})")));
                }
                serve.cpus.push(cpu as usize);
            }
        }
        if let Some(b) = &raw.recv_buffer {
            serve.socket.recv_buffer = int_in(&loc, b, 4096, 1 << 30, "recv_buffer")?;
        }
        if let Some(b) = &raw.send_buffer {
            serve.socket.send_buffer = int_in(&loc, b, 4096, 1 << 30, "send_buffer")?;
        }
        let local_stratum = raw
            .local_stratum
            .as_ref()
            .map(|s| int_in(&loc, s, 1, 15, "local_stratum"))
            .transpose()?;
        let policy = parse_policy(&loc, &raw.restrict, raw.rate_limit.as_ref())?;
        let mut sync = SyncConfig {
            local_stratum,
            ..SyncConfig::default()
        };
        if let Some(m) = &raw.clock_mode {
            sync.mode = match m.get_ref().as_str() {
                "software" => ClockMode::Software,
                "system" => ClockMode::System,
                other => {
                    return Err(loc.value(m, format!("unknown clock_mode `{other}` (expected software or system)")));
                }
            };
        }
        if let Some(d) = &raw.max_root_dispersion {
            let v = *d.get_ref();
            if !(v.is_finite() && (0.001..=16.0).contains(&v)) {
                return Err(loc.value(
                    d,
                    format!("max_root_dispersion must be between 0.001 and 16 seconds, got {v}"),
                ));
            }
            sync.max_root_dispersion = v;
        }
        if let Some(m) = &raw.makestep {
            // The panic keys alone leave stepping as it is by default.
            let panic_only = m.threshold.is_none()
                && m.limit.is_none()
                && (m.max_correction.is_some() || m.allow_large_first.is_some());
            let step = parse_makestep(&loc, m)?;
            if !panic_only {
                sync.makestep = Some(step);
            }
            if let Some(c) = &m.max_correction {
                let v = *c.get_ref();
                if !(v.is_finite() && v >= 0.0) {
                    return Err(loc.value(
                        c,
                        format!("max_correction must be 0 (no limit) or more seconds, got {v}"),
                    ));
                }
                sync.panic.threshold = (v > 0.0).then_some(v);
            }
            if let Some(a) = m.allow_large_first {
                sync.panic.allow_first = a;
            }
        }
        if let Some(l) = &raw.leap {
            sync.leap = parse_leap(&loc, l)?;
        }
        for (list, pool) in [(&raw.upstream, false), (&raw.pool, true)] {
            for u in list {
                sync.upstreams.push(parse_upstream(&loc, u, pool)?);
            }
        }
        if let Some(m) = &raw.clock_mode
            && sync.mode == ClockMode::System
            && sync.upstreams.is_empty()
        {
            return Err(loc.value(
                m,
                "clock_mode = \"system\" needs an [[upstream]] or [[pool]]: without one there is no \
                 time to steer the kernel clock to"
                    .to_string(),
            ));
        }
        let run_as = match (&raw.user, &raw.group) {
            (Some(u), g) => Some(
                crate::server::privileges::lookup(u.get_ref(), g.as_ref().map(|g| g.get_ref().as_str())).map_err(
                    |m| {
                        // Blame the group line when the user was found.
                        let at = match g {
                            Some(g) if m.starts_with("group") => g.span(),
                            _ => u.span(),
                        };
                        loc.at(at, m)
                    },
                )?,
            ),
            (None, Some(g)) => {
                return Err(loc.value(g, "`group` needs `user`: the server changes both or neither"));
            }
            (None, None) => None,
        };
        // An empty `[metrics]` table turns the endpoint on at ntpd-rs's default address.
        let metrics = match &raw.metrics {
            None => None,
            Some(RawMetrics { listen: None }) => Some(SocketAddr::from((
                [127, 0, 0, 1],
                crate::control::metrics::DEFAULT_PORT,
            ))),
            Some(RawMetrics { listen: Some(l) }) => {
                Some(parse_metrics_listen(l.get_ref()).map_err(|m| loc.value(l, m))?)
            }
        };
        let nts = raw.nts.as_ref().map(|n| parse_nts(&loc, n)).transpose()?;
        // Without NTS an `nts-only` client could never be answered: a mistake, not a policy.
        if nts.is_none()
            && let Some(r) = raw
                .restrict
                .iter()
                .find(|r| r.action.get_ref() == Action::NtsOnly.name())
        {
            return Err(loc.value(&r.action, "`nts-only` needs an [nts] table (NTS is off)"));
        }
        Ok(Config {
            nts,
            run_as,
            sync,
            policy,
            metrics,
            source: file.to_string(),
            serve,
            control_socket: raw
                .control_socket
                .map_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET), PathBuf::from),
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: name.clone(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &name)
    }

    pub fn embedded() -> Config {
        Config::parse(EMBEDDED_DEFAULT, EMBEDDED_NAME).expect("the embedded default config is valid")
    }

    /// `--config` if given, else the default path if it exists, else the embedded default.
    pub fn locate(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        match explicit {
            Some(p) => Config::load(p),
            None if Path::new(DEFAULT_PATH).exists() => Config::load(Path::new(DEFAULT_PATH)),
            None => Ok(Config::embedded()),
        }
    }
}

impl Config {
    /// What `check-config` prints on success: what the server would do, in a few lines.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let listen: Vec<String> = self.serve.listen.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(out, "  listen       : {}", listen.join(", "));
        let (pools, servers): (Vec<_>, Vec<_>) = self.sync.upstreams.iter().partition(|u| u.pool);
        let name = |u: &UpstreamConfig| match u.port {
            NTP_PORT => u.address.clone(),
            p => format!("{} port {p}", u.address),
        };
        let mut sources = Vec::new();
        if !servers.is_empty() {
            let names: Vec<String> = servers.iter().map(|u| name(u)).collect();
            sources.push(format!("{} upstream ({})", servers.len(), names.join(", ")));
        }
        if !pools.is_empty() {
            let names: Vec<String> = pools
                .iter()
                .map(|u| format!("{}, up to {}", name(u), u.max_sources))
                .collect();
            sources.push(format!("{} pool ({})", pools.len(), names.join("; ")));
        }
        let sources = match (sources.is_empty(), self.sync.local_stratum) {
            (false, _) => sources.join(", "),
            (true, Some(s)) => format!("none: the local clock is served as stratum {s} (refid LOCL)"),
            (true, None) => "none: every reply says unsynchronised (LI 3)".to_string(),
        };
        let _ = writeln!(out, "  sources      : {sources}");
        if let Some(x) = self
            .serve
            .xdp
            .as_ref()
            .filter(|_| self.serve.io == crate::server::IoMode::Xdp)
        {
            let queues = if x.queues.is_empty() {
                "all RX queues".to_string()
            } else {
                format!("RX queues {:?}", x.queues)
            };
            let otherwise = if x.required {
                "refuses to start without it"
            } else {
                "else the kernel sockets alone"
            };
            let _ = writeln!(out, "  AF_XDP       : on {}, {queues}; {otherwise}", x.interface);
        }
        let p = &self.policy;
        let mut counts: Vec<String> = Vec::new();
        for a in Action::ALL {
            let n = p.rules.iter().filter(|r| r.action == a).count();
            if n > 0 {
                counts.push(format!("{n} {a}"));
            }
        }
        let rules = if counts.is_empty() {
            String::new()
        } else {
            format!(" ({})", counts.join(", "))
        };
        let _ = writeln!(out, "  access rules : {}{rules}, default {}", p.rules.len(), p.default);
        let clock = match self.sync.mode {
            ClockMode::Software => "software (the kernel clock is left alone; replies are corrected)",
            ClockMode::System => "system (steers the kernel clock; needs CAP_SYS_TIME)",
        };
        let _ = writeln!(out, "  clock mode   : {clock}");
        let rl = &p.rate_limit;
        let limited = p.default.rate_limited() && p.default != Action::Deny
            || p.rules
                .iter()
                .any(|r| matches!(r.action, Action::Limited | Action::NtsOnly));
        let leak = match rl.leak {
            0 => "no leak".to_string(),
            n => format!("1 in {n} over-limit answered"),
        };
        let _ = writeln!(
            out,
            "  rate limit   : {}1 request per {} s per client (IPv4 /{}, IPv6 /{}), burst {}, {leak}, KoD {}",
            if limited { "" } else { "(no limited rule) " },
            rl.interval,
            rl.ipv4_prefix,
            rl.ipv6_prefix,
            rl.burst,
            if rl.kod { "on" } else { "off" }
        );
        let _ = writeln!(out, "  control      : {}", self.control_socket.display());
        out
    }
}

fn parse_nts(loc: &Locator, n: &RawNts) -> Result<crate::nts::NtsConfig, ConfigError> {
    let path = |v: &Spanned<String>| {
        if v.get_ref().is_empty() {
            Err(loc.value(v, "an empty path"))
        } else {
            Ok(PathBuf::from(v.get_ref()))
        }
    };
    let mut c = crate::nts::NtsConfig::new(path(&n.certificate)?, path(&n.private_key)?);
    if let Some(l) = &n.listen {
        c.listen = match l.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match l
                .get_ref()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                Ok(ip) => SocketAddr::new(ip, crate::nts::DEFAULT_KE_PORT),
                Err(_) => return Err(loc.value(l, "not an address (expected e.g. [::]:4460 or 192.0.2.1)")),
            },
        };
    }
    if let Some(f) = &n.secret_file {
        c.secret_file = Some(path(f)?);
    }
    if let Some(r) = &n.key_rotation {
        // Periods of seconds are for tests of rotation; fleets rotate daily or so.
        c.key_rotation = std::time::Duration::from_secs(int_in(loc, r, 1, 366 * 86_400, "key_rotation (seconds)")?);
    }
    if let Some(k) = &n.keys_kept {
        c.keys_kept = int_in(loc, k, 0, (crate::nts::cookie::MAX_KEYS - 1) as i64, "keys_kept")?;
    }
    if let Some(s) = &n.ntp_server {
        if s.get_ref().is_empty() || s.get_ref().len() > 255 || !s.get_ref().is_ascii() {
            return Err(loc.value(s, "ntp_server must be 1 to 255 ASCII characters"));
        }
        c.ntp_server = Some(s.get_ref().clone());
    }
    if let Some(p) = &n.ntp_port {
        c.ntp_port = Some(int_in(loc, p, 1, 65535, "ntp_port")?);
    }
    if let Some(m) = &n.max_connections {
        c.max_connections = int_in(loc, m, 1, 100_000, "max_connections")?;
    }
    if let Some(t) = &n.timeout {
        let v = *t.get_ref();
        if !(v.is_finite() && (0.1..=60.0).contains(&v)) {
            return Err(loc.value(t, format!("timeout must be between 0.1 and 60 seconds, got {v}")));
        }
        c.timeout = std::time::Duration::from_secs_f64(v);
    }
    Ok(c)
}

fn parse_upstream(loc: &Locator, u: &RawUpstream, pool: bool) -> Result<UpstreamConfig, ConfigError> {
    let address = u.address.get_ref().trim();
    if address.is_empty() || address.contains(char::is_whitespace) {
        return Err(loc.value(&u.address, format!("`{address}` is not a host name or address")));
    }
    if let Some(hint) = host_port_hint(address) {
        return Err(loc.value(&u.address, hint));
    }
    let mut up = UpstreamConfig::new(address);
    up.pool = pool;
    if let Some(p) = &u.port {
        up.port = int_in(loc, p, 1, 65535, "port")?;
    }
    if let Some(p) = &u.minpoll {
        up.minpoll = int_in(loc, p, 0, 17, "minpoll")?;
    }
    if let Some(p) = &u.maxpoll {
        up.maxpoll = int_in(loc, p, 0, 17, "maxpoll")?;
    }
    if up.maxpoll < up.minpoll {
        let span = u
            .maxpoll
            .as_ref()
            .or(u.minpoll.as_ref())
            .map_or(u.address.span(), |s| s.span());
        return Err(loc.at(span, format!("maxpoll {} is below minpoll {}", up.maxpoll, up.minpoll)));
    }
    up.iburst = u.iburst.unwrap_or(false);
    up.prefer = u.prefer.unwrap_or(false);
    up.trust = u.trust.unwrap_or(false);
    if let Some(m) = &u.max_sources {
        if !pool {
            return Err(loc.value(
                m,
                "max_sources applies to [[pool]] entries only: an [[upstream]] is one server",
            ));
        }
        up.max_sources = int_in(loc, m, 1, MAX_POOL_SOURCES.into(), "max_sources")?;
    }
    if u.nts.as_ref().is_some_and(|n| *n.get_ref()) {
        let mut nts = crate::sync::NtsUpstream {
            ke_port: crate::nts::DEFAULT_KE_PORT,
            ca: u.nts_ca.as_ref().map(|c| PathBuf::from(c.get_ref())),
        };
        if let Some(p) = &u.nts_port {
            nts.ke_port = int_in(loc, p, 1, 65535, "nts_port")?;
        }
        up.nts = Some(nts);
    } else if let Some(span) = u
        .nts_port
        .as_ref()
        .map(|p| p.span())
        .or(u.nts_ca.as_ref().map(|c| c.span()))
    {
        return Err(loc.at(span, "nts_port and nts_ca need `nts = true`"));
    }
    Ok(up)
}

fn parse_xdp(loc: &Locator, x: &RawXdp) -> Result<crate::server::xdp::XdpOptions, ConfigError> {
    let interface = x.interface.get_ref();
    // IFNAMSIZ is 16 with the NUL; a '/' or a space is no interface name.
    if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ', '\0']) {
        return Err(loc.value(&x.interface, format!("`{interface}` is not an interface name")));
    }
    let mut queues = Vec::new();
    if let Some(q) = &x.queues {
        for &n in q.get_ref() {
            if !(0..=1023).contains(&n) {
                return Err(loc.value(q, format!("queue {n} is not an RX queue number (0 to 1023)")));
            }
            if queues.contains(&(n as u32)) {
                return Err(loc.value(q, format!("queue {n} is listed twice")));
            }
            queues.push(n as u32);
        }
        if queues.is_empty() {
            return Err(loc.value(q, "an empty queue list serves nothing: leave `queues` out for all"));
        }
    }
    Ok(crate::server::xdp::XdpOptions {
        interface: interface.clone(),
        queues,
        required: x.required.unwrap_or(false),
    })
}

fn parse_makestep(loc: &Locator, m: &RawMakeStep) -> Result<MakeStep, ConfigError> {
    let mut out = MakeStep::DEFAULT;
    if let Some(t) = &m.threshold {
        let v = *t.get_ref();
        if !(v.is_finite() && v >= 0.0) {
            return Err(loc.value(t, format!("threshold must be 0 or more seconds, got {v}")));
        }
        out.threshold = v;
    }
    if let Some(l) = &m.limit {
        // As chrony: a negative limit lets any update step.
        out.limit = match *l.get_ref() {
            -1 => None,
            _ => Some(int_in(loc, l, -1, 1_000_000, "limit")?),
        };
    }
    Ok(out)
}

fn parse_leap(loc: &Locator, l: &RawLeap) -> Result<crate::sync::LeapConfig, ConfigError> {
    use crate::sync::{LeapList, LeapMode};
    let mut out = crate::sync::LeapConfig::default();
    if let Some(m) = &l.mode {
        out.mode = match m.get_ref().as_str() {
            "apply" => LeapMode::Apply,
            "ignore" => LeapMode::Ignore,
            other => return Err(loc.value(m, format!("unknown leap mode `{other}` (expected apply or ignore)"))),
        };
    }
    if let Some(p) = &l.list {
        let path = p.get_ref();
        let text = std::fs::read_to_string(path).map_err(|e| loc.value(p, format!("cannot read `{path}`: {e}")))?;
        out.list = Some(LeapList::parse(&text, path).map_err(|e| loc.value(p, format!("`{path}`: {e}")))?);
    }
    Ok(out)
}

fn parse_policy(
    loc: &Locator,
    restrict: &[RawRestrict],
    rl: Option<&RawRateLimit>,
) -> Result<PolicyConfig, ConfigError> {
    let mut policy = PolicyConfig::default();
    let mut default_seen = false;
    for r in restrict {
        let action: Action = r
            .action
            .get_ref()
            .parse()
            .map_err(|e: crate::policy::UnknownAction| loc.value(&r.action, e.to_string()))?;
        let address = r.address.get_ref().trim();
        if address == "default" {
            if default_seen {
                return Err(loc.value(&r.address, "a second `default` rule"));
            }
            default_seen = true;
            policy.default = action;
            policy.lines.default = Some(loc.line_of(r.address.span().start));
            continue;
        }
        let prefix = address
            .parse()
            .map_err(|e: crate::policy::PrefixError| loc.value(&r.address, format!("`{address}`: {e}")))?;
        policy.rules.push(Rule { prefix, action });
        policy.lines.rules.push(loc.line_of(r.address.span().start));
    }
    if let Some(rl) = rl {
        let c = &mut policy.rate_limit;
        if let Some(i) = &rl.interval {
            let v = *i.get_ref();
            if !(v.is_finite() && (0.001..=86_400.0).contains(&v)) {
                return Err(loc.value(i, format!("interval must be between 0.001 and 86400 seconds, got {v}")));
            }
            c.interval = v;
        }
        if let Some(b) = &rl.burst {
            c.burst = int_in(loc, b, 1, 1_000_000, "burst")?;
        }
        if let Some(p) = &rl.ipv4_prefix {
            c.ipv4_prefix = int_in(loc, p, 1, 32, "ipv4_prefix")?;
        }
        if let Some(p) = &rl.ipv6_prefix {
            c.ipv6_prefix = int_in(loc, p, 1, 128, "ipv6_prefix")?;
        }
        if let Some(t) = &rl.table_bytes {
            c.table_bytes = int_in(loc, t, 4096, 1 << 34, "table_bytes")?;
        }
        if let Some(l) = &rl.leak {
            c.leak = int_in(loc, l, 0, 1 << 20, "leak")?;
        }
        if let Some(k) = rl.kod {
            c.kod = k;
        }
    }
    Ok(policy)
}

fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], NTP_PORT)),
        SocketAddr::from(([0u16; 8], NTP_PORT)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::IoMode;

    #[test]
    fn xdp_table() {
        let c = Config::parse(
            "io = \"xdp\"\n[xdp]\ninterface = \"eth0\"\nqueues = [0, 2]\nrequired = true\n",
            "f",
        )
        .unwrap();
        assert_eq!(c.serve.io, IoMode::Xdp);
        let x = c.serve.xdp.unwrap();
        assert_eq!((x.interface.as_str(), x.queues, x.required), ("eth0", vec![0, 2], true));
        let c = Config::parse("io = \"xdp\"\n[xdp]\ninterface = \"eth0\"\n", "f").unwrap();
        let x = c.serve.xdp.clone().unwrap();
        assert!(x.queues.is_empty() && !x.required, "defaults: all queues, fall back");
        assert!(
            c.summary()
                .contains("AF_XDP       : on eth0, all RX queues; else the kernel sockets alone"),
            "{}",
            c.summary()
        );
        for (text, line, key) in [
            ("io = \"xdp\"\n", 1, "io"),
            ("io = \"mmsg\"\n[xdp]\ninterface = \"eth0\"\n", 1, "io"),
            ("io = \"xdp\"\n[xdp]\ninterface = \"a/b\"\n", 3, "interface"),
            (
                "io = \"xdp\"\n[xdp]\ninterface = \"eth0\"\nqueues = [1, 1]\n",
                4,
                "queues",
            ),
            (
                "io = \"xdp\"\n[xdp]\ninterface = \"eth0\"\nqueues = [-1]\n",
                4,
                "queues",
            ),
            ("io = \"xdp\"\n[xdp]\ninterface = \"eth0\"\nqueues = []\n", 4, "queues"),
        ] {
            let e = Config::parse(text, "f").unwrap_err();
            assert_eq!((e.line, e.key.as_deref()), (Some(line), Some(key)), "{text}: {e}");
        }
        // [xdp] alone, without io: the table is blamed.
        let e = Config::parse("[xdp]\ninterface = \"eth0\"\n", "f").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded();
        assert!(!c.serve.listen.is_empty());
    }

    #[test]
    fn full_config() {
        let c = Config::parse(
            "listen = [\"127.0.0.1:1123\", \"[::1]:1123\", \"192.0.2.1\"]\nworkers = 2\nio = \"mmsg\"\nlocal_stratum = 10\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.serve.listen.len(), 3);
        assert_eq!(c.serve.listen[2], "192.0.2.1:123".parse().unwrap());
        assert_eq!(c.serve.workers, 2);
        assert_eq!(c.serve.io, IoMode::Mmsg);
        assert_eq!(c.sync.local_stratum, Some(10));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = Config::parse("workers = 1\n\nlisten_addr = [\"x\"]\n", "/etc/g.toml").unwrap_err();
        assert_eq!(e.file, "/etc/g.toml");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("listen_addr"));
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let e = Config::parse("workers = 1\nlocal_stratum = 16\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("local_stratum")));
        let e = Config::parse("io = \"epoll\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("io")));
        let e = Config::parse("\nlisten = [\"nonsense\"]\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("listen")));
        let e = Config::parse("workers = \"two\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("workers")));
        let e = Config::parse("workers = -1\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("workers")));
        assert_eq!(
            e.to_string(),
            "f:1: key `workers`: workers must be between 0 and 1024, got -1"
        );
    }

    #[test]
    fn restrict_and_rate_limit() {
        let c = Config::parse(
            "[[restrict]]\naddress = \"default\"\naction = \"limited\"\n\n[[restrict]]\naddress = \"192.168.1.0 mask 255.255.255.0\"\naction = \"serve\"\n\n[[restrict]]\naddress = \"2001:db8::/32\"\naction = \"deny\"\n\n[rate_limit]\ninterval = 2.0\nburst = 4\nleak = 0\nkod = true\n",
            "f",
        )
        .unwrap();
        assert_eq!(c.policy.default, Action::Limited);
        assert_eq!(c.policy.rules.len(), 2);
        assert_eq!(c.policy.rules[0].action, Action::Serve);
        assert_eq!(c.policy.rules[0].prefix, "192.168.1.0/24".parse().unwrap());
        assert_eq!(c.policy.rate_limit.interval, 2.0);
        assert_eq!(c.policy.rate_limit.burst, 4);
        assert!(c.policy.rate_limit.kod);
    }

    #[test]
    fn bad_restrict_names_line_and_key() {
        let e = Config::parse("[[restrict]]\naddress = \"10.0.0.0/33\"\naction = \"serve\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("address")), "{e}");
        let e = Config::parse("[[restrict]]\naddress = \"10.0.0.0/8\"\naction = \"allow\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("action")), "{e}");
        let e = Config::parse("[[restrict]]\naddress = \"10.0.0.0/8\"\nactoin = \"serve\"\n", "f").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("actoin"), "{e}");
        let e = Config::parse("[rate_limit]\nburst = 0\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("burst")), "{e}");
        let e = Config::parse("[rate_limit]\ninterval = -1.0\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("interval")), "{e}");
    }

    #[test]
    fn upstreams_and_pools() {
        let c = Config::parse(
            "max_root_dispersion = 0.5\n[[upstream]]\naddress = \"127.0.0.1\"\nport = 1123\niburst = true\nminpoll = 0\nmaxpoll = 2\nprefer = true\n\n[[pool]]\naddress = \"pool.example\"\n",
            "f",
        )
        .unwrap();
        assert_eq!(c.sync.upstreams.len(), 2);
        let u = &c.sync.upstreams[0];
        assert_eq!(
            (
                u.address.as_str(),
                u.port,
                u.iburst,
                u.minpoll,
                u.maxpoll,
                u.prefer,
                u.pool
            ),
            ("127.0.0.1", 1123, true, 0, 2, true, false)
        );
        assert!(c.sync.upstreams[1].pool);
        assert_eq!(c.sync.upstreams[1].max_sources, crate::sync::DEFAULT_POOL_SOURCES);
        assert_eq!(c.sync.max_root_dispersion, 0.5);
        let e = Config::parse("[[upstream]]\naddress = \"a\"\nminpoll = 8\nmaxpoll = 4\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("maxpoll")), "{e}");
        let e = Config::parse("local_stratum = 3\nclock_mode = \"system\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("clock_mode")), "{e}");
        assert!(e.to_string().contains("needs an [[upstream]]"), "{e}");
        let e = Config::parse("clock_mode = \"kernel\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("clock_mode")), "{e}");
        let e = Config::parse("[[upstream]]\nadress = \"a\"\n", "f").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("adress"), "{e}");
    }

    #[test]
    fn pool_max_sources() {
        let c = Config::parse("[[pool]]\naddress = \"pool.example\"\nmax_sources = 16\n", "f").unwrap();
        assert_eq!(c.sync.upstreams[0].max_sources, 16);
        for bad in ["0", "17", "-1"] {
            let text = format!("[[pool]]\naddress = \"pool.example\"\nmax_sources = {bad}\n");
            let e = Config::parse(&text, "f").unwrap_err();
            assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("max_sources")), "{e}");
            assert!(e.message.contains("between 1 and 16"), "{e}");
        }
        let e = Config::parse("[[upstream]]\naddress = \"a\"\n\nmax_sources = 2\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("max_sources")), "{e}");
        assert!(e.message.contains("[[pool]] entries only"), "{e}");
        let e = Config::parse("[[pool]]\naddress = \"p\"\nmax_sources = \"4\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("max_sources")), "{e}");
    }

    #[test]
    fn errors_echo_the_bad_value() {
        let e = Config::parse("[[restrict]]\naddress = \"default\"\naction = \"allow\"\n", "f").unwrap_err();
        assert!(e.to_string().contains("got \"allow\""), "{e}");
        let e = Config::parse("io = \"epoll\"\n", "f").unwrap_err();
        assert!(e.to_string().contains("epoll"), "{e}");
        let e = Config::parse("[[pool]]\naddress = \"p\"\nmax_sources = \"4\"\n", "f").unwrap_err();
        assert!(e.to_string().contains("\"4\""), "{e}");
        // Already in the message: not twice.
        let e = Config::parse("local_stratum = 99\n", "f").unwrap_err();
        assert_eq!(e.to_string().matches("99").count(), 1, "{e}");
        // An unknown key is named once, as the key.
        let e = Config::parse("wrokers = 1\n", "f").unwrap_err();
        assert!(!e.message.contains("got"), "{e}");
    }

    #[test]
    fn upstream_host_port_is_refused_with_a_hint() {
        for (bad, host, port) in [
            ("127.0.0.1:24123", "127.0.0.1", "24123"),
            ("[::1]:123", "::1", "123"),
            ("ntp.example:123", "ntp.example", "123"),
        ] {
            let text = format!("[[upstream]]\naddress = \"{bad}\"\n");
            let e = Config::parse(&text, "f").unwrap_err();
            assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("address")), "{e}");
            assert!(
                e.message.contains(&format!("address = \"{host}\" and port = {port}")),
                "{e}"
            );
        }
        let e = Config::parse("[[pool]]\naddress = \"[2001:db8::1]\"\n", "f").unwrap_err();
        assert!(e.message.contains("without brackets"), "{e}");
        for good in ["2001:db8::1", "::1", "127.0.0.1", "ntp.example", "fe80::1%eth0"] {
            let text = format!("[[upstream]]\naddress = \"{good}\"\n");
            let c = Config::parse(&text, "f").unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(c.sync.upstreams[0].address, good);
        }
    }

    #[test]
    fn summary_says_what_the_server_does() {
        let c = Config::parse(
            "listen = [\"127.0.0.1:1123\"]\nclock_mode = \"system\"\n[[upstream]]\naddress = \"127.0.0.1\"\nport = 11123\n\
             [[pool]]\naddress = \"pool.example\"\n[[restrict]]\naddress = \"default\"\naction = \"limited\"\n\
             [[restrict]]\naddress = \"::1\"\naction = \"exempt\"\n",
            "f",
        )
        .unwrap();
        let s = c.summary();
        for want in [
            "127.0.0.1:1123",
            "1 upstream (127.0.0.1 port 11123)",
            "1 pool (pool.example, up to 4)",
            "1 (1 exempt), default limited",
            "system",
            "1 request per 8 s",
        ] {
            assert!(s.contains(want), "{want}: {s}");
        }
        assert!(Config::embedded().summary().contains("unsynchronised"));
    }

    #[test]
    fn user_and_group() {
        let c = Config::parse("user = \"root\"\n", "f").unwrap();
        let a = c.run_as.unwrap();
        assert_eq!(
            (a.user.as_str(), a.uid, a.group.as_str(), a.gid),
            ("root", 0, "root", 0)
        );
        let c = Config::parse("user = \"root\"\ngroup = \"root\"\n", "f").unwrap();
        assert_eq!(c.run_as.unwrap().gid, 0);
        assert_eq!(Config::embedded().run_as, None);
        let e = Config::parse("workers = 1\nuser = \"no-such-user-gnomon\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("user")), "{e}");
        assert!(e.message.contains("does not exist"), "{e}");
        let e = Config::parse("user = \"root\"\ngroup = \"no-such-group-gnomon\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("group")), "{e}");
        let e = Config::parse("group = \"root\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("group")), "{e}");
        assert!(e.message.contains("needs `user`"), "{e}");
    }

    #[test]
    fn makestep() {
        assert_eq!(Config::parse("", "f").unwrap().sync.makestep, None);
        let c = Config::parse("[makestep]\nthreshold = 0.01\nlimit = 1\n", "f").unwrap();
        assert_eq!(
            c.sync.makestep,
            Some(MakeStep {
                threshold: 0.01,
                limit: Some(1)
            })
        );
        let c = Config::parse("[makestep]\nlimit = -1\n", "f").unwrap();
        assert_eq!(
            c.sync.makestep,
            Some(MakeStep {
                threshold: 1.0,
                limit: None
            })
        );
        let e = Config::parse("[makestep]\nlimit = -2\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("limit")), "{e}");
        let e = Config::parse("[makestep]\nthreshold = -1.0\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("threshold")), "{e}");
    }

    #[test]
    fn panic_threshold() {
        use crate::sync::Panic;
        assert_eq!(Config::parse("", "f").unwrap().sync.panic, Panic::default());
        // The panic keys alone leave stepping as it is by default.
        let c = Config::parse("[makestep]\nmax_correction = 50.0\nallow_large_first = true\n", "f").unwrap();
        assert_eq!(c.sync.makestep, None);
        assert_eq!(
            c.sync.panic,
            Panic {
                threshold: Some(50.0),
                allow_first: true
            }
        );
        let c = Config::parse("[makestep]\nlimit = 2\nmax_correction = 0\n", "f").unwrap();
        assert_eq!(c.sync.panic.threshold, None, "0: no limit, as ntpd's tinker panic 0");
        assert_eq!(c.sync.makestep.map(|m| m.limit), Some(Some(2)));
        let e = Config::parse("[makestep]\nmax_correction = -1.0\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("max_correction")), "{e}");
    }

    #[test]
    fn leap_table() {
        use crate::sync::LeapMode;
        assert_eq!(Config::parse("", "f").unwrap().sync.leap.mode, LeapMode::Apply);
        let c = Config::parse("[leap]\nmode = \"ignore\"\n", "f").unwrap();
        assert_eq!(c.sync.leap.mode, LeapMode::Ignore);
        let e = Config::parse("[leap]\nmode = \"smear\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("mode")), "{e}");
        let dir = std::env::temp_dir().join(format!("gnomon-leap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.list");
        std::fs::write(&good, "#@\t3991593600\n2272060800\t10\n3692217600\t11\n").unwrap();
        let c = Config::parse(&format!("[leap]\nlist = \"{}\"\n", good.display()), "f").unwrap();
        assert_eq!(c.sync.leap.list.map(|l| l.entries.len()), Some(2));
        // A broken list names the config line and key, and the list's own line.
        let bad = dir.join("bad.list");
        std::fs::write(&bad, "#@\t3991593600\n2272060800\tten\n").unwrap();
        let e = Config::parse(&format!("\n[leap]\nlist = \"{}\"\n", bad.display()), "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("list")), "{e}");
        assert!(e.message.contains("line 2: `ten` is not a TAI-UTC offset"), "{e}");
        let e = Config::parse("[leap]\nlist = \"/nonexistent/leap.list\"\n", "f").unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_endpoint() {
        assert_eq!(Config::embedded().metrics, None, "off by default");
        let c = Config::parse("[metrics]\nlisten = \"127.0.0.1:9100\"\n", "f").unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        let c = Config::parse("[metrics]\nlisten = \"::1\"\n", "f").unwrap();
        assert_eq!(c.metrics, Some("[::1]:9975".parse().unwrap()));
        let c = Config::parse("workers = 1\n[metrics]\n", "f").unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9975".parse().unwrap()));
        let e = Config::parse("workers = 1\n[metrics]\nlisten = \"localhost:9975\"\n", "/etc/g.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("listen")), "{e}");
        assert!(e.message.contains("`localhost:9975` is not an address"), "{e}");
        let e = Config::parse("[metrics]\nlisten = 9975\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("listen")), "{e}");
        let e = Config::parse("[metrics]\nlisen = \"127.0.0.1:9975\"\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("lisen")), "{e}");
    }

    #[test]
    fn nts_table() {
        let c = Config::parse("", "t.toml").unwrap();
        assert!(c.nts.is_none());
        let text = "[nts]\ncertificate = \"/c.pem\"\nprivate_key = \"/k.pem\"\nlisten = \"127.0.0.1\"\nkeys_kept = 3\n";
        let n = Config::parse(text, "t.toml").unwrap().nts.unwrap();
        assert_eq!(n.listen, "127.0.0.1:4460".parse().unwrap());
        assert_eq!((n.keys_kept, n.certificate), (3, PathBuf::from("/c.pem")));
        let e = Config::parse(
            "[nts]\ncertificate = \"/c\"\nprivate_key = \"/k\"\nkeys_kept = 99\n",
            "t.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("keys_kept")));
        let e = Config::parse("[nts]\ncertificate = \"/c\"\n", "t.toml").unwrap_err();
        assert!(e.message.contains("private_key"), "{e}");
    }

    #[test]
    fn nts_upstreams() {
        let up = "[[upstream]]\naddress = \"time.example\"\nnts = true\n";
        let c = Config::parse(up, "f").unwrap();
        let nts = c.sync.upstreams[0].nts.clone().unwrap();
        assert_eq!((nts.ke_port, nts.ca), (crate::nts::DEFAULT_KE_PORT, None));
        let c = Config::parse(&format!("{up}nts_port = 4461\nnts_ca = \"/ca.pem\"\n"), "f").unwrap();
        let nts = c.sync.upstreams[0].nts.clone().unwrap();
        assert_eq!((nts.ke_port, nts.ca), (4461, Some(PathBuf::from("/ca.pem"))));
        let e = Config::parse("[[upstream]]\naddress = \"a\"\nnts_port = 4461\n", "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("nts_port")), "{e}");
        let e = Config::parse(&format!("{up}nts_port = 0\n"), "f").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("nts_port"), "{e}");
        assert!(
            Config::parse("[[upstream]]\naddress = \"a\"\n", "f")
                .unwrap()
                .sync
                .upstreams[0]
                .nts
                .is_none()
        );
    }

    #[test]
    fn nts_only_needs_the_nts_table() {
        let rule = "[[restrict]]\naddress = \"default\"\naction = \"nts-only\"\n";
        let e = Config::parse(rule, "f").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("action")), "{e}");
        assert!(e.message.contains("[nts]"), "{e}");
        let c = Config::parse(
            &format!("{rule}[nts]\ncertificate = \"/c.pem\"\nprivate_key = \"/k.pem\"\n"),
            "f",
        )
        .unwrap();
        assert_eq!(c.policy.default, Action::NtsOnly);
        assert!(c.summary().contains("default nts-only"), "{}", c.summary());
        assert!(!c.summary().contains("(no limited rule)"), "{}", c.summary());
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = Config::parse("workers = 1\nlisten = [\n", "f").unwrap_err();
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn missing_file_is_an_error_not_a_panic() {
        let e = Config::load(Path::new("/nonexistent/gnomon.toml")).unwrap_err();
        assert!(e.message.contains("cannot read"));
    }
}
