//! `gnomon serve`: wires config, clock, workers, control socket and signals together.

use crate::clock::{self, ClockPublisher, ClockState};
use crate::config::Config;
use crate::control::{self, ControlContext};
use crate::server::{self, ntp::NtpHandler};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the LOCAL clock refreshes its reference time (as ntpd's local driver does per poll).
const LOCAL_REFRESH: Duration = Duration::from_secs(16);

/// The LOCAL clock: the system clock, claimed at the configured stratum.
fn local_state(stratum: u8, precision: i8, now: i64) -> ClockState {
    ClockState {
        base_realtime_ns: now,
        leap: crate::proto::LeapIndicator::NoWarning,
        stratum,
        reference_id: crate::proto::RefId::LOCL,
        reference_time_ns: now,
        ..ClockState::unsynchronized(precision)
    }
}

/// Refreshes the LOCAL clock's reference time; the first state is published before the
/// workers start, so no request is ever answered "unsynchronised" by a configured LOCAL clock.
fn run_clock(stratum: Option<u8>, mut publisher: ClockPublisher, precision: i8, stop: &AtomicBool) {
    let Some(stratum) = stratum else { return };
    while !stop.load(Ordering::Relaxed) {
        let mut slept = Duration::ZERO;
        while slept < LOCAL_REFRESH && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            slept += Duration::from_millis(100);
        }
        publisher.publish(local_state(stratum, precision, clock::realtime_ns()));
    }
}

/// Runs until SIGINT or SIGTERM.
pub fn serve(cfg: Config) -> io::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    // SIGHUP's default action would kill the server on `systemctl reload`.
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;

    let precision = clock::measure_precision();
    let (mut publisher, reader) = clock::snapshot(ClockState::unsynchronized(precision));
    if let Some(stratum) = cfg.local_stratum {
        publisher.publish(local_state(stratum, precision, clock::realtime_ns()));
    }
    let srv = server::start(&cfg.serve, |_, st| NtpHandler::new(reader.clone(), st), stop.clone())?;
    for a in &srv.local_addrs {
        log::info!(
            "listening on {a} ({} workers, {} backend)",
            srv.stats.len(),
            srv.backend
        );
    }
    match cfg.local_stratum {
        Some(s) => log::info!("time source: system clock as LOCAL stratum {s}"),
        None => log::warn!("no time source configured: replies say unsynchronised (LI 3)"),
    }
    let ctx = Arc::new(ControlContext::new(srv.stats.clone(), None));
    let control = match control::spawn(&cfg.control_socket, ctx, stop.clone()) {
        Ok(h) => {
            log::info!("control socket {}", cfg.control_socket.display());
            Some(h)
        }
        Err(e) => {
            log::warn!("control socket {} not available: {e}", cfg.control_socket.display());
            None
        }
    };
    let clock_stop = stop.clone();
    let local_stratum = cfg.local_stratum;
    let clock_thread = std::thread::Builder::new()
        .name("gnomon-clock".into())
        .spawn(move || run_clock(local_stratum, publisher, precision, &clock_stop))?;

    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if reload.swap(false, Ordering::Relaxed) {
            log::info!("SIGHUP: nothing to reload in this configuration");
        }
    }
    log::info!("stopping");
    let r = srv.join();
    let _ = clock_thread.join();
    if let Some(c) = control {
        let _ = c.join();
    }
    log::info!("stopped");
    r
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
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    srv.join()
}
