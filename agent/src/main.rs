//! `fly-agent`: serve a coordinator's runs on this machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fly_agent::connect::{ConnectOptions, TokenArgs};
use fly_agent::shutdown::Shutdown;
use fly_agent::{AgentConfig, WorkerCount};

#[derive(Parser, Debug)]
#[command(
    name = "fly-agent",
    version,
    about = "Runs a fly coordinator's pytest work on this machine"
)]
struct Cli {
    /// The coordinator, e.g. http://coordinator:7171 (https:// when it serves TLS).
    #[arg(long, env = "FLY_CONNECT")]
    connect: String,
    #[command(flatten)]
    token: TokenArgs,
    /// The CA certificate (PEM) that signed the coordinator's TLS certificate, for an https://
    /// URL (default: the system's trusted roots).
    #[arg(long, env = "FLY_CA", value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Persistent pytest workers: `auto` (the performance cores this process may use, within
    /// its affinity mask and cgroup CPU quota) or a number.
    #[arg(long, env = "FLY_WORKERS", default_value = "auto")]
    workers: WorkerCount,
    /// The directory pytest runs in: the checkout of the project under test.
    #[arg(long, env = "FLY_WORKDIR")]
    workdir: Option<PathBuf>,
    /// Python interpreter for the workers (default: $VIRTUAL_ENV's python, else python3).
    #[arg(long, env = "FLY_PYTHON")]
    python: Option<PathBuf>,
    /// A label the coordinator can match runs against, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// On SIGTERM or Ctrl-C the agent drains: it takes no new work, gives unstarted tests back
    /// and lets running tests finish for up to this many seconds before it interrupts them. A
    /// second signal stops it at once.
    #[arg(long, env = "FLY_DRAIN_GRACE", value_name = "SECONDS", default_value_t = fly_agent::DRAIN_GRACE.as_secs_f64(), value_parser = parse_seconds)]
    drain_grace: f64,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(format!("expected a number of seconds >= 0, got {s:?}")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let workdir = match cli.workdir {
        Some(dir) => dir,
        None => match std::env::current_dir() {
            Ok(dir) => dir,
            Err(err) => {
                eprintln!("fly-agent: cannot read the current directory: {err}");
                return ExitCode::from(2);
            }
        },
    };
    if !workdir.is_dir() {
        eprintln!(
            "fly-agent: --workdir {} is not a directory",
            workdir.display()
        );
        return ExitCode::from(2);
    }
    let token = match cli.token.resolve() {
        Ok(token) => token,
        Err(err) => {
            eprintln!("fly-agent: {err}");
            return ExitCode::from(2);
        }
    };
    let options = ConnectOptions { token, ca: cli.ca };
    let config = AgentConfig {
        workers: cli.workers,
        workdir,
        python: cli.python.unwrap_or_else(fly_agent::default_python),
        labels: cli.labels,
        drain_grace: std::time::Duration::from_secs_f64(cli.drain_grace),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fly-agent: cannot start the async runtime: {err}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(async {
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            let mut signals = StopSignals::new();
            signals.next().await;
            tracing::info!(
                "draining: taking no new work, giving unstarted tests back, letting running \
                 tests finish (signal again to stop at once)"
            );
            trigger.trigger();
            signals.next().await;
            tracing::info!("stopping at once");
            trigger.trigger();
        });
        fly_agent::run(&cli.connect, &options, &config, shutdown).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fly-agent: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C), listened to for the life of the process so that a second
/// signal is never missed between two waits.
struct StopSignals {
    #[cfg(unix)]
    listeners: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    fn new() -> StopSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listeners = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            StopSignals { listeners }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    /// The next stop signal.
    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = self.listeners.as_mut() {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
