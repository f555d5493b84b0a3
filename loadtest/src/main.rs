//! gnomon-load's command line: parse, run, print the report and write the requested files.

use clap::Parser;
use gnomon_load::{Abuser, RampPlan, ReplyKind, RunConfig, Shape, run};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::time::Duration;

/// Seconds with an optional unit: 10s, 250ms, 2m, 1.5 (seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("bad duration {s:?}"))?;
    Duration::try_from_secs_f64(v * scale).map_err(|_| format!("bad duration {s:?}"))
}

/// A rate or count with an optional k/M suffix: 50000, 50k, 1.5M.
fn parse_si(s: &str) -> Result<f64, String> {
    let (num, scale) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('M') => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("bad number {s:?}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v * scale)
    } else {
        Err(format!("bad number {s:?}"))
    }
}

fn parse_count(s: &str) -> Result<u64, String> {
    parse_si(s).map(|v| v as u64)
}

/// A fraction: 1% or 0.01.
fn parse_loss(s: &str) -> Result<f64, String> {
    match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("bad loss {s:?}"))
}

/// ADDRESS:RATE, e.g. 127.9.9.9:500.
fn parse_abuser(s: &str) -> Result<Abuser, String> {
    let (a, r) = s.rsplit_once(':').ok_or("expected ADDRESS:RATE")?;
    Ok(Abuser {
        addr: a.parse::<Ipv4Addr>().map_err(|e| format!("{a}: {e}"))?,
        rate: parse_si(r)?,
    })
}

/// Load generator and reply validator for NTP servers on loopback.
///
/// Sends NTP client requests open-loop from many 127/8 source addresses, validates every reply
/// and reports rate, loss, Kiss-o'-Death codes, invalid replies and RTT percentiles.
#[derive(Parser, Debug)]
#[command(name = "gnomon-load", version)]
struct Cli {
    /// Server address (IPv4). Only 127.0.0.0/8 unless --allow-remote.
    #[arg(default_value = "127.0.0.1:123")]
    target: SocketAddrV4,
    /// Offered rate of the client population, requests/s (k/M suffixes).
    #[arg(long, default_value = "1000", value_parser = parse_si)]
    rate: f64,
    /// Send as fast as possible instead of at --rate.
    #[arg(long, conflicts_with = "ramp")]
    max: bool,
    /// Step the rate up until loss passes --max-loss; report the highest rate under it.
    #[arg(long)]
    ramp: bool,
    /// First rate of a ramp.
    #[arg(long, default_value = "10k", value_parser = parse_si)]
    ramp_start: f64,
    /// Each ramp step multiplies the rate by this...
    #[arg(long, default_value = "1.25")]
    ramp_factor: f64,
    /// ...or adds this many requests/s instead.
    #[arg(long, value_parser = parse_si)]
    ramp_step: Option<f64>,
    /// How long each ramp step lasts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    step_duration: Duration,
    /// Loss that ends a ramp (1% or 0.01).
    #[arg(long, default_value = "1%", value_parser = parse_loss)]
    max_loss: f64,
    /// Bisection steps between the last passing and the first failing rate.
    #[arg(long, default_value = "3")]
    refine: u32,
    /// Measure a failing ramp step again up to this many times; it fails only if every attempt
    /// does (a single burst of loss then does not end the ramp).
    #[arg(long, default_value = "0")]
    ramp_retries: u32,
    /// Bound on the whole run's sending time (a ramp's steps included).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Bound on requests sent.
    #[arg(long, default_value = "10M", value_parser = parse_count)]
    max_packets: u64,
    /// Distinct client addresses, 127.1.0.0 upwards (1: the kernel picks 127.0.0.1).
    #[arg(long, default_value = "1000")]
    clients: u32,
    /// Pick clients from a Zipf distribution with this exponent instead of round-robin.
    #[arg(long)]
    zipf: Option<f64>,
    /// A client at its own rate on top of the population: ADDRESS:RATE (repeatable).
    #[arg(long, value_parser = parse_abuser)]
    abuser: Vec<Abuser>,
    /// Source ports (sockets); batches rotate over them.
    #[arg(long, default_value = "4")]
    ports: usize,
    /// Requests per sendmmsg call.
    #[arg(long, default_value = "32")]
    batch: usize,
    /// The server is a bare UDP echo: match replies by bytes, do not check NTP fields.
    #[arg(long)]
    echo: bool,
    /// NTP version of the requests.
    #[arg(long = "ntp-version", default_value = "4")]
    ntp_version: u8,
    /// T2 and T3 must be within this of our clock.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    time_bound: Duration,
    /// Wait this long for late replies after sending stops (and between ramp steps).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    drain: Duration,
    /// Pin the generator's threads to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the RTT percentile distribution (.hgrm, microseconds) here.
    #[arg(long)]
    hgrm: Option<std::path::PathBuf>,
    /// Write throughput and p99 latency against offered rate as SVG here.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Compare our counts with /proc/net/snmp UDP counters over the same window.
    #[arg(long)]
    snmp_check: bool,
    /// Allow a target outside 127.0.0.0/8.
    #[arg(long)]
    allow_remote: bool,
    /// Authenticated requests (NTS): key exchanges with the target first, then every reply's
    /// authenticator checked; NAKs are counted as kiss code NTSN.
    #[arg(long, conflicts_with = "echo")]
    nts: bool,
    /// NTS-KE port on the target's address.
    #[arg(long, default_value_t = gnomon::nts::DEFAULT_KE_PORT)]
    nts_port: u16,
    /// Trust anchors (PEM) for the NTS-KE certificate (the system's roots by default).
    #[arg(long)]
    nts_ca: Option<std::path::PathBuf>,
    /// The name the NTS-KE certificate must carry (default: the target's address).
    #[arg(long)]
    nts_name: Option<String>,
    /// Key exchanges made before the run; their cookies are shared by all clients.
    #[arg(long, default_value = "16")]
    nts_sessions: usize,
    /// Send and receive through an AF_XDP socket on this interface (queue 0), whose link the
    /// target is on (a veth pair between namespaces): one source address and port, the
    /// interface's; needs root. The kernel still carries ARP and NTS-KE.
    #[arg(long, requires = "allow_remote")]
    xdp: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let shape = if cli.max {
        Shape::Max
    } else if cli.ramp {
        Shape::Ramp(RampPlan {
            start: cli.ramp_start,
            factor: cli.ramp_factor,
            add: cli.ramp_step,
            step_duration: cli.step_duration,
            max_loss: cli.max_loss,
            refine: cli.refine,
            retries: cli.ramp_retries,
        })
    } else {
        Shape::Fixed { rate: cli.rate }
    };
    let cfg = RunConfig {
        target: cli.target,
        allow_remote: cli.allow_remote,
        shape,
        duration: cli.duration,
        max_packets: cli.max_packets,
        clients: cli.clients,
        zipf: cli.zipf,
        abusers: cli.abuser,
        ports: cli.ports,
        batch: cli.batch,
        kind: if cli.echo { ReplyKind::Echo } else { ReplyKind::Ntp },
        version: cli.ntp_version,
        time_bound: cli.time_bound,
        drain: cli.drain,
        cpu: cli.cpu,
        progress: !cli.no_progress,
        snmp_check: cli.snmp_check,
        nts: cli.nts.then(|| gnomon_load::nts::NtsPlan {
            ke: std::net::SocketAddr::new((*cli.target.ip()).into(), cli.nts_port),
            server_name: cli.nts_name.clone().unwrap_or_else(|| cli.target.ip().to_string()),
            ca: cli
                .nts_ca
                .clone()
                .unwrap_or_else(|| gnomon::nts::ke_client::SYSTEM_ROOTS.into()),
            sessions: cli.nts_sessions,
        }),
        xdp: cli.xdp.clone(),
        ..RunConfig::default()
    };
    let report = match run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gnomon-load: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    let mut ok = true;
    let mut write = |path: &Option<std::path::PathBuf>, text: String| {
        if let Some(p) = path
            && let Err(e) = std::fs::write(p, text)
        {
            eprintln!("gnomon-load: {}: {e}", p.display());
            ok = false;
        }
    };
    write(&cli.hgrm, report.hgrm());
    write(&cli.plot, report.svg());
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_si("50k"), Ok(50_000.0));
        assert_eq!(parse_si("1.5M"), Ok(1_500_000.0));
        assert!(parse_si("-1").is_err());
        assert_eq!(parse_loss("1%"), Ok(0.01));
        assert_eq!(parse_loss("0.02"), Ok(0.02));
        let a = parse_abuser("127.9.9.9:2k").unwrap();
        assert_eq!((a.addr, a.rate), (Ipv4Addr::new(127, 9, 9, 9), 2000.0));
        assert!(parse_abuser("127.9.9.9").is_err());
    }
}
