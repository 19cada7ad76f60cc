//! The coordinator's wire contract, driven over real gRPC by scripted agents and clients (no
//! Python): version checks, a whole run, and reports the coordinator must reject.

use std::time::Duration;

use fly_common::proto::agents_client::AgentsClient;
use fly_common::proto::runs_client::RunsClient;
use fly_common::proto::{
    agent_message, coordinator_message, run_event, worker_event, AgentHello, AgentMessage,
    Collected, CollectedTest, CoordinatorMessage, PhaseReport, RunEvent, RunFinished,
    SubmitRequest, TestFinished, WantWork, WorkerEvent, WorkerEvents,
};
use fly_common::PROTOCOL_VERSION;
use fly_coordinator::node::Node;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(30);

fn hello(version: u32) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Hello(AgentHello {
            protocol_version: version,
            agent_id: uuid_like(version),
            hostname: "scripted".into(),
            workers: 1,
            ..Default::default()
        })),
    }
}

fn uuid_like(n: u32) -> String {
    format!("00000000-0000-0000-0000-{n:012}")
}

async fn start() -> (tempfile::TempDir, Node, Channel) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("fly.db"), Duration::from_secs(10)).unwrap();
    let channel = node.in_memory_channel().await.unwrap();
    (dir, node, channel)
}

/// A scripted agent: what it sends, and the stream of what it receives.
struct ScriptedAgent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<CoordinatorMessage>,
}

impl ScriptedAgent {
    async fn join(channel: Channel, version: u32) -> ScriptedAgent {
        let (tx, out) = mpsc::channel(64);
        tx.send(hello(version)).await.unwrap();
        let rx = AgentsClient::new(channel)
            .join(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        ScriptedAgent { tx, rx }
    }

    async fn next(&mut self) -> coordinator_message::Kind {
        let message = tokio::time::timeout(WAIT, self.rx.next())
            .await
            .expect("a message from the coordinator in time")
            .expect("the stream stays open")
            .expect("no stream error");
        message.kind.expect("a message with content")
    }

    async fn send(&self, kind: agent_message::Kind) {
        self.tx
            .send(AgentMessage { kind: Some(kind) })
            .await
            .unwrap();
    }

    async fn events(&self, run_id: &str, events: Vec<(u32, worker_event::Kind)>) {
        self.send(agent_message::Kind::Events(WorkerEvents {
            run_id: run_id.into(),
            events: events
                .into_iter()
                .map(|(worker, kind)| WorkerEvent {
                    worker,
                    kind: Some(kind),
                })
                .collect(),
        }))
        .await;
    }
}

fn report(lease: u64, test: u32, phase: i32, category: &str) -> worker_event::Kind {
    worker_event::Kind::Report(PhaseReport {
        lease,
        test_index: test,
        phase,
        outcome: if category == "failed" || category == "error" {
            "failed".into()
        } else {
            "passed".into()
        },
        category: category.into(),
        duration: 0.01,
        ..Default::default()
    })
}

async fn submit(channel: Channel) -> Streaming<RunEvent> {
    RunsClient::new(channel)
        .submit(SubmitRequest {
            protocol_version: PROTOCOL_VERSION,
            project: "scripted".into(),
            pytest_args: vec!["-q".into()],
            client_cwd: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn finished(events: &mut Streaming<RunEvent>) -> RunFinished {
    loop {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the run ends in time")
            .expect("the stream stays open")
            .expect("no stream error");
        if let Some(run_event::Kind::Finished(finished)) = event.kind {
            return finished;
        }
    }
}

#[tokio::test]
async fn an_agent_speaking_another_protocol_version_is_refused_with_both_versions_named() {
    let (_dir, _node, channel) = start().await;
    let mut agent = ScriptedAgent::join(channel, PROTOCOL_VERSION + 41).await;
    match agent.next().await {
        coordinator_message::Kind::Reject(reject) => {
            assert!(reject.reason.contains(&PROTOCOL_VERSION.to_string()));
            assert!(reject.reason.contains(&(PROTOCOL_VERSION + 41).to_string()));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_speaking_another_protocol_version_is_refused() {
    let (_dir, _node, channel) = start().await;
    let status = RunsClient::new(channel)
        .submit(SubmitRequest {
            protocol_version: PROTOCOL_VERSION + 1,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert!(
        status.message().contains("protocol version mismatch"),
        "{status:?}"
    );
}

#[tokio::test]
async fn an_agent_stream_that_does_not_start_with_hello_is_refused() {
    let (_dir, _node, channel) = start().await;
    let (tx, out) = mpsc::channel(4);
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Events(WorkerEvents::default())),
    })
    .await
    .unwrap();
    let status = AgentsClient::new(channel)
        .join(ReceiverStream::new(out))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

/// A whole run through real gRPC with a scripted agent: collection, pulling work, reports,
/// a duplicate and a forged report that must not count, and pytest's exit code.
#[tokio::test]
async fn a_scripted_agent_runs_a_whole_run_and_bad_reports_do_not_count() {
    let (_dir, node, channel) = start().await;
    let mut agent = ScriptedAgent::join(channel.clone(), PROTOCOL_VERSION).await;
    assert!(matches!(
        agent.next().await,
        coordinator_message::Kind::Welcome(_)
    ));
    let mut run = submit(channel).await;
    let start = match agent.next().await {
        coordinator_message::Kind::StartRun(start) => start,
        other => panic!("expected StartRun, got {other:?}"),
    };
    assert!(start.want_collection);
    assert_eq!(start.pytest_args, vec!["-q".to_string()]);
    let run_id = start.run_id.clone();
    let tests: Vec<CollectedTest> = ["t.py::test_a", "t.py::test_b[x::y]", "t.py::test_c"]
        .iter()
        .map(|id| CollectedTest {
            nodeid: id.to_string(),
            file: "t.py".into(),
            line: 1,
            group: String::new(),
        })
        .collect();
    agent
        .send(agent_message::Kind::Collected(Collected {
            run_id: run_id.clone(),
            digest: "d".into(),
            total: 3,
            deselected: 1,
            tests,
            done: true,
            workers: 1,
        }))
        .await;
    agent
        .events(
            &run_id,
            vec![(0, worker_event::Kind::WantWork(WantWork {}))],
        )
        .await;
    let mut leases = Vec::new();
    while leases.len() < 3 {
        match agent.next().await {
            coordinator_message::Kind::Work(work) => {
                for assignment in work.assignments {
                    assert_eq!(assignment.worker, 0);
                    if assignment.leases.is_empty() {
                        continue;
                    }
                    leases.extend(assignment.leases);
                }
                if leases.len() < 3 {
                    agent
                        .events(
                            &run_id,
                            vec![(0, worker_event::Kind::WantWork(WantWork {}))],
                        )
                        .await;
                }
            }
            other => panic!("expected work, got {other:?}"),
        }
    }
    let (setup, call, teardown) = (1, 2, 3);
    let mut events = Vec::new();
    // A report for a lease never handed out: rejected.
    events.push((0, report(9_999, 0, call, "failed")));
    for lease in &leases {
        let category = if lease.test_index == 1 {
            "failed"
        } else {
            "passed"
        };
        events.push((0, report(lease.lease, lease.test_index, setup, "")));
        events.push((0, report(lease.lease, lease.test_index, call, category)));
        // A duplicate call report: the first one counts.
        events.push((0, report(lease.lease, lease.test_index, call, "failed")));
        events.push((0, report(lease.lease, lease.test_index, teardown, "")));
        events.push((
            0,
            worker_event::Kind::Finished(TestFinished {
                lease: lease.lease,
                test_index: lease.test_index,
            }),
        ));
    }
    agent.events(&run_id, events).await;
    let done = finished(&mut run).await;
    assert_eq!(done.exit_code, 1);
    let counts: Vec<(String, u32)> = done
        .counts
        .iter()
        .map(|c| (c.category.clone(), c.count))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("failed".to_string(), 1),
            ("passed".to_string(), 2),
            ("deselected".to_string(), 1)
        ]
    );
    assert!(matches!(
        agent.next().await,
        coordinator_message::Kind::EndRun(_)
    ));
    drop(agent);
    node.shutdown().await.unwrap();
}
