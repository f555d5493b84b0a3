//! `gnomon serve`: wires config, clock, workers, control socket and signals together.

use crate::clock::{self, ClockState};
use crate::config::Config;
use crate::control::{self, ControlContext};
use crate::policy::{PolicySet, SharedPolicy};
use crate::server::{self, ntp::NtpHandler};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Re-reads the config file and swaps in its access rules and rate limits. Everything else
/// (listen addresses, workers, time sources) needs a restart, and the answer says so.
fn reload(
    source: &str,
    policy: &SharedPolicy,
    certificate: Option<&crate::nts::server::Certificate>,
) -> Result<String, String> {
    let cfg = if source == crate::config::EMBEDDED_NAME {
        Config::embedded()
    } else {
        Config::load(std::path::Path::new(source)).map_err(|e| format!("reload refused, old policy kept: {e}"))?
    };
    let rules = cfg.policy.rules.len();
    let default = cfg.policy.default;
    let generation = policy.replace(cfg.policy);
    // The certificate and key are re-read from the paths the server started with.
    let nts = match certificate.map(|c| c.reload()) {
        None => "",
        Some(Ok(())) => ", NTS certificate re-read",
        Some(Err(e)) => {
            return Err(format!(
                "policy reloaded, but the NTS certificate was not (old one kept): {e}"
            ));
        }
    };
    Ok(format!(
        "reloaded {source}: {rules} restrict rules, default {default}, policy generation {generation}{nts} (listen, workers and time sources need a restart)"
    ))
}

/// Runs until SIGINT or SIGTERM, or until a part of the server fails (then with its error).
pub fn serve(cfg: Config) -> io::Result<()> {
    // Whether this start creates the control socket's directory (it then belongs to `user`).
    let control_dir = cfg.control_socket.parent().filter(|d| !d.as_os_str().is_empty());
    let new_control_dir = control_dir.is_some_and(|d| !d.exists());
    // Before anything is bound: a second gnomon with this control socket must not start at all.
    let lock = server::listeners::InstanceLock::acquire(&cfg.control_socket)?;
    let control_listener = match control::bind(&cfg.control_socket) {
        Ok(l) => Some(l),
        // A sandbox without Unix sockets (a seccomp profile; clknetsim's shim refuses AF_UNIX)
        // still serves NTP; only the control commands are missing. Any other failure (a
        // live server, a file in the way) stops the start.
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            log::warn!("{e}: serving without a control socket (stats, status and reload unavailable)");
            None
        }
        Err(e) => return Err(e),
    };
    let metrics_listener = cfg.metrics.map(control::metrics::bind).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    // SIGHUP's default action would kill the server on `systemctl reload`.
    let reload_requested = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload_requested.clone())?;
    let mut systemd = crate::notify::Systemd::from_env()?;

    // Everything privileged happens before this point, on this single thread; every thread
    // starts after it, with the reduced credentials (see server::privileges).
    let bound = server::bind(&cfg.serve)?;
    // The certificate, key and fleet secret may be readable by root only.
    let nts = cfg.nts.as_ref().map(crate::nts::server::prepare).transpose()?;
    drop_privileges(
        &cfg,
        control_listener.is_some(),
        &lock.path,
        new_control_dir.then_some(control_dir).flatten(),
    )?;

    let precision = clock::measure_precision().unwrap_or_else(|| {
        log::warn!(
            "the clock did not tick while read for its precision; reporting 2^{} s",
            clock::FALLBACK_PRECISION
        );
        clock::FALLBACK_PRECISION
    });
    let (publisher, reader) = clock::snapshot(ClockState::unsynchronized(precision));
    // The sync thread publishes its first state before it returns, so workers never answer
    // from a state older than the configuration.
    let sync = crate::sync::spawn(cfg.sync.clone(), publisher, precision, stop.clone())?;
    let policy = Arc::new(SharedPolicy::new(PolicySet::build(cfg.policy.clone(), None)));
    let ke = nts
        .map(|p| crate::nts::server::spawn(p, policy.clone(), stop.clone()))
        .transpose()?;
    let nts_keys = ke.as_ref().map(|k| k.keys.clone());
    let srv = server::spawn(
        bound,
        |_, st| {
            let h = NtpHandler::new(reader.clone(), policy.clone(), st);
            match &nts_keys {
                Some(k) => h.with_nts(k.clone()),
                None => h,
            }
        },
        stop.clone(),
    )?;
    for a in &srv.local_addrs {
        log::info!(
            "listening on {a} ({} workers, {} backend)",
            srv.kernel_workers,
            srv.backend
        );
    }
    if let Some(x) = &srv.xdp {
        log::info!(
            "AF_XDP on {}: RX queues {:?}, {} mode, beside the kernel sockets",
            x.interface,
            x.queues(),
            x.mode
        );
    }
    if let Some(k) = &ke {
        // Not "listening on": that wording names the NTP sockets.
        log::info!("NTS-KE on TCP {} (TLS 1.3, ALPN ntske/1)", k.local_addr);
    }
    match (cfg.sync.upstreams.len(), cfg.sync.local_stratum) {
        (0, Some(s)) => log::info!("time source: system clock as LOCAL stratum {s}"),
        (0, None) => log::warn!("no time source configured: replies say unsynchronised (LI 3)"),
        (n, _) => log::info!("time source: {n} upstream entries, clock mode {}", cfg.sync.mode.name()),
    }
    log::info!(
        "policy: {} restrict rules, default {}, rate limit {} s interval, burst {}",
        cfg.policy.rules.len(),
        cfg.policy.default,
        cfg.policy.rate_limit.interval,
        cfg.policy.rate_limit.burst
    );
    let source = cfg.source.clone();
    let control_policy = policy.clone();
    let certificate = ke.as_ref().map(|k| k.certificate.clone());
    let control_certificate = certificate.clone();
    let sync_report = sync.reporter();
    let extra: control::Extra = Box::new(move |line: &str| match line {
        "sources" => Some(crate::sync::render_sources(&sync_report.report(), false)),
        "sources why" => Some(crate::sync::render_sources(&sync_report.report(), true)),
        "status" => Some(crate::sync::render_status(&sync_report.report())),
        "sync json" => Some(serde_json::to_string_pretty(&sync_report.report()).unwrap_or_default() + "\n"),
        l if l.starts_with("explain ") => Some(control::explain(
            &control_policy.load(),
            &source,
            &l["explain ".len()..],
            crate::clock::realtime_ns(),
        )),
        "reload" => Some(match reload(&source, &control_policy, control_certificate.as_deref()) {
            Ok(m) => {
                log::info!("{m}");
                m + "\n"
            }
            Err(m) => {
                log::error!("{m}");
                format!("error: {m}\n")
            }
        }),
        _ => None,
    });
    let mut ctx = ControlContext::new(srv.stats.clone(), Some(extra));
    ctx.xdp = srv.xdp.clone();
    ctx.ke = ke.as_ref().map(|k| k.stats.clone());
    let ctx = Arc::new(ctx);
    let control = match control_listener {
        Some(l) => {
            let h = l.spawn(ctx, stop.clone())?;
            log::info!("control socket {}", cfg.control_socket.display());
            Some(h)
        }
        None => None,
    };
    // Prometheus metrics, read from the published stats at scrape time (see control/metrics.rs).
    let metrics = match metrics_listener {
        Some(l) => {
            let addr = l.local_addr();
            let reporter = sync.reporter();
            let src = control::metrics::MetricsSource {
                stats: srv.stats.clone(),
                sync: Some(Box::new(move || reporter.report())),
                started: std::time::Instant::now(),
                xdp: srv.xdp.clone(),
                ke: ke.as_ref().map(|k| k.stats.clone()),
            };
            let h = l.spawn(Arc::new(src), stop.clone())?;
            log::info!("metrics on {addr} (http://{addr}/metrics)");
            Some(h)
        }
        None => None,
    };
    if let Some(w) = systemd.watchdog() {
        log::info!(
            "systemd watchdog: pinged every {:.1} s while every worker runs",
            w.as_secs_f64()
        );
    }

    let worker_stats = srv.stats.clone();
    let status_report = sync.reporter();
    let r = srv.supervise(&stop, || {
        if systemd.active() {
            let counts: Vec<u64> = worker_stats.iter().map(|s| s.flushes()).collect();
            systemd.tick(
                &counts,
                || crate::notify::status_line(&status_report.report().system),
                Instant::now(),
            );
        }
        if reload_requested.swap(false, Ordering::Relaxed) {
            match reload(&cfg.source, &policy, certificate.as_deref()) {
                Ok(m) => log::info!("SIGHUP: {m}"),
                Err(m) => log::error!("SIGHUP: {m}"),
            }
        }
        if sync.is_finished() {
            return Some(io::Error::other("the sync thread ended"));
        }
        if ke.as_ref().is_some_and(|k| k.is_finished()) {
            return Some(io::Error::other("an NTS-KE thread ended"));
        }
        control
            .as_ref()
            .is_some_and(|c| c.is_finished())
            .then(|| io::Error::other("the control socket thread ended"))
    });
    systemd.stopping();
    log::info!("stopping");
    let _ = sync.join();
    if let Some(c) = control {
        let _ = c.join();
    }
    if let Some(h) = metrics {
        let _ = h.join();
    }
    if let Some(k) = ke {
        k.join();
    }
    drop(lock);
    log::info!("stopped");
    r
}

/// Gives the control socket (and its lock file, and its directory if this start created it) to
/// the configured user, then becomes that user with only the capabilities the clock mode needs.
/// Without `user`, the server stays as it was started, with a warning when that is root.
fn drop_privileges(cfg: &Config, control: bool, lock: &Path, new_dir: Option<&Path>) -> io::Result<()> {
    use server::privileges::{self, capabilities_for, describe};
    let Some(account) = &cfg.run_as else {
        if privileges::euid() == 0 {
            log::warn!(
                "running as root with every capability: set `user` (and `group`) in {} to drop to an \
                 unprivileged user once the sockets are bound",
                cfg.source
            );
        }
        return Ok(());
    };
    let keep = capabilities_for(cfg.sync.mode);
    if privileges::euid() != 0 {
        if privileges::euid() == account.uid && privileges::egid() == account.gid {
            log::info!("already running as user {} and group {}", account.user, account.group);
            return Ok(());
        }
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: `user = \"{}\"` needs gnomon to start as root (it runs as uid {}); start it as root, \
                 or as that user without `user`",
                cfg.source,
                account.user,
                privileges::euid()
            ),
        ));
    }
    let give = |p: &Path| {
        std::os::unix::fs::chown(p, Some(account.uid), Some(account.gid))
            .map_err(|e| io::Error::new(e.kind(), format!("chown {} to {}: {e}", p.display(), account.user)))
    };
    if control {
        give(&cfg.control_socket)?;
    }
    give(lock)?;
    if let Some(d) = new_dir {
        give(d)?;
    }
    privileges::drop_to(account, keep)?;
    log::info!(
        "dropped privileges: user {} (uid {}), group {} (gid {}), {}",
        account.user,
        account.uid,
        account.group,
        account.gid,
        describe(keep)
    );
    Ok(())
}

/// The bare echo server with the same workers and backend, for benchmarks.
pub fn bench_echo(opts: &server::ServeOptions) -> io::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let srv = server::start(opts, |_, st| server::echo::EchoHandler::new(st), stop.clone())?;
    for a in &srv.local_addrs {
        log::info!(
            "echo listening on {a} ({} workers, {} backend)",
            srv.stats.len(),
            srv.backend
        );
    }
    srv.supervise(&stop, || None)
}
