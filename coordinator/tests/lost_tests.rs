//! A test that takes down every agent that runs it, driven over real gRPC by scripted agents:
//! after `MAX_LOST_ATTEMPTS` requeues it ends as an error naming each agent it was lost on
//! (hostname and id), the record keeps them in `results.lost_on`, and the run ends instead of
//! handing the test to agent after agent forever.

use std::time::Duration;

use fly_common::proto::agents_client::AgentsClient;
use fly_common::proto::runs_client::RunsClient;
use fly_common::proto::{
    agent_message, coordinator_message, run_event, worker_event, AgentHello, AgentMessage,
    Collected, CollectedTest, CoordinatorMessage, RunEvent, SubmitRequest, TestResult, TestStarted,
    WantWork, WorkerEvent, WorkerEvents,
};
use fly_common::PROTOCOL_VERSION;
use fly_coordinator::node::Node;
use fly_coordinator::scheduler::MAX_LOST_ATTEMPTS;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(30);
const NODEID: &str = "t.py::test_takes_its_agent_down";

fn agent_id(n: u32) -> String {
    format!("00000000-0000-0000-0000-{n:012}")
}

/// One scripted agent with one worker, connected until dropped.
struct ScriptedAgent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<CoordinatorMessage>,
}

impl ScriptedAgent {
    async fn join(channel: Channel, n: u32) -> ScriptedAgent {
        let (tx, out) = mpsc::channel(64);
        let hello = AgentHello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: agent_id(n),
            hostname: format!("host-{n}"),
            workers: 1,
            ..Default::default()
        };
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        })
        .await
        .unwrap();
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

    async fn event(&self, run_id: &str, kind: worker_event::Kind) {
        self.send(agent_message::Kind::Events(WorkerEvents {
            run_id: run_id.into(),
            events: vec![WorkerEvent {
                worker: 0,
                kind: Some(kind),
            }],
        }))
        .await;
    }

    /// Joins the run, collects, asks for work and starts the test it gets; returns its lease.
    async fn take_the_test(&mut self) -> u64 {
        let run_id = loop {
            match self.next().await {
                coordinator_message::Kind::StartRun(start) => break start.run_id,
                coordinator_message::Kind::Welcome(_) => {}
                other => panic!("expected StartRun, got {other:?}"),
            }
        };
        self.send(agent_message::Kind::Collected(Collected {
            run_id: run_id.clone(),
            digest: "d".into(),
            total: 1,
            tests: vec![CollectedTest {
                nodeid: NODEID.into(),
                file: "t.py".into(),
                line: 1,
                group: String::new(),
            }],
            done: true,
            workers: 1,
            ..Default::default()
        }))
        .await;
        self.event(&run_id, worker_event::Kind::WantWork(WantWork {}))
            .await;
        // "Nothing for now" while the previous agent's loss is not noticed yet; the test comes
        // once it is.
        let lease = loop {
            match self.next().await {
                coordinator_message::Kind::Work(work) => {
                    if let Some(lease) = work.assignments.iter().flat_map(|a| &a.leases).next() {
                        break *lease;
                    }
                }
                other => panic!("expected work, got {other:?}"),
            }
        };
        assert_eq!(lease.test_index, 0);
        self.event(
            &run_id,
            worker_event::Kind::Started(TestStarted {
                lease: lease.lease,
                test_index: 0,
                ..Default::default()
            }),
        )
        .await;
        lease.lease
    }
}

async fn next_event(events: &mut Streaming<RunEvent>) -> run_event::Kind {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("the run goes on in time")
        .expect("the stream stays open")
        .expect("no stream error")
        .kind
        .expect("an event with content")
}

#[tokio::test]
async fn a_test_that_takes_down_every_agent_ends_as_an_error_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fly.db");
    let node = Node::start(&db, Duration::from_secs(10)).unwrap();
    let channel = node.in_memory_channel().await.unwrap();
    let mut run = RunsClient::new(channel.clone())
        .submit(SubmitRequest {
            protocol_version: PROTOCOL_VERSION,
            project: "lost".into(),
            pytest_args: vec!["-q".into()],
            reruns: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let agents = MAX_LOST_ATTEMPTS + 1;
    let mut leases = Vec::new();
    for n in 0..agents {
        let mut agent = ScriptedAgent::join(channel.clone(), n).await;
        leases.push(agent.take_the_test().await);
        // The test takes its agent down: the stream ends mid-test.
        drop(agent);
    }

    let mut result: Option<TestResult> = None;
    let finished = loop {
        match next_event(&mut run).await {
            run_event::Kind::Result(r) => {
                assert!(result.is_none(), "one result per test: {r:?}");
                result = Some(r);
            }
            run_event::Kind::Finished(finished) => break finished,
            _ => {}
        }
    };
    let result = result.expect("the test has a result");
    assert_eq!(result.outcome, "error");
    assert_eq!(result.attempts, agents);
    let report = &result.phases[0];
    assert_eq!(report.category, "error");
    for n in 0..agents {
        for name in [format!("host-{n}"), agent_id(n)] {
            assert!(
                report.longrepr.contains(&name) && report.message.contains(&name),
                "the error names {name}: {report:?}"
            );
        }
    }
    assert_eq!(finished.exit_code, 1, "an error fails the run");
    assert!(
        finished
            .counts
            .iter()
            .any(|c| c.category == "error" && c.count == 1),
        "{:?}",
        finished.counts
    );
    node.shutdown().await.unwrap();

    let conn = rusqlite::Connection::open(&db).unwrap();
    let (outcome, attempts, lease, lost_on): (String, u32, u64, String) = conn
        .query_row(
            "SELECT outcome, attempts, lease, lost_on FROM results WHERE nodeid = ?1",
            [NODEID],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    assert_eq!(outcome, "error");
    assert_eq!(attempts, agents);
    assert_eq!(
        lease,
        *leases.last().unwrap(),
        "the last attempt is the result's"
    );
    let lost: serde_json::Value = serde_json::from_str(&lost_on).unwrap();
    let hosts: Vec<&str> = lost
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["hostname"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..agents).map(|n| format!("host-{n}")).collect();
    assert_eq!(hosts, expected, "every agent it took down, in order");
    assert_eq!(lost[0]["agent_id"], agent_id(0));
    assert_eq!(lost[0]["worker"], 0);
}
