//! A coordinator living in this process: the store, the dispatcher task, and the gRPC service
//! reachable over TCP (`serve`, `run --listen`) and over an in-memory connection (`run
//! --local`), so the embedded agent and the `run` client speak the very same protocol as remote
//! ones, without a port. The TCP side enforces the [`Security`] it is given (token, TLS); the
//! in-memory side needs neither, since only this process can reach it. With a retention policy
//! (`serve --retain-days`, `--retain-size`) it also prunes old runs from the store, at start and
//! every [`PRUNE_INTERVAL`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use fly_common::proto::{agents_server, runs_server};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;
use tracing::warn;

use crate::auth::Security;
use crate::dispatcher::{self, DispatcherHandle};
use crate::server::Service;
use crate::store::{Retention, Store};

/// Bytes an agent's connection may have in flight to the coordinator, unread.
const AGENT_WINDOW_BYTES: u32 = 128 * 1024;

/// HTTP/2 keepalive: the longest a connection may be silent before the coordinator pings it.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The keepalive for `--agent-timeout`: how long a connection may be silent before it is
/// pinged, and how long the ping may go unanswered. They add up to the agent timeout, so a
/// half-open connection (a partition, a host that vanished) is dropped, and its agent's tests
/// requeued, within `agent_timeout` of its last frame: hyper pings once a connection has been
/// silent for the interval and gives up when the answer takes longer than the timeout.
pub fn keepalive(agent_timeout: Duration) -> (Duration, Duration) {
    let interval = KEEPALIVE_INTERVAL.min(agent_timeout / 2);
    (interval, agent_timeout.saturating_sub(interval))
}

/// How often a node with a retention policy prunes old runs (and once when it starts).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// `serve --retain-days`, `--retain-size`: what the database keeps.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RetentionArgs {
    /// Delete the reports, results and collections of runs that finished more than DAYS days
    /// ago, at start and every hour. Each run keeps its summary row (`fly-coordinator runs`
    /// still lists it) and the duration history stays. Default: keep everything.
    #[arg(long, env = "FLY_RETAIN_DAYS", value_name = "DAYS")]
    pub retain_days: Option<u32>,
    /// Also delete the oldest finished runs' rows while the database's data is above SIZE
    /// (e.g. 500MB, 2GB, 2GiB). Freed space is reused, so the file stops growing near SIZE; it
    /// does not shrink (`sqlite3 fly.db VACUUM` with the coordinator stopped does that).
    #[arg(long, env = "FLY_RETAIN_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub retain_size: Option<u64>,
}

impl RetentionArgs {
    /// The store's retention policy these flags ask for.
    pub fn retention(&self) -> Retention {
        Retention {
            max_age: self
                .retain_days
                .map(|days| Duration::from_secs(u64::from(days) * 24 * 60 * 60)),
            max_bytes: self.retain_size,
        }
    }
}

/// A byte size such as `500MB` (10^6), `2GiB` (2^30) or a plain number of bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|err| format!("expected a size such as 500MB or 2GB: {err}"))
}

pub struct Node {
    store: Store,
    dispatcher: DispatcherHandle,
    service: Service,
    dispatcher_task: tokio::task::JoinHandle<()>,
    agent_timeout: Duration,
    /// The standard gRPC health service's statuses: the server ("") and both fly services
    /// report SERVING for as long as the node lives.
    health: HealthReporter,
    /// Prunes old runs on a schedule ([`Node::retain`]).
    retention_task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens the database and starts the dispatcher.
    pub fn start(db: &Path, agent_timeout: Duration) -> Result<Node> {
        let store =
            Store::open(db).with_context(|| format!("opening the database {}", db.display()))?;
        let (dispatcher, dispatcher_task) = dispatcher::spawn(store.clone());
        let service = Service::new(dispatcher.clone());
        let health = HealthReporter::new();
        let reporter = health.clone();
        tokio::spawn(async move {
            for name in [agents_server::SERVICE_NAME, runs_server::SERVICE_NAME] {
                reporter
                    .set_service_status(name, ServingStatus::Serving)
                    .await;
            }
        });
        Ok(Node {
            store,
            dispatcher,
            service,
            dispatcher_task,
            agent_timeout,
            health,
            retention_task: None,
        })
    }

    /// Prunes what `retention` does not keep from the store now and every [`PRUNE_INTERVAL`]
    /// until the node shuts down (nothing with a policy that keeps everything). The store
    /// does it between its batches of writes, so runs in progress are not held up.
    pub fn retain(&mut self, retention: Retention) {
        if retention.keeps_everything() {
            return;
        }
        if let Some(task) = self.retention_task.take() {
            task.abort();
        }
        let store = self.store.clone();
        self.retention_task = Some(tokio::spawn(prune_every(store, retention, PRUNE_INTERVAL)));
    }

    pub fn dispatcher(&self) -> DispatcherHandle {
        self.dispatcher.clone()
    }

    /// The store, for readers of the record beside the dispatcher (the dashboard).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn router(&self, security: &Security) -> Result<tonic::transport::server::Router> {
        let mut server = Server::builder();
        if let Some(tls) = security.tls_config() {
            server = server
                .tls_config(tls)
                .context("setting up TLS with --tls-cert and --tls-key")?;
        }
        Ok(server
            // HTTP/2 flow control is the farm's backpressure: when the dispatcher (or the store
            // behind it) falls behind, unread agent messages wait in these windows and then in
            // the agents. hyper's 1 MB default per connection would let 500 agents park 500 MB
            // here; a few Work-sized messages per agent is plenty on a LAN.
            .initial_connection_window_size(Some(AGENT_WINDOW_BYTES))
            .initial_stream_window_size(Some(AGENT_WINDOW_BYTES))
            .http2_keepalive_interval(Some(keepalive(self.agent_timeout).0))
            .http2_keepalive_timeout(Some(keepalive(self.agent_timeout).1))
            .add_service(self.service.agents_server(security.check("an agent")))
            .add_service(self.service.runs_server(security.check("a client")))
            // Open to probes without the token: it tells only whether the node serves.
            .add_service(HealthServer::new(HealthService::from_health_reporter(
                self.health.clone(),
            ))))
    }

    /// Serves gRPC on `listener` until `shutdown` resolves, refusing calls without
    /// `security`'s token and speaking TLS when it has a certificate.
    pub fn serve_tcp(
        &self,
        listener: TcpListener,
        security: &Security,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let router = self.router(security)?;
        // tonic applies its TCP_NODELAY default only to listeners it binds itself, not to an
        // incoming stream handed to it: without this, Nagle's algorithm may hold back a small
        // Work message until the agent acknowledges the previous segment.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        Ok(tokio::spawn(async move {
            if let Err(err) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                warn!(%err, "gRPC server stopped");
            }
        }))
    }

    /// A gRPC channel to this coordinator over in-memory pipes: every connection the channel
    /// makes is a fresh `tokio::io::duplex` pair whose other end is served here.
    pub async fn in_memory_channel(&self) -> Result<Channel> {
        let (conn_tx, conn_rx) = mpsc::channel::<tokio::io::DuplexStream>(4);
        let router = self.router(&Security::default())?;
        tokio::spawn(async move {
            let incoming =
                tokio_stream::StreamExt::map(ReceiverStream::new(conn_rx), Ok::<_, std::io::Error>);
            if let Err(err) = router.serve_with_incoming(incoming).await {
                warn!(%err, "in-memory gRPC server stopped");
            }
        });
        let channel = Endpoint::try_from("http://in-process.fly")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let conn_tx = conn_tx.clone();
                async move {
                    let (client, server) = tokio::io::duplex(1 << 20);
                    conn_tx
                        .send(server)
                        .await
                        .map_err(|_| std::io::Error::other("the in-process coordinator stopped"))?;
                    Ok::<_, std::io::Error>(TokioIo::new(client))
                }
            }))
            .await
            .context("connecting to the in-process coordinator")?;
        Ok(channel)
    }

    /// Stops the dispatcher and waits for every write to reach the database.
    pub async fn shutdown(self) -> Result<()> {
        if let Some(task) = self.retention_task {
            // A prune under way stops after its current step; the next start carries on.
            task.abort();
            let _ = task.await;
        }
        self.dispatcher_task.abort();
        let _ = self.dispatcher_task.await;
        self.store.close().await.context("closing the database")?;
        Ok(())
    }
}

/// Prunes `store` now and then every `every`, one prune at a time, logging what each did.
async fn prune_every(store: Store, retention: Retention, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    // A prune longer than the interval is followed by the next one, not by a burst of them.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.prune(retention).await {
            Ok(summary) => {
                let used = bytesize::ByteSize(summary.used_after);
                let file = bytesize::ByteSize(summary.file_bytes);
                if summary.runs > 0 {
                    tracing::info!(
                        runs = summary.runs,
                        rows = summary.rows,
                        "pruned {} old run(s); the database holds {used} of data in a {file} file",
                        summary.runs
                    );
                }
                if summary.over_size_cap {
                    warn!(
                        "the database holds {used} of data, more than --retain-size {}: the \
                         rest is runs in progress, runs that finished in the last {} minutes, \
                         runs that kept runs resumed, and the duration history",
                        bytesize::ByteSize(retention.max_bytes.unwrap_or(0)),
                        crate::store::RECENT_GRACE.as_secs() / 60
                    );
                }
            }
            Err(err) => warn!(%err, "pruning old runs failed; trying again in an hour"),
        }
    }
}

/// Binds a TCP listener, with a message that names the address on failure.
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_flags_parse_days_and_human_sizes() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            retention: RetentionArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
                .map(|cli| cli.retention.retention())
        };
        assert_eq!(parse(&[]).expect("no flags"), Retention::default());
        assert!(parse(&[]).expect("no flags").keeps_everything());
        let both = parse(&["--retain-days", "30", "--retain-size", "2GB"]).expect("both");
        assert_eq!(both.max_age, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(both.max_bytes, Some(2_000_000_000));
        let binary = parse(&["--retain-size", "500MiB"]).expect("binary unit");
        assert_eq!(binary.max_bytes, Some(500 << 20));
        assert_eq!(
            parse(&["--retain-size", "4096"]).expect("bytes").max_bytes,
            Some(4096)
        );
        assert!(parse(&["--retain-size", "lots"]).is_err());
        assert!(parse(&["--retain-days", "-1"]).is_err());
    }

    #[test]
    fn a_silent_connection_is_dropped_within_the_agent_timeout() {
        for seconds in [1, 3, 4, 10, 60] {
            let timeout = Duration::from_secs(seconds);
            let (interval, answer) = keepalive(timeout);
            assert_eq!(interval + answer, timeout, "--agent-timeout {seconds}");
            assert!(interval <= KEEPALIVE_INTERVAL && !interval.is_zero());
            assert!(!answer.is_zero());
        }
        assert_eq!(
            keepalive(Duration::from_secs(10)),
            (Duration::from_secs(5), Duration::from_secs(5))
        );
    }
}
