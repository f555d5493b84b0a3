//! The `gnomon` command: parse the command line, run the subcommand.

use clap::{CommandFactory, Parser, Subcommand};
use gnomon::config::{self, Config};
use gnomon::server::IoMode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "gnomon", version, about = "A public NTP server for pool-scale load")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve NTP until SIGINT or SIGTERM.
    Serve {
        /// Config file (default: /etc/gnomon/gnomon.toml if it exists, else the embedded default).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address, replacing the config's list (repeatable).
        #[arg(long, value_parser = config::parse_listen)]
        listen: Vec<SocketAddr>,
        /// Worker threads (0 = one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// I/O backend: auto, uring, uring-send, mmsg, or xdp (with an [xdp] table in the config).
        #[arg(long)]
        io: Option<IoMode>,
        /// CPUs to pin workers to, e.g. 1 or 0,1.
        #[arg(long, value_delimiter = ',')]
        cpus: Vec<usize>,
        /// Control socket path.
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Ask an NTP server for the time once and show its answer.
    Query {
        /// HOST, HOST:PORT or [IPV6]:PORT.
        server: String,
        /// NTP version of the request (1-4).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=4))]
        ntp_version: u8,
        /// Seconds to wait for the reply (and for NTS-KE, with --nts).
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
        /// Run NTS-KE first (TLS to HOST's NTS-KE port), then one authenticated exchange.
        #[arg(long)]
        nts: bool,
        /// The NTS-KE port, with --nts.
        #[arg(long, default_value_t = gnomon::nts::DEFAULT_KE_PORT)]
        nts_port: u16,
        /// Trust anchors for the NTS-KE certificate (PEM), with --nts; the system's by default.
        #[arg(long)]
        nts_ca: Option<PathBuf>,
    },
    /// Validate a config file without serving, and say what it sets up.
    CheckConfig {
        /// The gnomon.toml to check.
        file: PathBuf,
    },
    /// Write a gnomon.toml equivalent to an ntpd/NTPsec ntp.conf or a chrony.conf, and list
    /// (file:line) what could not be carried over and why.
    ConvertConfig {
        /// The ntp.conf or chrony.conf to read.
        file: PathBuf,
        /// Its format, when its keywords do not tell: ntp (ntpd, NTPsec) or chrony.
        #[arg(long, value_parser = parse_format)]
        from: Option<gnomon::config::convert::Format>,
        /// Where to write the gnomon.toml (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Per-core counters and latency of the running server.
    Stats {
        #[command(flatten)]
        control: ControlArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Empty the latency and batch histograms after reading them (counters keep counting).
        #[arg(long)]
        reset: bool,
    },
    /// Upstream sources, like `ntpq -p`; with --why, in words why each is or is not used.
    /// Exits 3 when the server is unsynchronised.
    Sources {
        #[command(flatten)]
        control: ControlArgs,
        /// Say in words why each source is or is not used.
        #[arg(long)]
        why: bool,
        /// Sources and system state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The system clock state, like `chronyc tracking`. Exits 3 when the server is unsynchronised.
    Status {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Why the running server treats a client as it does: the access rule that matches ADDR,
    /// with its file:line, the action, and the client's rate-limit state now.
    Explain {
        #[command(flatten)]
        control: ControlArgs,
        /// The client's IP address (IPv4 or IPv6).
        addr: std::net::IpAddr,
    },
    /// The busiest clients by requests and by drops, like `chronyc clients`, estimated from 1 in
    /// 64 requests sampled by the workers.
    Clients {
        #[command(flatten)]
        control: ControlArgs,
        /// How many clients each list shows.
        #[arg(long, short = 'n', default_value_t = 10)]
        top: usize,
    },
    /// Re-read the config's access rules and rate limits in the running server (as SIGHUP does).
    Reload {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// A bare UDP echo server on the same workers and backend (the benchmark ceiling).
    #[command(hide = true)]
    BenchEcho {
        /// Address to echo on (repeatable).
        #[arg(long, value_parser = config::parse_listen, required = true)]
        listen: Vec<SocketAddr>,
        /// Worker threads (0 = one per CPU).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// I/O backend: auto, uring or mmsg.
        #[arg(long, default_value = "auto")]
        io: IoMode,
        /// CPUs to pin workers to, e.g. 1 or 0,1.
        #[arg(long, value_delimiter = ',')]
        cpus: Vec<usize>,
    },
    /// Writes the man pages (DIR/man/*.1) and shell completions (DIR/completions/: bash, zsh,
    /// fish) from these very definitions, for packaging (`cargo deb` takes them from there).
    #[command(hide = true)]
    Generate { dir: PathBuf },
}

// ---- Finding the running server's control socket (stats, sources, status, reload) ----------

/// Which server to ask: its control socket, named directly or read from its config.
#[derive(clap::Args)]
struct ControlArgs {
    /// The server's config file, to read `control_socket` from (default: /etc/gnomon/gnomon.toml
    /// if it exists, else the embedded default's /run/gnomon/gnomon.sock).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The control socket itself, overriding the config's `control_socket`.
    #[arg(long)]
    control: Option<PathBuf>,
}

impl ControlArgs {
    fn socket(&self) -> Result<PathBuf, String> {
        if let Some(c) = &self.control {
            return Ok(c.clone());
        }
        Config::locate(self.config.as_deref())
            .map(|c| c.control_socket)
            .map_err(|e| format!("{e}\n(the control socket path comes from the config; give --control to name it)"))
    }

    fn request(&self, command: &str) -> Result<String, String> {
        gnomon::control::request(&self.socket()?, command).map_err(|e| e.to_string())
    }
}

/// `query`'s code for "answers, but unsynchronised", so scripts read both commands alike.
const EXIT_UNSYNCHRONISED: u8 = 3;

/// Exit 3 when the `sync json` answer says the server is unsynchronised.
fn sync_exit(sync_json: &str) -> Result<ExitCode, String> {
    let v: serde_json::Value =
        serde_json::from_str(sync_json).map_err(|e| format!("the server's sync report is not JSON: {e}"))?;
    match v["system"]["synced"].as_bool() {
        Some(true) => Ok(ExitCode::SUCCESS),
        Some(false) => Ok(ExitCode::from(EXIT_UNSYNCHRONISED)),
        None => Err("the server's sync report does not say whether it is synchronised".into()),
    }
}

fn parse_format(s: &str) -> Result<gnomon::config::convert::Format, String> {
    s.parse()
}

// ---- convert-config ---------------------------------------------------------------------------

fn convert_config(
    file: &std::path::Path,
    from: Option<gnomon::config::convert::Format>,
    output: Option<&std::path::Path>,
) -> Result<ExitCode, String> {
    use gnomon::config::convert;
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let c = convert::convert(&text, &name, from).map_err(|e| e.to_string())?;
    // The output is generated to be valid; a converter bug must not reach the operator's disk.
    Config::parse(&c.toml, "<converted>")
        .map_err(|e| format!("internal error: the converted config is invalid ({e}); please report it"))?;
    match output {
        Some(o) => std::fs::write(o, &c.toml).map_err(|e| format!("{}: {e}", o.display()))?,
        None => print!("{}", c.toml),
    }
    eprintln!(
        "{name}: read as {}; {} item(s) not carried over{}",
        c.format.name(),
        c.notes.len(),
        if c.notes.is_empty() { "" } else { ":" }
    );
    eprint!("{}", convert::render_notes(&name, &c.notes));
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    gnomon::logging::init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("gnomon: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command) -> Result<ExitCode, String> {
    match cmd {
        Command::Serve {
            config,
            listen,
            workers,
            io,
            cpus,
            control,
        } => {
            let mut cfg = Config::locate(config.as_deref()).map_err(|e| e.to_string())?;
            log::info!("config: {}", cfg.source);
            if !listen.is_empty() {
                cfg.serve.listen = listen;
            }
            if let Some(w) = workers {
                cfg.serve.workers = w;
            }
            if let Some(io) = io {
                cfg.serve.io = io;
            }
            if !cpus.is_empty() {
                cfg.serve.cpus = cpus;
            }
            if let Some(c) = control {
                cfg.control_socket = c;
            }
            gnomon::daemon::serve(cfg).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            server,
            ntp_version,
            timeout,
            nts,
            nts_port,
            nts_ca,
        } => {
            let addr = gnomon::query::resolve(&server).map_err(|e| e.to_string())?;
            let timeout = Duration::from_secs_f64(timeout);
            let r = if nts {
                let q = gnomon::query::NtsQuery {
                    server_name: gnomon::query::host_of(&server).to_string(),
                    ke_port: nts_port,
                    ca: nts_ca.unwrap_or_else(|| gnomon::nts::ke_client::SYSTEM_ROOTS.into()),
                };
                gnomon::query::query_nts(addr, &q, timeout)
            } else {
                gnomon::query::query(addr, ntp_version, timeout)
            }
            .map_err(|e| format!("{addr}: {e}"))?;
            print!("{}", gnomon::query::render(&r));
            // A refusal or an unsynchronised server is an answer, but not usable time: scripts
            // should see the difference (2 = Kiss-o'-Death refusal, 3 = unsynchronised).
            Ok(if r.reply.is_refusal() {
                ExitCode::from(2)
            } else if r.reply.leap == gnomon::proto::LeapIndicator::Unsynchronized {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::CheckConfig { file } => {
            let cfg = Config::load(&file).map_err(|e| e.to_string())?;
            println!("{}: ok", cfg.source);
            print!("{}", cfg.summary());
            Ok(ExitCode::SUCCESS)
        }
        Command::ConvertConfig { file, from, output } => convert_config(&file, from, output.as_deref()),
        Command::Stats { control, json, reset } => {
            let cmd = format!(
                "stats{}{}",
                if json { " json" } else { "" },
                if reset { " reset" } else { "" }
            );
            print!("{}", control.request(&cmd)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sources { control, why, json } => {
            let cmd = match (json, why) {
                (true, _) => "sync json",
                (false, true) => "sources why",
                (false, false) => "sources",
            };
            let out = control.request(cmd)?;
            print!("{out}");
            sync_exit(&if json { out } else { control.request("sync json")? })
        }
        Command::Status { control } => {
            print!("{}", control.request("status")?);
            sync_exit(&control.request("sync json")?)
        }
        Command::Explain { control, addr } => {
            let out = control.request(&format!("explain {addr}"))?;
            print!("{out}");
            Ok(if out.starts_with("error") {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Clients { control, top } => {
            print!("{}", control.request(&format!("clients {top}"))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { control } => {
            let out = control.request("reload")?;
            print!("{out}");
            Ok(if out.starts_with("error") {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::BenchEcho {
            listen,
            workers,
            io,
            cpus,
        } => {
            let opts = gnomon::server::ServeOptions {
                listen,
                workers,
                io,
                cpus,
                ..Default::default()
            };
            gnomon::daemon::bench_echo(&opts).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { dir } => {
            generate(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn generate(dir: &std::path::Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    // File names as the shells look them up: gnomon.bash, _gnomon, gnomon.fish.
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "gnomon", &completions)?;
    }
    Ok(())
}
