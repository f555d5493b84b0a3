//! Prometheus metrics over HTTP, off by default (`[metrics] listen`). A scrape reads the counters
//! and histograms the workers already publish and the sync thread's latest report, so the hot
//! path does nothing for it: counters are set with `counter!(..).absolute(v)` into a recorder
//! made for that one scrape, and the histograms are written straight from the hdrhistogram the
//! workers keep. Names follow ntpd-rs (`ntp_server_*`, `ntp_system_*`, `ntp_source_*`); see
//! docs/metrics.md for the mapping to `gnomon stats` and to chrony_exporter.

use super::ClientSlot;
use crate::server::stats::{Counter, WorkerStats};
use crate::sync::SyncReport;
use hdrhistogram::Histogram;
use metrics::{Label, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_exporter_prometheus::formatting::{write_help_line, write_type_line};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// ntpd-rs's metrics port, so a scrape config written for it finds gnomon too.
pub const DEFAULT_PORT: u16 = 9975;
/// Scrapes served at once; one more gets 503 at once. Prometheus sends one at a time.
pub const MAX_SCRAPERS: usize = 4;
/// The longest request head read (request line and headers).
const MAX_REQUEST_HEAD: usize = 8192;
/// How long a scraper may take to send its request, and each write of the answer may wait.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family for worker counters: its name and help text.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
}

macro_rules! family {
    ($id:ident, $name:literal, $help:literal) => {
        static $id: Family = Family {
            name: $name,
            help: $help,
        };
    };
}

family!(
    RECEIVED,
    "ntp_server_received_packets_total",
    "Datagrams received on the NTP sockets (gnomon stats: received)."
);
family!(
    ACCEPTED,
    "ntp_server_accepted_packets_total",
    "Requests answered, Kiss-o'-Death answers included (answered)."
);
family!(
    DENIED,
    "ntp_server_denied_packets_total",
    "Requests answered with Kiss-o'-Death DENY (kod_deny)."
);
family!(
    KOD_RATE,
    "ntp_server_kod_rate_packets_total",
    "Requests answered with Kiss-o'-Death RATE (kod_rate)."
);
family!(
    LEAKED,
    "ntp_server_rate_leaked_packets_total",
    "Over-limit requests answered anyway, so a spoofer cannot cut a victim off (rate_leaked)."
);
family!(
    DROPPED,
    "ntp_server_dropped_packets_total",
    "Requests dropped unanswered for what they are or where they come from, by reason (drop_*)."
);
family!(
    IGNORED,
    "ntp_server_ignored_packets_total",
    "Requests dropped by an ignore rule (drop_ignored)."
);
family!(
    RATE_LIMITED,
    "ntp_server_rate_limited_packets_total",
    "Requests dropped over the rate limit (drop_rate_limited)."
);
family!(
    SEND_ERRORS,
    "ntp_server_response_send_errors_total",
    "Replies the kernel refused to send (drop_send_failed)."
);
family!(
    SEND_ERROR_REASONS,
    "ntp_server_response_send_errors_by_reason_total",
    "Replies the kernel refused to send, by error; they add up to ntp_server_response_send_errors_total (send_error_*)."
);
family!(
    NO_TIMESTAMP,
    "ntp_server_no_kernel_timestamp_packets_total",
    "Requests without a kernel receive timestamp, stamped at batch start instead (no_kernel_timestamp)."
);
family!(
    BATCHES,
    "ntp_server_batches_total",
    "Receive batches handled (batches)."
);
family!(
    RULES,
    "ntp_server_rule_matched_packets_total",
    "Requests by the action of the access rule they matched (rule_*)."
);
family!(
    EVICTIONS,
    "ntp_server_rate_limit_table_evictions_total",
    "Rate-limit table entries taken over by another client (rate_table_evictions)."
);

family!(
    NTS_ACCEPTED,
    "ntp_server_nts_accepted_packets_total",
    "NTS-authenticated requests answered with an authenticated reply (nts_answered)."
);
family!(
    NTS_NACK,
    "ntp_server_nts_nack_packets_total",
    "NTS requests with an unusable cookie, answered with an NTS NAK, kiss code NTSN (nts_nak)."
);

/// Where a worker counter goes: its family and, for a family split by a label, that label. No
/// wildcard arm: a new counter does not build until it has a metric.
pub fn counter_metric(c: Counter) -> (&'static Family, Option<(&'static str, &'static str)>) {
    let drop = |reason| (&DROPPED, Some(("reason", reason)));
    let send = |reason| (&SEND_ERROR_REASONS, Some(("reason", reason)));
    let rule = |action| (&RULES, Some(("action", action)));
    match c {
        Counter::Received => (&RECEIVED, None),
        Counter::Answered => (&ACCEPTED, None),
        Counter::KodDeny => (&DENIED, None),
        Counter::KodRate => (&KOD_RATE, None),
        Counter::Leaked => (&LEAKED, None),
        Counter::TooShort => drop("too_short"),
        Counter::Oversized => drop("oversized"),
        Counter::BadVersion => drop("bad_version"),
        Counter::BadMode => drop("bad_mode"),
        Counter::ControlMode => drop("control_mode"),
        Counter::Ignored => (&IGNORED, None),
        Counter::RateLimited => (&RATE_LIMITED, None),
        Counter::SendFailed => (&SEND_ERRORS, None),
        Counter::NoTimestamp => (&NO_TIMESTAMP, None),
        Counter::Batches => (&BATCHES, None),
        Counter::RuleServe => rule("serve"),
        Counter::RuleIgnore => rule("ignore"),
        Counter::RuleDeny => rule("deny"),
        Counter::RuleLimited => rule("limited"),
        Counter::RuleExempt => rule("exempt"),
        Counter::RateEvicted => (&EVICTIONS, None),
        Counter::SourcePortZero => drop("source_port_zero"),
        Counter::SourceIpv4InIpv6 => drop("source_ipv4_in_ipv6"),
        Counter::SourceNotUnicast => drop("source_not_unicast"),
        Counter::DestinationNotUnicast => drop("destination_not_unicast"),
        Counter::KernelRxQueue => drop("kernel_rx_queue"),
        Counter::SendEinval => send("einval"),
        Counter::SendEperm => send("eperm"),
        Counter::SendUnreachable => send("unreachable"),
        Counter::SendBufferFull => send("buffer_full"),
        Counter::SendOther => send("other"),
        Counter::NtsAnswered => (&NTS_ACCEPTED, None),
        Counter::NtsNak => (&NTS_NACK, None),
        Counter::NtsDropped => drop("nts_invalid"),
        Counter::RuleNtsOnly => rule("nts-only"),
        Counter::NotNts => drop("not_nts"),
    }
}

/// The latency histogram's bucket bounds (seconds): 1 us to 1 s, 1-2.5-5 steps.
const LATENCY_BOUNDS_S: [f64; 19] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0,
];
/// Datagrams per batch: powers of two up to the largest batch a backend takes at once.
const BATCH_BOUNDS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// What a scrape reads: the workers' published stats and the sync thread's report.
pub struct MetricsSource {
    pub stats: Vec<Arc<WorkerStats>>,
    pub sync: Option<Box<dyn Fn() -> SyncReport + Send + Sync>>,
    pub started: Instant,
    /// The AF_XDP program's and sockets' counters, when `io = "xdp"` runs.
    pub xdp: Option<Arc<crate::server::xdp::XdpCounters>>,
    /// With `[nts]`: the KE server's counts.
    pub ke: Option<Arc<crate::nts::server::KeStats>>,
}

impl MetricsSource {
    pub fn render(&self) -> String {
        let report = self.sync.as_ref().map(|f| f());
        let mut out = render(&self.stats, report.as_ref(), self.started.elapsed().as_secs_f64());
        if let Some(x) = &self.xdp {
            out.push_str(&x.view().prometheus());
        }
        if let Some(ke) = &self.ke {
            out.push_str(&render_ke(ke));
        }
        out
    }
}

/// The NTS-KE server's connections: accepted, and each one's outcome.
pub fn render_ke(ke: &crate::nts::server::KeStats) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        for (name, v) in ke.counters() {
            match name.strip_prefix("ke_") {
                Some("accepted") => set_counter(
                    "ntp_server_nts_ke_accepted_connections_total",
                    "NTS-KE TCP connections accepted (ke_accepted); each ends in one outcome.",
                    &[],
                    v,
                ),
                Some(outcome) => set_counter(
                    "ntp_server_nts_ke_connections_total",
                    "NTS-KE connections by outcome: served, refused_busy, refused_policy, rate_limited, handshake_failed, timeout, bad_request, closed_early (ke_<outcome>).",
                    &[Label::new("outcome", outcome)],
                    v,
                ),
                None => {}
            }
        }
    });
    handle.render()
}

fn set_gauge(name: &'static str, help: &'static str, labels: &[Label], v: f64) {
    describe_gauge!(name, help);
    gauge!(name, labels.to_vec()).set(v);
}

fn set_counter(name: &'static str, help: &'static str, labels: &[Label], v: u64) {
    describe_counter!(name, help);
    counter!(name, labels.to_vec()).absolute(v);
}

/// The whole exposition: build info, per-worker counters and histograms, sync state.
pub fn render(stats: &[Arc<WorkerStats>], report: Option<&SyncReport>, uptime_s: f64) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let snapshots: Vec<_> = stats.iter().map(|s| (s, s.counters(), s.histograms())).collect();
    metrics::with_local_recorder(&recorder, || {
        let version = [Label::new("version", env!("CARGO_PKG_VERSION"))];
        set_gauge(
            "gnomon_build_info",
            "The running gnomon's version; always 1.",
            &version,
            1.0,
        );
        set_gauge(
            "gnomon_uptime_seconds",
            "Seconds since the server started.",
            &[],
            uptime_s,
        );
        for (s, counters, _) in &snapshots {
            let worker = Label::new("worker", s.worker.to_string());
            let info = [
                worker.clone(),
                Label::new("cpu", s.cpu.map(|c| c.to_string()).unwrap_or_default()),
                Label::new("backend", s.backend),
            ];
            set_gauge(
                "gnomon_worker_info",
                "A worker thread: the CPU it is pinned to and its I/O backend; always 1.",
                &info,
                1.0,
            );
            for c in Counter::ALL {
                let (family, split) = counter_metric(c);
                let mut labels = vec![worker.clone()];
                if let Some((k, v)) = split {
                    labels.push(Label::new(k, v));
                }
                set_counter(family.name, family.help, &labels, counters[c as usize]);
            }
        }
        if let Some(r) = report {
            sync_metrics(r);
        }
    });
    let mut out = handle.render();
    let latency: Vec<_> = snapshots.iter().map(|(s, _, (lat, _))| (s.worker, lat)).collect();
    write_histogram(
        &mut out,
        "ntp_server_processing_latency_seconds",
        "Kernel receive timestamp to transmit timestamp of each reply (gnomon stats latency); emptied by `gnomon stats --reset`.",
        &latency,
        &LATENCY_BOUNDS_S,
        1e-9,
    );
    let batches: Vec<_> = snapshots.iter().map(|(s, _, (_, bat))| (s.worker, bat)).collect();
    write_histogram(
        &mut out,
        "ntp_server_batch_size_packets",
        "Datagrams per receive batch; emptied by `gnomon stats --reset`.",
        &batches,
        &BATCH_BOUNDS,
        1.0,
    );
    out
}

/// The leap indicator (RFC 5905: 0 none, 1 insert, 2 delete, 3 unsynchronised) from the
/// report's words for it.
fn leap_indicator(text: &str) -> f64 {
    match text {
        "normal" => 0.0,
        "insert second" => 1.0,
        "delete second" => 2.0,
        _ => 3.0,
    }
}

/// The tally character of `gnomon sources` as a word.
fn source_state(tally: char) -> &'static str {
    match tally {
        '*' => "system_peer",
        '+' => "combined",
        '-' => "outlier",
        '#' => "too_far",
        'x' => "falseticker",
        _ => "not_candidate",
    }
}

fn sync_metrics(r: &SyncReport) {
    let s = &r.system;
    let none: &[Label] = &[];
    set_gauge(
        "ntp_system_stratum",
        "Stratum served (16 when unsynchronised).",
        none,
        s.stratum.into(),
    );
    set_gauge(
        "ntp_system_leap_indicator",
        "Leap indicator served: 0 none, 1 insert a second, 2 delete a second, 3 unsynchronised.",
        none,
        leap_indicator(&s.leap),
    );
    set_gauge(
        "ntp_system_synchronized",
        "1 when replies carry usable time.",
        none,
        f64::from(u8::from(s.synced)),
    );
    set_gauge(
        "ntp_system_holdover",
        "1 when synchronised but no source is selected (coasting on the last estimate).",
        none,
        f64::from(u8::from(s.holdover)),
    );
    set_gauge(
        "ntp_system_root_delay_seconds",
        "Root delay served.",
        none,
        s.root_delay_s,
    );
    set_gauge(
        "ntp_system_root_dispersion_seconds",
        "Root dispersion served now, growth since the last update included.",
        none,
        s.root_dispersion_s,
    );
    set_gauge(
        "ntp_system_offset_seconds",
        "Phase error left to slew at the last clock update.",
        none,
        s.offset_s,
    );
    set_gauge(
        "ntp_system_correction_seconds",
        "True time minus the kernel clock now (what software mode adds to each reply).",
        none,
        s.correction_s,
    );
    set_gauge(
        "ntp_system_frequency_ppm",
        "Rate of the correction (ppm).",
        none,
        s.frequency_ppm,
    );
    set_gauge(
        "ntp_system_kernel_frequency_ppm",
        "The kernel's frequency setting (ppm): steered in system mode, left alone in software mode.",
        none,
        s.kernel_frequency_ppm,
    );
    if let Some(t) = s.last_update_unix_s {
        set_gauge(
            "ntp_system_reference_timestamp_seconds",
            "Time of the last clock update (Unix seconds).",
            none,
            t,
        );
    }
    if let Some(ago) = s.since_update_s {
        set_gauge(
            "ntp_system_update_age_seconds",
            "Seconds since the last clock update.",
            none,
            ago,
        );
    }
    set_counter(
        "ntp_system_external_steps_total",
        "Steps of the kernel clock by other programs, each taken back out of served time.",
        none,
        s.external_steps.into(),
    );
    let info = [
        Label::new("refid", s.refid.clone()),
        Label::new("system_peer", s.system_peer.clone().unwrap_or_default()),
        Label::new("clock_mode", s.mode.clone()),
        Label::new("why_unsynchronised", s.why_unsynced.clone().unwrap_or_default()),
    ];
    set_gauge(
        "ntp_system_info",
        "The reference served, the clock mode and why unsynchronised if so; always 1.",
        &info,
        1.0,
    );
    let st = &r.stray;
    for (reason, v) in [
        ("unknown_source", st.unknown_source),
        ("too_short", st.too_short),
        ("wrong_origin", st.wrong_origin),
        ("unexpected", st.unexpected),
    ] {
        set_counter(
            "ntp_system_stray_packets_total",
            "Datagrams at the sync socket that were no reply to a request of ours, by reason.",
            &[Label::new("reason", reason)],
            v,
        );
    }
    for src in &r.sources {
        let id = [
            Label::new("name", src.name.clone()),
            Label::new("address", src.addr.map(|a| a.to_string()).unwrap_or_default()),
        ];
        let with = |extra: Vec<Label>| -> Vec<Label> { id.iter().cloned().chain(extra).collect() };
        set_gauge(
            "ntp_source_state_info",
            "A source's state (system_peer, combined, outlier, too_far, falseticker, not_candidate), kind (unicast, pool) and why it is not the system peer; always 1.",
            &with(vec![
                Label::new("state", source_state(src.tally)),
                Label::new("kind", if src.kind == 'p' { "pool" } else { "unicast" }),
                Label::new("refid", src.refid.clone()),
                Label::new("why", src.why.clone().unwrap_or_default()),
            ]),
            1.0,
        );
        set_gauge(
            "ntp_source_reachability_register",
            "The reach register: one bit per poll of the last 8, set when it was answered.",
            &id,
            src.reach.into(),
        );
        set_gauge("ntp_source_stratum", "The source's stratum.", &id, src.stratum.into());
        set_gauge(
            "ntp_source_poll_interval_seconds",
            "Time between polls of the source.",
            &id,
            (1u64 << src.poll_log2.clamp(0, 17)) as f64,
        );
        let ms = |v: Option<f64>| v.map(|v| v / 1000.0);
        for (name, help, v) in [
            (
                "ntp_source_offset_seconds",
                "Offset of the source's clock from ours (estimate).",
                ms(src.offset_ms),
            ),
            (
                "ntp_source_delay_seconds",
                "Round-trip delay to the source.",
                ms(src.delay_ms),
            ),
            (
                "ntp_source_jitter_seconds",
                "Jitter of the source's samples.",
                ms(src.jitter_ms),
            ),
            (
                "ntp_source_last_sample_age_seconds",
                "Seconds since the last valid reply.",
                src.when_s.map(|w| w as f64),
            ),
        ] {
            if let Some(v) = v {
                set_gauge(name, help, &id, v);
            }
        }
    }
}

/// Writes one Prometheus histogram per worker from its hdrhistogram: cumulative `le` buckets
/// (to the histogram's resolution, 3 significant digits for latency), `_sum` and `_count`.
fn write_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    per_worker: &[(usize, &Histogram<u64>)],
    bounds: &[f64],
    scale: f64,
) {
    write_help_line(out, name, None, None, help);
    write_type_line(out, name, None, None, "histogram");
    for (worker, h) in per_worker {
        let mut in_bucket = vec![0u64; bounds.len()];
        for v in h.iter_recorded() {
            let value = v.value_iterated_to() as f64 * scale;
            if let Some(i) = bounds.iter().position(|&b| value <= b) {
                in_bucket[i] += v.count_at_value();
            }
        }
        let mut cumulative = 0;
        for (b, n) in bounds.iter().zip(in_bucket) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{worker=\"{worker}\",le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{worker=\"{worker}\",le=\"+Inf\"}} {}", h.len());
        let sum = if h.is_empty() {
            0.0
        } else {
            h.mean() * h.len() as f64 * scale
        };
        let _ = writeln!(out, "{name}_sum{{worker=\"{worker}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{worker=\"{worker}\"}} {}", h.len());
    }
    out.push('\n');
}

/// A bound metrics listener, not yet served.
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Binds the metrics listener (port 0 picks a free port: see [`MetricsListener::local_addr`]).
/// An address other hosts can reach is allowed, with a warning: the endpoint has no access
/// control of its own.
pub fn bind(addr: SocketAddr) -> io::Result<MetricsListener> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("metrics listener {addr}: {e}"));
    let listener = TcpListener::bind(addr).map_err(ctx)?;
    listener.set_nonblocking(true).map_err(ctx)?;
    let addr = listener.local_addr().map_err(ctx)?;
    if let Some(w) = exposure_warning(addr) {
        log::warn!("{w}");
    }
    Ok(MetricsListener { listener, addr })
}

/// What to tell the operator about an endpoint other hosts can reach, if it is one.
pub fn exposure_warning(addr: SocketAddr) -> Option<String> {
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "metrics on {addr} can be reached from other hosts and has no access control: anyone who \
             reaches it reads the server's counters and sources; firewall it, or listen on 127.0.0.1"
        )
    })
}

impl MetricsListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop`: accepts on its own thread, each scrape on a thread of its own (at
    /// most [`MAX_SCRAPERS`]), each bounded by [`CLIENT_TIMEOUT`].
    pub fn spawn(self, src: Arc<MetricsSource>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("gnomon-metrics".into())
            .spawn(move || {
                // One line per run of failures (e.g. out of file descriptors), not one per try.
                let mut failing = false;
                while !stop.load(Ordering::Relaxed) {
                    match self.listener.accept() {
                        Ok((stream, _)) => {
                            failing = false;
                            admit(stream, &src, &active);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => {
                            if !failing {
                                log::warn!("metrics listener {}: {e}", self.addr);
                                failing = true;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
    }
}

fn admit(stream: TcpStream, src: &Arc<MetricsSource>, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::Relaxed) >= MAX_SCRAPERS {
        active.fetch_sub(1, Ordering::Relaxed);
        // Never wait on this client: one that does not read loses the answer. What it sent is
        // read first, so closing does not reset the connection before the answer is read.
        let _ = stream.set_nonblocking(true);
        let _ = (&stream).read(&mut [0u8; 1024]);
        let _ = (&stream).write_all(&simple(503, "Service Unavailable", "too many scrapes at once\n"));
        return;
    }
    let slot = ClientSlot(active.clone());
    let src = src.clone();
    let spawned = std::thread::Builder::new()
        .name("gnomon-metrics-client".into())
        .spawn(move || {
            let _slot = slot;
            let _ = serve(stream, &src);
        });
    if let Err(e) = spawned {
        log::warn!("metrics: no thread for a scrape: {e}");
    }
}

fn serve(stream: TcpStream, src: &MetricsSource) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let response = loop {
        if let Some(end) = head_end(&head) {
            break respond(&head[..end], || src.render());
        }
        if head.len() >= MAX_REQUEST_HEAD {
            break simple(431, "Request Header Fields Too Large", "request head too long\n");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        let n = (&stream).read(&mut buf)?;
        if n == 0 {
            // The client closed its side before the blank line ending the head.
            if head.is_empty() {
                return Ok(());
            }
            break simple(400, "Bad Request", "incomplete request\n");
        }
        head.extend_from_slice(&buf[..n]);
    };
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    (&stream).write_all(&response)?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// Where the request head ends (after its blank line), if it has.
fn head_end(head: &[u8]) -> Option<usize> {
    let crlf = head.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = head.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn response(status: u16, reason: &str, content_type: &str, extra: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

fn simple(status: u16, reason: &str, body: &str) -> Vec<u8> {
    response(status, reason, "text/plain; charset=utf-8", "", body, true)
}

/// The answer to one request head: GET or HEAD of `/metrics` renders, anything else is refused
/// with a status that says why.
pub fn respond(head: &[u8], render: impl FnOnce() -> String) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(head) else {
        return simple(400, "Bad Request", "request is not UTF-8\n");
    };
    let line = text.lines().next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return simple(400, "Bad Request", "expected `GET /metrics HTTP/1.1`\n");
    };
    if !version.starts_with("HTTP/1.") {
        return simple(400, "Bad Request", "expected HTTP/1.0 or HTTP/1.1\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => response(200, "OK", CONTENT_TYPE, "", &render(), method == "GET"),
        ("GET" | "HEAD", _) => simple(404, "Not Found", "gnomon serves its metrics at /metrics\n"),
        _ => response(
            405,
            "Method Not Allowed",
            "text/plain; charset=utf-8",
            "Allow: GET, HEAD\r\n",
            "only GET and HEAD\n",
            true,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::stats::LocalStats;
    use crate::sync::{SourceReport, StrayReport, SystemReport};

    fn worker(id: usize, counts: &[(Counter, u64)], latencies_ns: &[i64], batches: &[usize]) -> Arc<WorkerStats> {
        let shared = Arc::new(WorkerStats::new(id, Some(id), "mmsg"));
        let mut local = LocalStats::default();
        for &(c, n) in counts {
            local.add(c, n);
        }
        for &l in latencies_ns {
            local.record_latency(l);
        }
        for &b in batches {
            local.record_batch(b);
        }
        local.maybe_flush(&shared, 0, true);
        shared
    }

    fn report() -> SyncReport {
        SyncReport {
            sources: vec![SourceReport {
                name: "ntp.example".into(),
                addr: Some("192.0.2.1:123".parse().unwrap()),
                tally: '*',
                refid: "GPS".into(),
                stratum: 1,
                kind: 'u',
                when_s: Some(7),
                poll_log2: 6,
                reach: 0o377,
                delay_ms: Some(2.5),
                offset_ms: Some(-0.25),
                jitter_ms: Some(0.125),
                why: None,
                nts: None,
            }],
            system: SystemReport {
                synced: true,
                why_unsynced: None,
                holdover: false,
                stratum: 2,
                refid: "192.0.2.1".into(),
                system_peer: Some("ntp.example (192.0.2.1:123)".into()),
                offset_s: 1e-6,
                correction_s: 0.5,
                frequency_ppm: -12.5,
                root_delay_s: 0.0025,
                root_dispersion_s: 0.001,
                leap: "insert second".into(),
                last_update_unix_s: Some(1_700_000_000.0),
                since_update_s: Some(3.0),
                mode: "software".into(),
                kernel_frequency_ppm: 0.0,
                external_steps: 2,
                kernel_event: None,
                leap_note: None,
                leaps_applied: 0,
                refused: None,
                few_sources: None,
            },
            stray: StrayReport {
                unknown_source: 4,
                too_short: 1,
                wrong_origin: 2,
                unexpected: 3,
            },
        }
    }

    /// The value of the one sample whose name and labels are exactly `series`.
    fn sample(text: &str, series: &str) -> f64 {
        let hits: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(s, _)| *s == series)
            .map(|(_, v)| v.parse().unwrap())
            .collect();
        assert_eq!(hits.len(), 1, "{series} in\n{text}");
        hits[0]
    }

    #[test]
    fn every_counter_of_every_worker_is_exported_with_its_value() {
        // Distinct values per counter and worker, so a swapped mapping shows.
        let counts = |w: u64| -> Vec<(Counter, u64)> {
            Counter::ALL
                .iter()
                .filter(|c| **c != Counter::Batches)
                .map(|&c| (c, 1000 * w + c as u64 + 1))
                .collect()
        };
        let stats = vec![worker(0, &counts(1), &[], &[4, 4]), worker(1, &counts(2), &[], &[8])];
        let text = render(&stats, None, 1.0);
        for s in &stats {
            let values = s.counters();
            for c in Counter::ALL {
                let (f, split) = counter_metric(c);
                let series = match split {
                    Some((k, v)) => format!("{}{{worker=\"{}\",{k}=\"{v}\"}}", f.name, s.worker),
                    None => format!("{}{{worker=\"{}\"}}", f.name, s.worker),
                };
                assert_eq!(sample(&text, &series), values[c as usize] as f64, "{c:?}");
            }
        }
        assert_eq!(sample(&text, "ntp_server_batches_total{worker=\"0\"}"), 2.0);
        assert_eq!(
            sample(
                &text,
                "ntp_server_dropped_packets_total{worker=\"1\",reason=\"control_mode\"}"
            ),
            (2000 + Counter::ControlMode as u64 + 1) as f64
        );
        assert!(
            text.contains("# TYPE ntp_server_received_packets_total counter"),
            "{text}"
        );
        let version = format!("gnomon_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        assert_eq!(sample(&text, &version), 1.0);
        assert_eq!(
            sample(&text, "gnomon_worker_info{worker=\"1\",cpu=\"1\",backend=\"mmsg\"}"),
            1.0
        );
    }

    #[test]
    fn distinct_series_for_every_counter() {
        let series: std::collections::BTreeSet<_> = Counter::ALL
            .iter()
            .map(|&c| counter_metric(c))
            .map(|(f, l)| (f.name, l))
            .collect();
        assert_eq!(series.len(), Counter::COUNT);
        for (name, _) in series {
            assert!(name.ends_with("_total"), "{name}");
        }
    }

    #[test]
    fn histograms_are_cumulative_with_count_and_sum() {
        let lat = [500, 800, 3_000, 40_000, 2_000_000_000];
        let stats = vec![worker(3, &[], &lat, &[1, 3, 3, 700, 5000])];
        let text = render(&stats, None, 0.0);
        let b = |le: &str| {
            sample(
                &text,
                &format!("ntp_server_processing_latency_seconds_bucket{{worker=\"3\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(b("0.000001"), 2.0);
        assert_eq!(b("0.000005"), 3.0);
        assert_eq!(b("0.00005"), 4.0);
        assert_eq!(b("1"), 4.0);
        assert_eq!(b("+Inf"), 5.0);
        assert_eq!(
            sample(&text, "ntp_server_processing_latency_seconds_count{worker=\"3\"}"),
            5.0
        );
        let sum = sample(&text, "ntp_server_processing_latency_seconds_sum{worker=\"3\"}");
        let want: f64 = lat.iter().map(|&n| n as f64 * 1e-9).sum();
        assert!((sum - want).abs() < want * 1e-3, "{sum} vs {want}");
        let bb = |le: &str| {
            sample(
                &text,
                &format!("ntp_server_batch_size_packets_bucket{{worker=\"3\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(
            (bb("1"), bb("2"), bb("4"), bb("512"), bb("1024"), bb("+Inf")),
            (1.0, 1.0, 3.0, 3.0, 4.0, 5.0)
        );
        assert!(text.contains("# TYPE ntp_server_batch_size_packets histogram"));
    }

    #[test]
    fn sync_state_and_sources() {
        let text = render(&[], Some(&report()), 5.0);
        assert_eq!(sample(&text, "ntp_system_stratum"), 2.0);
        assert_eq!(sample(&text, "ntp_system_leap_indicator"), 1.0);
        assert_eq!(sample(&text, "ntp_system_synchronized"), 1.0);
        assert_eq!(sample(&text, "ntp_system_root_delay_seconds"), 0.0025);
        assert_eq!(sample(&text, "ntp_system_frequency_ppm"), -12.5);
        assert_eq!(sample(&text, "ntp_system_external_steps_total"), 2.0);
        assert_eq!(
            sample(&text, "ntp_system_stray_packets_total{reason=\"wrong_origin\"}"),
            2.0
        );
        let id = "{name=\"ntp.example\",address=\"192.0.2.1:123\"}";
        assert_eq!(sample(&text, &format!("ntp_source_reachability_register{id}")), 255.0);
        assert_eq!(sample(&text, &format!("ntp_source_offset_seconds{id}")), -0.00025);
        assert_eq!(sample(&text, &format!("ntp_source_delay_seconds{id}")), 0.0025);
        assert_eq!(sample(&text, &format!("ntp_source_poll_interval_seconds{id}")), 64.0);
        assert_eq!(sample(&text, &format!("ntp_source_last_sample_age_seconds{id}")), 7.0);
        assert!(
            text.contains("ntp_source_state_info{name=\"ntp.example\",address=\"192.0.2.1:123\",state=\"system_peer\",kind=\"unicast\",refid=\"GPS\",why=\"\"} 1"),
            "{text}"
        );
        assert!(text.contains("system_peer=\"ntp.example (192.0.2.1:123)\""), "{text}");
        let mut r = report();
        r.system.leap = "not synchronised".into();
        r.sources[0].why = Some("unreachable (no reply to 8 polls) \"quoted\"".into());
        r.sources[0].offset_ms = None;
        let text = render(&[], Some(&r), 5.0);
        assert_eq!(sample(&text, "ntp_system_leap_indicator"), 3.0);
        assert!(
            text.contains(r#"why="unreachable (no reply to 8 polls) \"quoted\"""#),
            "{text}"
        );
        assert!(
            !text.contains("ntp_source_offset_seconds{"),
            "no sample without a value"
        );
    }

    #[test]
    fn the_grafana_dashboard_uses_only_exported_names() {
        let dashboard = include_str!("../../deploy/grafana/gnomon.json");
        let text = render(&[worker(0, &[], &[1000], &[1])], Some(&report()), 1.0);
        let mut names = std::collections::BTreeSet::new();
        for (i, _) in dashboard
            .match_indices("ntp_")
            .chain(dashboard.match_indices("gnomon_"))
        {
            let end = dashboard[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(dashboard.len(), |e| i + e);
            names.insert(&dashboard[i..end]);
        }
        assert!(names.len() > 20, "{names:?}");
        for n in names {
            assert!(
                text.contains(&format!("\n{n}{{")) || text.contains(&format!("\n{n} ")),
                "the dashboard uses {n}, which gnomon does not export"
            );
        }
    }

    fn status(r: &[u8]) -> (u16, String) {
        let t = String::from_utf8_lossy(r).to_string();
        (t[9..12].parse().unwrap(), t)
    }

    #[test]
    fn http_answers() {
        let (s, t) = status(&respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || "a 1\n".into()));
        assert_eq!(s, 200);
        assert!(t.contains("Content-Type: text/plain; version=0.0.4"), "{t}");
        assert!(
            t.contains("Content-Length: 4\r\n") && t.ends_with("\r\n\r\na 1\n"),
            "{t}"
        );
        let (s, t) = status(&respond(b"HEAD /metrics HTTP/1.0\r\n\r\n", || "a 1\n".into()));
        assert_eq!(s, 200);
        assert!(t.ends_with("\r\n\r\n"), "HEAD has no body: {t}");
        assert_eq!(
            status(&respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", String::new)).0,
            200
        );
        assert_eq!(status(&respond(b"GET / HTTP/1.1\r\n\r\n", || unreachable!())).0, 404);
        let (s, t) = status(&respond(b"POST /metrics HTTP/1.1\r\n\r\n", || unreachable!()));
        assert_eq!(s, 405);
        assert!(t.contains("Allow: GET, HEAD"));
        assert_eq!(status(&respond(b"GET /metrics\r\n\r\n", || unreachable!())).0, 400);
        assert_eq!(status(&respond(b"\xff\xfe\r\n\r\n", || unreachable!())).0, 400);
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
    }

    #[test]
    fn a_non_loopback_endpoint_is_warned_about() {
        for quiet in ["127.0.0.1:9975", "127.3.4.5:1", "[::1]:9975"] {
            assert_eq!(exposure_warning(quiet.parse().unwrap()), None, "{quiet}");
        }
        for loud in ["0.0.0.0:9975", "192.0.2.1:9975", "[::]:9975", "[2001:db8::1]:9975"] {
            let w = exposure_warning(loud.parse().unwrap()).unwrap_or_default();
            assert!(w.contains("no access control"), "{loud}: {w}");
        }
    }

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn served_over_tcp_with_bounded_clients() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr();
        let src = Arc::new(MetricsSource {
            stats: vec![worker(0, &[(Counter::Received, 5)], &[], &[])],
            sync: Some(Box::new(report)),
            started: Instant::now(),
            xdp: None,
            ke: None,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let h = l.spawn(src, stop.clone()).unwrap();
        let out = get(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(
            out.contains("ntp_server_received_packets_total{worker=\"0\"} 5\n"),
            "{out}"
        );
        assert!(out.contains("ntp_system_stratum 2\n"), "{out}");
        // Silent clients hold a slot each until their timeout; the one after them is told so
        // at once, and a scrape after the timeouts is served again.
        let silent: Vec<_> = (0..MAX_SCRAPERS).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let busy = get(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(busy.starts_with("HTTP/1.0 503"), "{busy}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        std::thread::sleep(CLIENT_TIMEOUT + Duration::from_millis(500));
        assert!(get(addr, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200"));
        drop(silent);
        let big = vec![b'a'; MAX_REQUEST_HEAD];
        assert!(get(addr, &big).starts_with("HTTP/1.0 431"));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }

    #[test]
    fn ke_outcomes_are_one_family_with_an_outcome_label() {
        use crate::nts::server::{KeOutcome, KeStats};
        let ke = KeStats::default();
        ke.count(KeOutcome::Timeout);
        ke.count(KeOutcome::Timeout);
        ke.count(KeOutcome::RateLimited);
        let out = render_ke(&ke);
        assert!(
            out.contains("ntp_server_nts_ke_connections_total{outcome=\"timeout\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("ntp_server_nts_ke_connections_total{outcome=\"rate_limited\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("ntp_server_nts_ke_connections_total{outcome=\"served\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("ntp_server_nts_ke_accepted_connections_total 0\n"),
            "{out}"
        );
    }
}
