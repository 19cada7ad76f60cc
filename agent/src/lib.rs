//! The fly agent: detects this machine's cores, connects to a coordinator, and serves its runs
//! with persistent pytest worker processes.
//!
//! [`session`] speaks to the coordinator, reached as [`connect`] says (URL, TLS trust, token);
//! [`worker`] runs and talks to the pytest workers (the Python side is `python/fly_worker.py`,
//! shipped inside this binary); [`shutdown`] carries the stop signal. The coordinator embeds
//! this library for `run --local`.

pub mod calibrate;
pub mod connect;
pub mod session;
pub mod shutdown;
pub mod worker;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Result;
use fly_common::topology::{self, Topology};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::connect::{AttachToken, ConnectOptions};
use crate::session::{Session, SessionEnd, SessionError};
use crate::shutdown::Shutdown;

/// `--workers`: `auto` or a positive number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCount {
    /// The performance cores this process may use (see `Topology::auto_workers`).
    Auto,
    Fixed(u32),
}

impl FromStr for WorkerCount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(WorkerCount::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(WorkerCount::Fixed(n)),
            _ => Err(format!(
                "expected `auto` or a number of workers >= 1, got {s:?}"
            )),
        }
    }
}

impl WorkerCount {
    pub fn resolve(self, topology: &Topology) -> u32 {
        match self {
            WorkerCount::Auto => topology.auto_workers(),
            WorkerCount::Fixed(n) => n,
        }
    }
}

/// What an agent needs to serve runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub workers: WorkerCount,
    /// Where pytest runs.
    pub workdir: PathBuf,
    pub python: PathBuf,
    pub labels: Vec<(String, String)>,
    /// On the first stop signal, how long running tests may take to finish before they are
    /// interrupted (unstarted work goes back to the coordinator at once).
    pub drain_grace: Duration,
}

/// The default of `fly-agent --drain-grace`.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// The interpreter used when none is given: the active virtualenv's, else `python3` on PATH.
pub fn default_python() -> PathBuf {
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        let venv = PathBuf::from(venv);
        let candidate = if cfg!(windows) {
            venv.join("Scripts").join("python.exe")
        } else {
            venv.join("bin").join("python")
        };
        if candidate.exists() {
            return candidate;
        }
    }
    PathBuf::from("python3")
}

fn hostname() -> String {
    sysinfo::System::host_name().unwrap_or_else(|| "unknown-host".into())
}

/// Serves runs over an already connected channel (the in-process coordinator of `run
/// --local`) until the coordinator closes the stream or `shutdown` fires.
pub async fn serve_channel(
    channel: Channel,
    config: &AgentConfig,
    mut shutdown: Shutdown,
) -> Result<()> {
    let topology = topology::detect();
    let agent_id = uuid::Uuid::new_v4().to_string();
    let hostname = hostname();
    let session = Session {
        config,
        agent_id: &agent_id,
        hostname: &hostname,
        topology: &topology,
        workers: config.workers.resolve(&topology),
        // The one agent of `run --local` has no other machine to compare with, and its history
        // stays with this checkout: skip the calibration and start at once.
        speed: 1.0,
        // The in-process coordinator asks no token.
        auth: AttachToken::default(),
    };
    session.serve(channel, &mut shutdown).await?;
    Ok(())
}

/// Connects to the coordinator at `url` and serves run after run, reconnecting with backoff
/// when the coordinator goes away, until `shutdown` fires. A refusal (another protocol
/// version, a missing or wrong token) is final: retrying cannot change the answer.
pub async fn run(
    url: &str,
    options: &ConnectOptions,
    config: &AgentConfig,
    mut shutdown: Shutdown,
) -> Result<()> {
    let endpoint = options
        .endpoint(url)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let topology = topology::detect();
    let workers = config.workers.resolve(&topology);
    let agent_id = uuid::Uuid::new_v4().to_string();
    let hostname = hostname();
    info!(
        agent = %agent_id,
        workers,
        performance_cores = topology.performance_cores,
        efficiency_cores = topology.efficiency_cores,
        logical_cpus = topology.logical_cpus,
        "fly-agent starting"
    );
    let speed = calibrate::speed(&config.python).await;
    info!(speed = format!("{speed:.2}"), "calibrated");
    let session = Session {
        config,
        agent_id: &agent_id,
        hostname: &hostname,
        topology: &topology,
        workers,
        speed,
        auth: options.attach_token(),
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        let outcome = match endpoint.connect().await {
            Ok(channel) => {
                backoff = Duration::from_millis(500);
                session.serve(channel, &mut shutdown).await
            }
            Err(err) => Err(SessionError::Lost(format!(
                "cannot reach {url}: {}",
                connect::describe_connect_error(&err)
            ))),
        };
        match outcome {
            Ok(SessionEnd::Stopped) => return Ok(()),
            Ok(SessionEnd::CoordinatorClosed) => warn!("the coordinator closed the connection"),
            Err(SessionError::Rejected(reason)) => {
                anyhow::bail!("the coordinator refused this agent: {reason}")
            }
            Err(SessionError::Lost(reason)) => warn!("{reason}"),
        }
        warn!("reconnecting in {:.1} s", backoff.as_secs_f64());
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.recv() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}
