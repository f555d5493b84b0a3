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
        /// I/O backend: auto, uring or mmsg.
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
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
    /// Validate a config file without serving.
    CheckConfig { file: PathBuf },
    /// Per-core counters and latency of the running server.
    Stats {
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Empty the latency and batch histograms after reading them (counters keep counting).
        #[arg(long)]
        reset: bool,
    },
    /// Upstream sources, like `ntpq -p`; with --why, in words why each is or is not used.
    Sources {
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
        #[arg(long)]
        why: bool,
        /// Sources and system state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The system clock state, like `chronyc tracking`.
    Status {
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
    },
    /// Re-read the config's access rules and rate limits in the running server (as SIGHUP does).
    Reload {
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
    },
    /// A bare UDP echo server on the same workers and backend (the benchmark ceiling).
    #[command(hide = true)]
    BenchEcho {
        #[arg(long, value_parser = config::parse_listen, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[arg(long, default_value = "auto")]
        io: IoMode,
        #[arg(long, value_delimiter = ',')]
        cpus: Vec<usize>,
    },
    /// Writes the man pages (DIR/man/*.1) and shell completions (DIR/completions/: bash, zsh,
    /// fish) from these very definitions, for packaging (`cargo deb` takes them from there).
    #[command(hide = true)]
    Generate { dir: PathBuf },
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
        } => {
            let addr = gnomon::query::resolve(&server).map_err(|e| e.to_string())?;
            let r = gnomon::query::query(addr, ntp_version, Duration::from_secs_f64(timeout))
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
            println!("{}: ok ({} listen addresses)", cfg.source, cfg.serve.listen.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { control, json, reset } => {
            let cmd = format!(
                "stats{}{}",
                if json { " json" } else { "" },
                if reset { " reset" } else { "" }
            );
            let out = gnomon::control::request(&control, &cmd).map_err(|e| e.to_string())?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Sources { control, why, json } => {
            let cmd = match (json, why) {
                (true, _) => "sync json",
                (false, true) => "sources why",
                (false, false) => "sources",
            };
            print!(
                "{}",
                gnomon::control::request(&control, cmd).map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { control } => {
            print!(
                "{}",
                gnomon::control::request(&control, "status").map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { control } => {
            let out = gnomon::control::request(&control, "reload").map_err(|e| e.to_string())?;
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
