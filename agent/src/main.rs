//! `fly-agent`: serve a coordinator's runs on this machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fly_agent::shutdown::Shutdown;
use fly_agent::{AgentConfig, WorkerCount};

#[derive(Parser, Debug)]
#[command(
    name = "fly-agent",
    version,
    about = "Runs a fly coordinator's pytest work on this machine"
)]
struct Cli {
    /// The coordinator, e.g. http://coordinator:7171.
    #[arg(long, env = "FLY_CONNECT")]
    connect: String,
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
    let config = AgentConfig {
        workers: cli.workers,
        workdir,
        python: cli.python.unwrap_or_else(fly_agent::default_python),
        labels: cli.labels,
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
            stop_signal().await;
            tracing::info!("stopping: finishing up");
            trigger.trigger();
        });
        fly_agent::run(&cli.connect, &config, shutdown).await
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

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
