//! One agent session with a coordinator: the hello, then run after run on the one stream.
//!
//! The session owns at most one [`WorkerPool`] at a time (an agent serves one run at a time)
//! and translates between the coordinator's messages and the pool: work handed out becomes
//! worker assignments, worker events become batched `WorkerEvents` messages. Batching keeps the
//! message rate independent of how tiny the tests are.

use std::future::pending;
use std::time::Duration;

use fly_common::proto::agents_client::AgentsClient;
use fly_common::proto::{
    agent_message, coordinator_message, worker_event, AgentHello, AgentMessage, Collected,
    CollectedTest, CollectionFailed, CoordinatorMessage, Revoked, StartRun, TestFinished,
    TestStarted, WantWork, WorkerEvent, WorkerEvents, WorkerExited,
};
use fly_common::{topology::Topology, FLY_VERSION, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::shutdown::Shutdown;
use crate::worker::{PoolConfig, PoolEvent, WorkerPool};
use crate::AgentConfig;

/// Tests per `Collected` chunk: keeps each message far below the gRPC size limit.
const COLLECTION_CHUNK: usize = 5_000;
/// Worker events folded into one message at most.
const EVENT_BATCH: usize = 2_048;
/// How long workers get to finish their session teardown at the end of a run.
const END_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator refused this agent (protocol version): retrying cannot help.
    #[error("the coordinator refused this agent: {0}")]
    Rejected(String),
    #[error("lost the coordinator: {0}")]
    Lost(String),
}

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The coordinator closed the stream.
    CoordinatorClosed,
    /// This process was asked to stop.
    Stopped,
}

/// Everything the session knows about the run it serves.
struct ActiveRun {
    run_id: String,
    pool: WorkerPool,
    events: mpsc::Receiver<PoolEvent>,
    want_collection: bool,
    collection: Option<Vec<CollectedTest>>,
    digest: String,
    deselected: u32,
    workers: u32,
}

pub struct Session<'a> {
    pub config: &'a AgentConfig,
    pub agent_id: &'a str,
    pub hostname: &'a str,
    pub topology: &'a Topology,
    pub workers: u32,
    /// Relative speed of this machine's cores (1.0 = the reference machine).
    pub speed: f64,
}

impl Session<'_> {
    /// Registers with the coordinator on `channel` and serves runs until the stream ends or
    /// `shutdown` fires.
    pub async fn serve(
        &self,
        channel: Channel,
        shutdown: &mut Shutdown,
    ) -> Result<SessionEnd, SessionError> {
        let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(256);
        let hello = AgentHello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.agent_id.to_string(),
            hostname: self.hostname.to_string(),
            topology: Some(self.topology.to_proto()),
            workers: self.workers,
            fly_version: FLY_VERSION.to_string(),
            labels: self.config.labels.iter().cloned().collect(),
            workdir: self.config.workdir.to_string_lossy().into_owned(),
            python: self.config.python.to_string_lossy().into_owned(),
            speed: self.speed,
        };
        out_tx
            .send(message(agent_message::Kind::Hello(hello)))
            .await
            .map_err(|_| SessionError::Lost("outbound stream closed".into()))?;
        let mut client = AgentsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut inbound = client
            .join(ReceiverStream::new(out_rx))
            .await
            .map_err(|status| SessionError::Lost(status.message().to_string()))?
            .into_inner();
        match inbound.next().await {
            Some(Ok(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Welcome(_)),
            })) => {}
            Some(Ok(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Reject(reject)),
            })) => return Err(SessionError::Rejected(reject.reason)),
            Some(Ok(_)) => {
                return Err(SessionError::Rejected(
                    "the coordinator did not answer the hello with a welcome".into(),
                ))
            }
            Some(Err(status)) => return Err(SessionError::Lost(status.message().to_string())),
            None => {
                return Err(SessionError::Lost(
                    "stream closed before the welcome".into(),
                ))
            }
        }
        info!(workers = self.workers, "connected to the coordinator");

        let mut active: Option<ActiveRun> = None;
        let end = loop {
            let event = async {
                match active.as_mut() {
                    Some(run) => run.events.recv().await,
                    None => pending().await,
                }
            };
            tokio::select! {
                incoming = inbound.next() => match incoming {
                    Some(Ok(msg)) => {
                        if let Err(err) = self.on_message(msg, &mut active, &out_tx).await {
                            break Err(err);
                        }
                    }
                    Some(Err(status)) => break Err(SessionError::Lost(status.message().to_string())),
                    None => break Ok(SessionEnd::CoordinatorClosed),
                },
                Some(first) = event => {
                    if let Some(run) = active.as_mut() {
                        if let Err(err) = forward_events(run, first, &out_tx).await {
                            break Err(err);
                        }
                    }
                }
                _ = shutdown.recv() => break Ok(SessionEnd::Stopped),
            }
        };
        if let Some(run) = active.take() {
            // The coordinator is gone or we are stopping: the run's tests go back to the
            // queue there; do not leave workers behind here.
            run.pool.shutdown(Duration::from_secs(2)).await;
        }
        end
    }

    async fn on_message(
        &self,
        msg: CoordinatorMessage,
        active: &mut Option<ActiveRun>,
        out: &mpsc::Sender<AgentMessage>,
    ) -> Result<(), SessionError> {
        let Some(kind) = msg.kind else {
            return Ok(());
        };
        match kind {
            coordinator_message::Kind::Welcome(_) => {}
            coordinator_message::Kind::Reject(reject) => {
                return Err(SessionError::Rejected(reject.reason));
            }
            coordinator_message::Kind::StartRun(start) => {
                if let Some(previous) = active.take() {
                    warn!(run = %previous.run_id, "a new run started before the last one ended");
                    previous.pool.shutdown(Duration::from_secs(2)).await;
                }
                *active = self.start_run(start, out).await?;
            }
            coordinator_message::Kind::SendCollection(request) => {
                if let Some(run) = active.as_mut().filter(|r| r.run_id == request.run_id) {
                    run.want_collection = true;
                    if run.collection.is_some() {
                        send_collection(run, out).await?;
                    }
                }
            }
            coordinator_message::Kind::Work(work) => {
                let Some(run) = active.as_ref().filter(|r| r.run_id == work.run_id) else {
                    return Ok(());
                };
                for assignment in work.assignments {
                    let result = if assignment.leases.is_empty() {
                        run.pool.no_more(assignment.worker)
                    } else {
                        run.pool.assign(
                            assignment.worker,
                            assignment
                                .leases
                                .iter()
                                .map(|l| (l.lease, l.test_index))
                                .collect(),
                        )
                    };
                    if let Err(err) = result {
                        // The worker is gone; its exit event returns these tests.
                        warn!(worker = assignment.worker, %err, "could not hand work to a worker");
                    }
                }
            }
            coordinator_message::Kind::Revoke(revoke) => {
                if let Some(run) = active.as_ref().filter(|r| r.run_id == revoke.run_id) {
                    if let Err(err) = run.pool.revoke(revoke.worker, revoke.leases) {
                        warn!(worker = revoke.worker, %err, "could not take tests back from a worker");
                    }
                }
            }
            coordinator_message::Kind::EndRun(end) => {
                if !end.reason.is_empty() {
                    error!("{}", end.reason);
                }
                if let Some(run) = active.take() {
                    if run.run_id == end.run_id {
                        let grace = if end.cancelled {
                            Duration::from_secs(2)
                        } else {
                            END_GRACE
                        };
                        run.pool.shutdown(grace).await;
                    } else {
                        *active = Some(run);
                    }
                }
            }
        }
        Ok(())
    }

    async fn start_run(
        &self,
        start: StartRun,
        out: &mpsc::Sender<AgentMessage>,
    ) -> Result<Option<ActiveRun>, SessionError> {
        info!(run = %start.run_id, args = ?start.pytest_args, "starting run");
        let (tx, rx) = mpsc::channel(4_096);
        let config = PoolConfig {
            python: self.config.python.clone(),
            workdir: self.config.workdir.clone(),
            pytest_args: start.pytest_args.clone(),
            workers: self.workers,
            run_id: start.run_id.clone(),
            extra_env: Vec::new(),
            fork: !start.no_fork,
        };
        match WorkerPool::start(config, tx).await {
            Ok(pool) => Ok(Some(ActiveRun {
                run_id: start.run_id,
                pool,
                events: rx,
                want_collection: start.want_collection,
                collection: None,
                digest: String::new(),
                deselected: 0,
                workers: self.workers,
            })),
            Err(err) => {
                let output = format!(
                    "fly-agent on {}: cannot start pytest workers with {}: {err}",
                    self.hostname,
                    self.config.python.display()
                );
                error!("{output}");
                send(
                    out,
                    agent_message::Kind::CollectionFailed(CollectionFailed {
                        run_id: start.run_id,
                        exit_code: fly_common::exit_code::INTERNAL_ERROR,
                        output,
                    }),
                )
                .await?;
                Ok(None)
            }
        }
    }
}

fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

async fn send(
    out: &mpsc::Sender<AgentMessage>,
    kind: agent_message::Kind,
) -> Result<(), SessionError> {
    out.send(message(kind))
        .await
        .map_err(|_| SessionError::Lost("outbound stream closed".into()))
}

/// Sends the collection: the full list in chunks when the coordinator wants it, else only the
/// digest and count.
async fn send_collection(
    run: &ActiveRun,
    out: &mpsc::Sender<AgentMessage>,
) -> Result<(), SessionError> {
    let Some(tests) = run.collection.as_ref() else {
        return Ok(());
    };
    let header = |chunk: Vec<CollectedTest>, done: bool| Collected {
        run_id: run.run_id.clone(),
        digest: run.digest.clone(),
        total: tests.len() as u32,
        deselected: run.deselected,
        tests: chunk,
        done,
        workers: run.workers,
    };
    if !run.want_collection || tests.is_empty() {
        return send(
            out,
            agent_message::Kind::Collected(header(Vec::new(), true)),
        )
        .await;
    }
    let chunks: Vec<&[CollectedTest]> = tests.chunks(COLLECTION_CHUNK).collect();
    let last = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.into_iter().enumerate() {
        send(
            out,
            agent_message::Kind::Collected(header(chunk.to_vec(), i == last)),
        )
        .await?;
    }
    Ok(())
}

/// Forwards one pool event, and every other one already waiting, in as few messages as
/// possible.
async fn forward_events(
    run: &mut ActiveRun,
    first: PoolEvent,
    out: &mpsc::Sender<AgentMessage>,
) -> Result<(), SessionError> {
    let mut batch: Vec<WorkerEvent> = Vec::new();
    let mut next = Some(first);
    while let Some(event) = next.take() {
        match event {
            PoolEvent::Collected {
                tests,
                deselected,
                digest,
            } => {
                flush_batch(run, &mut batch, out).await?;
                run.collection = Some(tests);
                run.digest = digest;
                run.deselected = deselected;
                send_collection(run, out).await?;
            }
            PoolEvent::CollectionFailed { exit_code, output } => {
                flush_batch(run, &mut batch, out).await?;
                send(
                    out,
                    agent_message::Kind::CollectionFailed(CollectionFailed {
                        run_id: run.run_id.clone(),
                        exit_code,
                        output,
                    }),
                )
                .await?;
            }
            PoolEvent::WantWork { worker } => batch.push(worker_event(
                worker,
                worker_event::Kind::WantWork(WantWork {}),
            )),
            PoolEvent::Started {
                worker,
                lease,
                test_index,
                at,
            } => batch.push(worker_event(
                worker,
                worker_event::Kind::Started(TestStarted {
                    lease,
                    test_index,
                    at,
                }),
            )),
            PoolEvent::Report { worker, report } => {
                batch.push(worker_event(worker, worker_event::Kind::Report(report)))
            }
            PoolEvent::Finished {
                worker,
                lease,
                test_index,
            } => batch.push(worker_event(
                worker,
                worker_event::Kind::Finished(TestFinished { lease, test_index }),
            )),
            PoolEvent::Revoked { worker, leases } => batch.push(worker_event(
                worker,
                worker_event::Kind::Revoked(Revoked { leases }),
            )),
            PoolEvent::Exited {
                worker,
                exit_code,
                signal,
                reason,
                unstarted,
            } => batch.push(worker_event(
                worker,
                worker_event::Kind::Exited(WorkerExited {
                    exit_code,
                    signal,
                    reason,
                    unstarted,
                }),
            )),
        }
        if batch.len() >= EVENT_BATCH {
            flush_batch(run, &mut batch, out).await?;
        }
        next = run.events.try_recv().ok();
    }
    flush_batch(run, &mut batch, out).await
}

fn worker_event(worker: u32, kind: worker_event::Kind) -> WorkerEvent {
    WorkerEvent {
        worker,
        kind: Some(kind),
    }
}

async fn flush_batch(
    run: &ActiveRun,
    batch: &mut Vec<WorkerEvent>,
    out: &mpsc::Sender<AgentMessage>,
) -> Result<(), SessionError> {
    if batch.is_empty() {
        return Ok(());
    }
    let events = std::mem::take(batch);
    send(
        out,
        agent_message::Kind::Events(WorkerEvents {
            run_id: run.run_id.clone(),
            events,
        }),
    )
    .await
}
