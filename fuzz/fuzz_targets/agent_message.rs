//! Fuzzes what the coordinator accepts from agents. The input is decoded twice: as one
//! `AgentMessage` (decoding yields a message or a typed error, and a message survives a round
//! trip), and as a sequence of length-delimited `AgentMessage`s that an agent in a running run
//! sends over real gRPC (in memory) to a real coordinator (dispatcher, scheduler, SQLite).
//! Messages with an empty run id are aimed at the real run, and small lease numbers at the
//! leases the agent was really handed, so the fuzzer reaches past the first checks. Then the
//! agent leaves, and a well-behaved agent must be able to finish the run with exactly one
//! result per test. The dispatcher's checks need its state, so they are fuzzed through it
//! rather than as pure functions.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use fly_common::proto::agents_client::AgentsClient;
use fly_common::proto::runs_client::RunsClient;
use fly_common::proto::{
    agent_message, coordinator_message, run_event, worker_event, AgentHello, AgentMessage,
    Collected, CollectedTest, CoordinatorMessage, Lease, PhaseReport, RunEvent, SubmitRequest,
    TestFinished, WantWork, WorkerEvent, WorkerEvents,
};
use fly_common::PROTOCOL_VERSION;
use fly_coordinator::node::Node;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Streaming;

/// Hang guard: a run that does not finish in this time is a finding.
const WAIT: Duration = Duration::from_secs(30);
const TESTS: [&str; 3] = ["t.py::test_a", "t.py::test_b[x::y]", "t.py::test_c"];
const DIGEST: &str = "the-digest";
/// Messages taken from one input at most.
const MAX_MESSAGES: usize = 64;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the fuzz target")
    })
}

struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<CoordinatorMessage>,
}

impl Agent {
    async fn join(channel: Channel, id: &str) -> Agent {
        let (tx, out) = mpsc::channel(1024);
        send(
            &tx,
            agent_message::Kind::Hello(AgentHello {
                protocol_version: PROTOCOL_VERSION,
                agent_id: id.into(),
                hostname: id.into(),
                workers: 2,
                ..Default::default()
            }),
        )
        .await;
        let rx = AgentsClient::new(channel)
            .join(ReceiverStream::new(out))
            .await
            .expect("the coordinator takes an agent")
            .into_inner();
        let mut agent = Agent { tx, rx };
        assert!(matches!(
            agent.next().await,
            coordinator_message::Kind::Welcome(_)
        ));
        agent
    }

    async fn next(&mut self) -> coordinator_message::Kind {
        match tokio::time::timeout(WAIT, self.rx.next()).await {
            Ok(Some(Ok(CoordinatorMessage { kind: Some(kind) }))) => kind,
            other => panic!("expected a message from the coordinator, got {other:?}"),
        }
    }
}

async fn send(tx: &mpsc::Sender<AgentMessage>, kind: agent_message::Kind) {
    tx.send(AgentMessage { kind: Some(kind) })
        .await
        .expect("the agent stream is open");
}

fn collection(run_id: &str, with_list: bool) -> agent_message::Kind {
    agent_message::Kind::Collected(Collected {
        run_id: run_id.into(),
        digest: DIGEST.into(),
        total: TESTS.len() as u32,
        tests: if with_list {
            TESTS
                .iter()
                .map(|id| CollectedTest {
                    nodeid: id.to_string(),
                    file: "t.py".into(),
                    line: 1,
                    ..Default::default()
                })
                .collect()
        } else {
            Vec::new()
        },
        done: true,
        workers: 2,
        ..Default::default()
    })
}

fn want(run_id: &str, worker: u32) -> agent_message::Kind {
    agent_message::Kind::Events(WorkerEvents {
        run_id: run_id.into(),
        events: vec![WorkerEvent {
            worker,
            kind: Some(worker_event::Kind::WantWork(WantWork {})),
        }],
    })
}

/// Points messages without a run id at the real run, and small lease numbers at real leases.
fn aim(message: &mut AgentMessage, run_id: &str, handed: &[Lease]) {
    let lease = |n: &mut u64| {
        if *n < 16 && !handed.is_empty() {
            *n = handed[*n as usize % handed.len()].lease;
        }
    };
    let run = |id: &mut String| {
        if id.is_empty() {
            *id = run_id.to_string();
        }
    };
    match message.kind.as_mut() {
        Some(agent_message::Kind::Collected(c)) => run(&mut c.run_id),
        Some(agent_message::Kind::CollectionFailed(c)) => run(&mut c.run_id),
        Some(agent_message::Kind::Notice(n)) => run(&mut n.run_id),
        Some(agent_message::Kind::Events(events)) => {
            run(&mut events.run_id);
            for event in &mut events.events {
                match event.kind.as_mut() {
                    Some(worker_event::Kind::Report(r)) => lease(&mut r.lease),
                    Some(worker_event::Kind::Started(s)) => lease(&mut s.lease),
                    Some(worker_event::Kind::Finished(f)) => lease(&mut f.lease),
                    Some(worker_event::Kind::Revoked(r)) => r.leases.iter_mut().for_each(lease),
                    Some(worker_event::Kind::Exited(e)) => e.unstarted.iter_mut().for_each(lease),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// A well-behaved agent finishes the run; returns how many results each test got.
async fn finish_run(agent: &mut Agent, events: &mut Streaming<RunEvent>) -> BTreeMap<u32, u32> {
    let mut results = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::select! {
            message = agent.next() => match message {
                coordinator_message::Kind::StartRun(start) => {
                    send(&agent.tx, collection(&start.run_id, start.want_collection)).await;
                    send(&agent.tx, want(&start.run_id, 0)).await;
                }
                coordinator_message::Kind::SendCollection(request) => {
                    send(&agent.tx, collection(&request.run_id, true)).await;
                }
                coordinator_message::Kind::Work(work) => {
                    for assignment in work.assignments.iter().filter(|a| !a.leases.is_empty()) {
                        let mut batch = Vec::new();
                        for lease in &assignment.leases {
                            for (phase, category) in [(1, ""), (2, "passed"), (3, "")] {
                                batch.push(worker_event::Kind::Report(PhaseReport {
                                    lease: lease.lease,
                                    test_index: lease.test_index,
                                    phase,
                                    outcome: "passed".into(),
                                    category: category.into(),
                                    ..Default::default()
                                }));
                            }
                            batch.push(worker_event::Kind::Finished(TestFinished {
                                lease: lease.lease,
                                test_index: lease.test_index,
                            }));
                        }
                        batch.push(worker_event::Kind::WantWork(WantWork {}));
                        let events = batch
                            .into_iter()
                            .map(|kind| WorkerEvent { worker: assignment.worker, kind: Some(kind) })
                            .collect();
                        send(&agent.tx, agent_message::Kind::Events(WorkerEvents {
                            run_id: work.run_id.clone(),
                            events,
                        }))
                        .await;
                    }
                }
                _ => {}
            },
            event = events.next() => match event {
                Some(Ok(RunEvent { kind: Some(run_event::Kind::Result(result)) })) => {
                    *results.entry(result.test_index).or_insert(0) += 1;
                }
                Some(Ok(RunEvent { kind: Some(run_event::Kind::Finished(_)) })) => return results,
                Some(Ok(_)) => {}
                other => panic!("the run's stream ended without a finish: {other:?}"),
            },
            _ = tokio::time::sleep_until(deadline) => {
                panic!("the run never finished; results so far {results:?}");
            }
        }
    }
}

async fn run_case(messages: Vec<AgentMessage>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let node = Node::start(&dir.path().join("fly.db"), Duration::from_secs(10)).expect("a node");
    let channel = node
        .in_memory_channel()
        .await
        .expect("an in-memory channel");
    let mut a = Agent::join(channel.clone(), "agent-a").await;
    let mut events = RunsClient::new(channel.clone())
        .submit(SubmitRequest {
            protocol_version: PROTOCOL_VERSION,
            project: "fuzz".into(),
            pytest_args: vec!["-q".into()],
            ..Default::default()
        })
        .await
        .expect("a submitted run")
        .into_inner();
    let coordinator_message::Kind::StartRun(start) = a.next().await else {
        panic!("expected StartRun");
    };
    let run_id = start.run_id;
    send(&a.tx, collection(&run_id, true)).await;
    send(&a.tx, want(&run_id, 0)).await;
    let handed: Vec<Lease> = match a.next().await {
        coordinator_message::Kind::Work(work) => work
            .assignments
            .into_iter()
            .flat_map(|a| a.leases)
            .collect(),
        other => panic!("expected work, got {other:?}"),
    };
    for mut message in messages {
        aim(&mut message, &run_id, &handed);
        if a.tx.send(message).await.is_err() {
            break;
        }
    }
    // Leave, and wait until the coordinator has handled everything (it closes our stream).
    let Agent { tx, mut rx } = a;
    drop(tx);
    tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = rx.next().await {} })
        .await
        .expect("the coordinator closes a departed agent's stream");

    let mut b = Agent::join(channel, "agent-b").await;
    let results = finish_run(&mut b, &mut events).await;
    let once: BTreeMap<u32, u32> = (0..TESTS.len() as u32).map(|i| (i, 1)).collect();
    assert_eq!(results, once, "every test gets exactly one result");
    drop(b);
    node.shutdown().await.expect("a clean shutdown");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = AgentMessage::decode(data) {
        let encoded = message.encode_to_vec();
        let again = AgentMessage::decode(encoded.as_slice()).expect("re-decoding");
        assert_eq!(again.encode_to_vec(), encoded);
    }
    let mut rest = data;
    let mut messages = Vec::new();
    while !rest.is_empty() && messages.len() < MAX_MESSAGES {
        match AgentMessage::decode_length_delimited(&mut rest) {
            Ok(message) => messages.push(message),
            Err(_) => break,
        }
    }
    if messages.is_empty() {
        return;
    }
    runtime().block_on(run_case(messages));
});
