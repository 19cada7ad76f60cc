//! A coordinator living in this process: the store, the dispatcher task, and the gRPC service
//! reachable over TCP (`serve`, `run --listen`) and over an in-memory connection (`run
//! --local`), so the embedded agent and the `run` client speak the very same protocol as remote
//! ones, without a port.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tracing::warn;

use crate::dispatcher::{self, DispatcherHandle};
use crate::server::Service;
use crate::store::Store;

/// HTTP/2 keepalive: how often the coordinator pings an idle connection, and how long it waits
/// for the answer. A half-open agent connection is noticed within the sum.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Node {
    store: Store,
    dispatcher: DispatcherHandle,
    service: Service,
    dispatcher_task: tokio::task::JoinHandle<()>,
    agent_timeout: Duration,
}

impl Node {
    /// Opens the database and starts the dispatcher.
    pub fn start(db: &Path, agent_timeout: Duration) -> Result<Node> {
        let store =
            Store::open(db).with_context(|| format!("opening the database {}", db.display()))?;
        let (dispatcher, dispatcher_task) = dispatcher::spawn(store.clone());
        let service = Service::new(dispatcher.clone());
        Ok(Node {
            store,
            dispatcher,
            service,
            dispatcher_task,
            agent_timeout,
        })
    }

    pub fn dispatcher(&self) -> DispatcherHandle {
        self.dispatcher.clone()
    }

    fn router(&self) -> tonic::transport::server::Router {
        Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(self.agent_timeout))
            .add_service(self.service.agents_server())
            .add_service(self.service.runs_server())
    }

    /// Serves gRPC on `listener` until `shutdown` resolves.
    pub fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let router = self.router();
        // tonic applies its TCP_NODELAY default only to listeners it binds itself, not to an
        // incoming stream handed to it: without this, Nagle's algorithm may hold back a small
        // Work message until the agent acknowledges the previous segment.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(async move {
            if let Err(err) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                warn!(%err, "gRPC server stopped");
            }
        })
    }

    /// A gRPC channel to this coordinator over in-memory pipes: every connection the channel
    /// makes is a fresh `tokio::io::duplex` pair whose other end is served here.
    pub async fn in_memory_channel(&self) -> Result<Channel> {
        let (conn_tx, conn_rx) = mpsc::channel::<tokio::io::DuplexStream>(4);
        let router = self.router();
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
        self.dispatcher_task.abort();
        let _ = self.dispatcher_task.await;
        self.store.close().await.context("closing the database")?;
        Ok(())
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
