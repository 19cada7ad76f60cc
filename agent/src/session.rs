//! One agent session with a coordinator: the hello, then run after run on the one stream.
//!
//! The session owns at most one [`WorkerPool`] at a time (an agent serves one run at a time)
//! and translates between the coordinator's messages and the pool: work handed out becomes
//! worker assignments, worker events become batched `WorkerEvents` messages. Batching keeps the
//! message rate independent of how tiny the tests are.

use std::future::pending;
use std::time::Duration;

use fly_common::batch::EventBatch;
use fly_common::proto::agents_client::AgentsClient;
use fly_common::proto::{
    agent_message, coordinator_message, worker_event, AgentHello, AgentMessage, Collected,
    CollectedTest, CollectionFailed, CoordinatorMessage, Revoked, StartRun, TestFinished,
    TestStarted, WantWork, WorkerEvent, WorkerEvents, WorkerExited,
};
use fly_common::{topology::Topology, FLY_VERSION, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::connect::AttachToken;
use crate::shutdown::Shutdown;
use crate::worker::{PoolConfig, PoolEvent, WorkerPool, MAX_REPLACEMENTS};
use crate::AgentConfig;

/// Tests per `Collected` chunk: keeps each message far below the gRPC size limit.
const COLLECTION_CHUNK: usize = 5_000;
/// How long workers get to finish their session teardown at the end of a run.
const END_GRACE: Duration = Duration::from_secs(30);
/// After a drain, how long the agent waits for the coordinator to close the stream (which
/// means it has read every report sent before the end).
const GOODBYE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator refused this agent (protocol version, token): retrying cannot help.
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
    /// None once the pool is stopping (in `stopping`).
    pool: Option<WorkerPool>,
    /// A pool being drained in a task of its own while its last events still flow.
    stopping: Option<Stopping>,
    events: mpsc::Receiver<PoolEvent>,
    want_collection: bool,
    collection: Option<Vec<CollectedTest>>,
    digest: String,
    deselected: u32,
    workers: u32,
}

/// A draining pool's task, and the way to cut its grace period short.
struct Stopping {
    task: JoinHandle<()>,
    hurry: Option<oneshot::Sender<()>>,
}

impl ActiveRun {
    /// Drains the pool (unstarted tests go back, running ones get `grace`) in a task of its
    /// own, so that the session keeps forwarding its events meanwhile.
    fn drain(&mut self, grace: Duration) {
        if let Some(pool) = self.pool.take() {
            let (hurry, hurried) = oneshot::channel::<()>();
            let task = tokio::spawn(pool.drain(grace, async move {
                let _ = hurried.await;
            }));
            self.stopping = Some(Stopping {
                task,
                hurry: Some(hurry),
            });
        }
    }

    /// Cuts a drain short: running tests are interrupted now.
    fn hurry(&mut self) {
        if let Some(hurry) = self.stopping.as_mut().and_then(|s| s.hurry.take()) {
            let _ = hurry.send(());
        }
    }

    /// Stops the pool: a running one gets `grace`; a draining one finishes its drain, or is
    /// hurried when `hurry`.
    async fn stop(mut self, grace: Duration, hurry: bool) {
        if let Some(pool) = self.pool.take() {
            pool.shutdown(grace).await;
        }
        if hurry {
            self.hurry();
        }
        if let Some(stopping) = self.stopping.take() {
            let _ = stopping.task.await;
        }
    }
}

pub struct Session<'a> {
    pub config: &'a AgentConfig,
    pub agent_id: &'a str,
    pub hostname: &'a str,
    pub topology: &'a Topology,
    pub workers: u32,
    /// Relative speed of this machine's cores (1.0 = the reference machine).
    pub speed: f64,
    /// Puts the farm's token on the join call.
    pub auth: AttachToken,
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
        let mut client = AgentsClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut inbound = client
            .join(ReceiverStream::new(out_rx))
            .await
            .map_err(|status| match status.code() {
                // A missing or wrong token stays wrong however often the agent retries.
                tonic::Code::Unauthenticated => {
                    SessionError::Rejected(status.message().to_string())
                }
                _ => SessionError::Lost(status.message().to_string()),
            })?
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
        // The first stop signal drains: no new work or runs, unstarted tests go back, running
        // tests may finish; the session ends once the pool has stopped. A second one hurries.
        let mut draining = false;
        let mut hurried = false;
        let mut now_signal = shutdown.clone();
        let grace = self.config.drain_grace;
        let end = loop {
            if draining && active.is_none() {
                break Ok(SessionEnd::Stopped);
            }
            let event = async {
                match active.as_mut() {
                    Some(run) => run.events.recv().await,
                    None => pending().await,
                }
            };
            tokio::select! {
                incoming = inbound.next() => match incoming {
                    Some(Ok(msg)) => {
                        if let Err(err) = self.on_message(msg, &mut active, &out_tx, draining).await {
                            break Err(err);
                        }
                    }
                    Some(Err(status)) => break Err(SessionError::Lost(status.message().to_string())),
                    None => break Ok(SessionEnd::CoordinatorClosed),
                },
                event = event => match event {
                    Some(first) => {
                        if let Some(run) = active.as_mut() {
                            if let Err(err) = forward_events(run, first, &out_tx, grace).await {
                                break Err(err);
                            }
                        }
                    }
                    // The pool has stopped and everything it said was forwarded.
                    None => {
                        if let Some(run) = active.take() {
                            run.stop(Duration::ZERO, false).await;
                        }
                    }
                },
                _ = shutdown.recv(), if !draining => {
                    draining = true;
                    if let Some(run) = active.as_mut() {
                        info!(
                            run = %run.run_id,
                            "draining: unstarted tests go back, running tests get {} s",
                            grace.as_secs_f64()
                        );
                        run.drain(grace);
                    }
                }
                _ = now_signal.recv_now(), if draining && !hurried => {
                    hurried = true;
                    if let Some(run) = active.as_mut() {
                        run.hurry();
                    }
                }
            }
        };
        if let Some(run) = active.take() {
            // The coordinator is gone or we are stopping: the run's tests go back to the
            // queue there; do not leave workers behind here.
            run.stop(Duration::from_secs(2), true).await;
        }
        if matches!(end, Ok(SessionEnd::Stopped)) {
            // A clean goodbye: once the coordinator has read our end of the stream (and so
            // every report before it), it closes its end.
            drop(out_tx);
            let _ = tokio::time::timeout(GOODBYE_WAIT, async {
                while let Some(Ok(_)) = inbound.next().await {}
            })
            .await;
        }
        end
    }

    async fn on_message(
        &self,
        msg: CoordinatorMessage,
        active: &mut Option<ActiveRun>,
        out: &mpsc::Sender<AgentMessage>,
        draining: bool,
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
                if draining {
                    // The agent leaves as soon as its current run has stopped.
                    info!(run = %start.run_id, "not starting a run: the agent is draining");
                    return Ok(());
                }
                if let Some(previous) = active.take() {
                    warn!(run = %previous.run_id, "a new run started before the last one ended");
                    previous.stop(Duration::from_secs(2), true).await;
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
                let Some(pool) = run.pool.as_ref() else {
                    // The pool is draining: work that crossed it goes straight back.
                    return give_back(run, work.assignments, out).await;
                };
                for assignment in work.assignments {
                    let result = if assignment.leases.is_empty() {
                        pool.no_more(assignment.worker)
                    } else {
                        pool.assign(
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
                let pool = active
                    .as_ref()
                    .filter(|r| r.run_id == revoke.run_id)
                    .and_then(|r| r.pool.as_ref());
                // A draining pool has given back all it could already.
                if let Some(pool) = pool {
                    if let Err(err) = pool.revoke(revoke.worker, revoke.leases) {
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
                        // A cancelled run stops now: its running tests are killed, not
                        // awaited (the coordinator has given up on their results).
                        let grace = if end.cancelled {
                            Duration::ZERO
                        } else {
                            END_GRACE
                        };
                        run.stop(grace, end.cancelled).await;
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
            // 0 (or nonsense) means no limit.
            timeout: Duration::try_from_secs_f64(start.timeout_seconds)
                .ok()
                .filter(|timeout| !timeout.is_zero()),
            max_replacements: MAX_REPLACEMENTS,
        };
        match WorkerPool::start(config, tx).await {
            Ok(pool) => Ok(Some(ActiveRun {
                run_id: start.run_id,
                pool: Some(pool),
                stopping: None,
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

/// Answers work handed to a draining pool: every lease goes back as if revoked.
async fn give_back(
    run: &ActiveRun,
    assignments: Vec<fly_common::proto::Assignment>,
    out: &mpsc::Sender<AgentMessage>,
) -> Result<(), SessionError> {
    let mut batch = EventBatch::default();
    for assignment in assignments.into_iter().filter(|a| !a.leases.is_empty()) {
        let leases = assignment.leases.iter().map(|l| l.lease).collect();
        batch.push(worker_event(
            assignment.worker,
            worker_event::Kind::Revoked(Revoked { leases }),
        ));
    }
    flush_batch(run, &mut batch, out).await
}

/// Forwards one pool event, and every other one already waiting, in as few messages as
/// possible. An unhealthy pool is drained with `grace` for its running tests.
async fn forward_events(
    run: &mut ActiveRun,
    first: PoolEvent,
    out: &mpsc::Sender<AgentMessage>,
    grace: Duration,
) -> Result<(), SessionError> {
    let mut batch = EventBatch::default();
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
            PoolEvent::Replaced {
                worker,
                replacement,
            } => info!(worker, replacement, "a crashed worker was replaced"),
            PoolEvent::Unhealthy { reason } => {
                flush_batch(run, &mut batch, out).await?;
                error!("leaving run {}: {reason}", run.run_id);
                send(
                    out,
                    agent_message::Kind::Unhealthy(fly_common::proto::AgentUnhealthy {
                        run_id: run.run_id.clone(),
                        reason,
                    }),
                )
                .await?;
                run.drain(grace);
            }
        }
        if batch.is_full() {
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
    batch: &mut EventBatch,
    out: &mpsc::Sender<AgentMessage>,
) -> Result<(), SessionError> {
    if batch.is_empty() {
        return Ok(());
    }
    let events = batch.take();
    send(
        out,
        agent_message::Kind::Events(WorkerEvents {
            run_id: run.run_id.clone(),
            events,
        }),
    )
    .await
}
