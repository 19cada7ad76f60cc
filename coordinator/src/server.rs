//! The gRPC face of the coordinator: turns agent streams and client calls into dispatcher
//! inputs, and the dispatcher's answers back into streams.
//!
//! Nothing here decides anything about runs. It checks what must be checked before the
//! dispatcher sees a message (the token on every call, through [`crate::auth`]'s interceptor;
//! the protocol version on every first message) and notices when a stream ends, which is how
//! an agent's or a client's departure becomes known.
//!
//! All agent streams are read by one task, and only when the dispatcher has room for what it
//! reads: a message waiting for the dispatcher waits undecoded, in its connection's HTTP/2
//! window, where it takes a fraction of the memory it does decoded.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use fly_common::proto::agents_server::{Agents, AgentsServer};
use fly_common::proto::runs_server::{Runs, RunsServer};
use fly_common::proto::{
    agent_message, coordinator_message, AgentMessage, CancelRequest, CancelResponse,
    CoordinatorMessage, FollowRequest, Reject, RunEvent, SubmitRequest,
};
use fly_common::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use futures_util::stream::SelectAll;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::auth::TokenCheck;
use crate::dispatcher::{follower_channel, DispatcherHandle, Input};
use crate::scheduler::AgentSlot;
use crate::units::Dist;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long an agent may take to say hello before its stream is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Service {
    dispatcher: DispatcherHandle,
    /// Agent streams past their hello, for the reader task ([`read_agents`]).
    joined: mpsc::UnboundedSender<AgentStream>,
}

impl Service {
    /// The service, and the task that reads every agent's stream (it ends once the service and
    /// its clones are gone and every agent stream has ended, or when the dispatcher stops).
    pub fn new(dispatcher: DispatcherHandle) -> Service {
        let (joined, streams) = mpsc::unbounded_channel();
        tokio::spawn(read_agents(dispatcher.clone(), streams));
        Service { dispatcher, joined }
    }

    /// The Agents service; `check` refuses every call without the farm's token before the
    /// handler sees it.
    pub fn agents_server(
        &self,
        check: TokenCheck,
    ) -> InterceptedService<AgentsServer<Service>, TokenCheck> {
        let server = AgentsServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, check)
    }

    /// The Runs service, behind the same token check.
    pub fn runs_server(
        &self,
        check: TokenCheck,
    ) -> InterceptedService<RunsServer<Service>, TokenCheck> {
        let server = RunsServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, check)
    }

    fn unavailable() -> Status {
        Status::unavailable("the coordinator is shutting down")
    }
}

fn version_mismatch(theirs: u32, who: &str) -> String {
    format!(
        "protocol version mismatch: this coordinator speaks fly protocol {PROTOCOL_VERSION}, the \
         {who} speaks {theirs}; run the same fly version on both sides"
    )
}

#[tonic::async_trait]
impl Agents for Service {
    type JoinStream = BoxStream<CoordinatorMessage>;

    async fn join(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "in-process".into());
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) => return Err(Status::invalid_argument("stream ended before hello")),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 30 s")),
        };
        let hello = match first.kind {
            Some(agent_message::Kind::Hello(hello)) => hello,
            _ => {
                warn!(%peer, "agent stream did not start with a hello; refused");
                return Err(Status::invalid_argument(
                    "the first message on an agent stream must be a hello",
                ));
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            let reason = version_mismatch(hello.protocol_version, "agent");
            warn!(%peer, agent = %hello.agent_id, "{reason}");
            let reject = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Reject(Reject {
                    protocol_version: PROTOCOL_VERSION,
                    reason,
                })),
            };
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(reject)))));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let agent_id = hello.agent_id.clone();
        info!(%peer, agent = %agent_id, "agent connecting");
        if !self.dispatcher.send(Input::AgentJoined {
            hello,
            tx,
            reply: reply_tx,
        }) {
            return Err(Self::unavailable());
        }
        let slot = reply_rx.await.map_err(|_| Self::unavailable())?;
        let stream = AgentStream {
            slot,
            inbound: Some(inbound),
        };
        if self.joined.send(stream).is_err() {
            return Err(Self::unavailable());
        }
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// One agent's stream after its hello, as dispatcher inputs: its messages, then one
/// [`Input::AgentGone`] when it ends or fails.
struct AgentStream {
    slot: AgentSlot,
    /// `None` once the departure was yielded.
    inbound: Option<Streaming<AgentMessage>>,
}

impl Stream for AgentStream {
    type Item = Input;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Input>> {
        let slot = self.slot;
        let Some(inbound) = self.inbound.as_mut() else {
            return Poll::Ready(None);
        };
        let reason = match ready!(Pin::new(inbound).poll_next(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Input::AgentMessage { slot, message })),
            Some(Err(status)) => format!("stream error: {}", status.message()),
            None => "disconnected".to_string(),
        };
        self.inbound = None;
        Poll::Ready(Some(Input::AgentGone { slot, reason }))
    }
}

/// Reads every agent's stream and hands what they carry to the dispatcher, each input read
/// only once the dispatcher has room for it. One reader for all agents, rather than one each
/// holding a decoded message while it waits, bounds the decoded messages in memory by the
/// dispatcher's backlog whatever the number of agents; and since it holds that room while
/// waiting for whichever stream speaks first, no quiet agent keeps the others from being read.
async fn read_agents(
    dispatcher: DispatcherHandle,
    mut joined: mpsc::UnboundedReceiver<AgentStream>,
) {
    let mut streams: SelectAll<AgentStream> = SelectAll::new();
    let mut joining = true;
    loop {
        let Some(room) = dispatcher.agent_room().await else {
            return;
        };
        let input = loop {
            tokio::select! {
                stream = joined.recv(), if joining => match stream {
                    Some(stream) => streams.push(stream),
                    None => joining = false,
                },
                Some(input) = streams.next(), if !streams.is_empty() => break input,
                else => return,
            }
        };
        room.send(input);
    }
}

#[tonic::async_trait]
impl Runs for Service {
    type SubmitStream = BoxStream<RunEvent>;
    type FollowStream = BoxStream<RunEvent>;

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let request = request.into_inner();
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(version_mismatch(
                request.protocol_version,
                "client",
            )));
        }
        if let Err(reason) = request.dist.parse::<Dist>() {
            return Err(Status::invalid_argument(reason));
        }
        let (tx, rx) = follower_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let watch = tx.clone();
        if !self.dispatcher.send(Input::Submit {
            request,
            tx,
            reply: reply_tx,
        }) {
            return Err(Self::unavailable());
        }
        // Err: the dispatcher refused the submission (a run that cannot be resumed).
        let run_id = reply_rx.await.map_err(|_| Self::unavailable())??;
        // The run lives as long as its submitter's stream.
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            watch.closed().await;
            dispatcher.send(Input::SubmitterGone { run_id });
        });
        Ok(Response::new(Box::pin(rx)))
    }

    async fn follow(
        &self,
        request: Request<FollowRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let request = request.into_inner();
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(version_mismatch(
                request.protocol_version,
                "client",
            )));
        }
        let (tx, rx) = follower_channel();
        if !self.dispatcher.send(Input::Follow {
            run_id: request.run_id,
            tx,
        }) {
            return Err(Self::unavailable());
        }
        Ok(Response::new(Box::pin(rx)))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let request = request.into_inner();
        if !self.dispatcher.send(Input::Cancel {
            run_id: request.run_id,
            reason: "cancelled by a client".into(),
        }) {
            return Err(Self::unavailable());
        }
        Ok(Response::new(CancelResponse {}))
    }
}
