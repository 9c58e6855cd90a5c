//! `cachemeshd`: the cachemesh node daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use cachemesh_daemon::config::{Config, LogFormat, Settings};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// The cachemesh node daemon: a local NVMe chunk cache in front of an object store,
/// serving objects to runtimes over a unix-socket API.
///
/// Settings come from flags, CACHEMESH_* environment variables and a TOML config file,
/// in that order of precedence. With no settings at all it runs as a single node with a
/// local directory as its origin.
#[derive(Debug, Parser)]
#[command(name = "cachemeshd", version, propagate_version = true)]
struct Cli {
    /// TOML config file (default: /etc/cachemesh/cachemeshd.toml for root,
    /// $XDG_CONFIG_HOME/cachemesh/cachemeshd.toml otherwise; read only if it exists).
    #[arg(long, env = "CACHEMESH_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default when no command is given).
    Run,
    /// Check a stopped node's chunk store: hash every indexed chunk, count strays.
    /// Exits 0 when the store is sound, 1 when it found corrupt or missing chunks.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHEMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("received SIGTERM"),
        _ = interrupt.recv() => tracing::info!("received SIGINT"),
    }
    shutdown.cancel();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::resolve(cli.config.as_deref(), cli.settings) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("cachemeshd: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check { json }) => check(&config, json),
        None | Some(Command::Run) => run(config),
    }
}

fn check(config: &Config, json: bool) -> ExitCode {
    match cachemesh_daemon::store::check(&config.data_dir) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!(
                    "{}: {} chunks checked, {} corrupt, {} missing or wrong size, {} unindexed files, {} temp files",
                    if report.ok { "ok" } else { "PROBLEMS FOUND" },
                    report.chunks_checked,
                    report.corrupt_chunks,
                    report.missing_files,
                    report.orphan_files,
                    report.temp_files
                );
            }
            if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(error) => {
            eprintln!("cachemeshd check: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(config: Config) -> ExitCode {
    init_logging(config.log_format);
    if let Some(file) = &config.config_file {
        tracing::info!(config_file = %file.display(), "read config file");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("cachemeshd").build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cachemeshd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signal(shutdown.clone()));
        cachemesh_daemon::node::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("cachemeshd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
