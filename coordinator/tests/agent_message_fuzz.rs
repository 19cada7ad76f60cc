//! What the coordinator accepts from agents, fuzzed on stable Rust (the libFuzzer targets in
//! `fuzz/` do the same without a case limit, on nightly):
//!
//! - decoding: arbitrary bytes, and valid `AgentMessage`s with bytes flipped, inserted or cut
//!   off, decode to a message or a typed `prost::DecodeError`, never a panic;
//! - the dispatcher: an agent in a running run sends any sequence of messages (other runs,
//!   leases never handed out, tests it was not given, duplicate and out-of-order reports, odd
//!   phases and categories, NaN durations, second hellos and collections, ...), then leaves; a
//!   well-behaved agent must still be able to finish the run, and every test gets exactly one
//!   result;
//! - the port: garbage and plain HTTP/1 bytes on the gRPC port, and a message over the size
//!   limit, are refused without harming anyone else: a normal run works afterwards.

use std::collections::BTreeMap;
use std::time::Duration;

use fly_common::proto::agents_client::AgentsClient;
use fly_common::proto::runs_client::RunsClient;
use fly_common::proto::{
    agent_message, coordinator_message, run_event, worker_event, AgentHello, AgentMessage,
    AgentNotice, Collected, CollectedTest, CollectionFailed, CoordinatorMessage, Lease,
    PhaseReport, RunEvent, SubmitRequest, TestFinished, TestStarted, WantWork, WorkerEvent,
    WorkerEvents, WorkerExited,
};
use fly_common::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use fly_coordinator::auth::Security;
use fly_coordinator::node::{self, Node};
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

/// Hang guard for anything awaited here; never a timing assertion.
const WAIT: Duration = Duration::from_secs(30);

/// The run's collection.
const TESTS: [&str; 3] = [
    "t.py::test_a",
    "t.py::test_b[colons::and/slashes]",
    "t.py::test_c[quote'\"-\\xe9]",
];
const DIGEST: &str = "the-digest-of-the-three-tests";

// --- decoding -----------------------------------------------------------------------------

/// Decodes `bytes` as the server does; a message must survive a second round unchanged.
fn decode_checked(bytes: &[u8]) -> Result<(), TestCaseError> {
    match AgentMessage::decode(bytes) {
        Ok(message) => {
            let encoded = message.encode_to_vec();
            let again = AgentMessage::decode(encoded.as_slice())
                .map_err(|e| TestCaseError::fail(format!("re-decoding failed: {e}")))?;
            // Compared as bytes: a NaN duration is not equal to itself.
            prop_assert_eq!(again.encode_to_vec(), encoded);
        }
        Err(error) => {
            let error: prost::DecodeError = error;
            prop_assert!(!error.to_string().is_empty());
        }
    }
    Ok(())
}

/// Byte-level damage to an encoded message.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, bits)| Mutation::Flip(at, bits)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    match *mutation {
        Mutation::Flip(at, bits) if len > 0 => bytes[at % len] ^= bits,
        Mutation::Insert(at, byte) => bytes.insert(at % (len + 1), byte),
        Mutation::Remove(at) if len > 0 => {
            bytes.remove(at % len);
        }
        Mutation::Truncate(at) => bytes.truncate(at % (len + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_decode_to_a_message_or_a_typed_error(
        bytes in vec(any::<u8>(), 0..512)
    ) {
        decode_checked(&bytes)?;
    }

    #[test]
    fn damaged_valid_messages_decode_to_a_message_or_a_typed_error(
        message in agent_message(),
        damage in vec(mutation(), 1..6),
    ) {
        let mut bytes = materialize(&message, "run-id", &[]).encode_to_vec();
        for mutation in &damage {
            mutate(&mut bytes, mutation);
        }
        decode_checked(&bytes)?;
    }
}

// --- what an agent may send, as templates ---------------------------------------------------

/// A run id: the run the agent serves, or another (possibly empty) one.
#[derive(Debug, Clone)]
enum RunRef {
    Real,
    Other(String),
}

/// A lease: one of those handed to the agent (by position), or any number.
#[derive(Debug, Clone)]
enum LeaseRef {
    Handed(usize),
    Raw(u64),
}

#[derive(Debug, Clone)]
enum Event {
    Want,
    Started(LeaseRef, u32),
    Report {
        lease: LeaseRef,
        test: u32,
        phase: i32,
        outcome: String,
        category: String,
        duration: f64,
        longrepr: String,
    },
    Finished(LeaseRef, u32),
    Revoked(Vec<LeaseRef>),
    Exited {
        exit_code: i32,
        signal: i32,
        reason: String,
        unstarted: Vec<LeaseRef>,
    },
    Nothing,
}

#[derive(Debug, Clone)]
enum Template {
    Empty,
    Hello(u32),
    Collected {
        run: RunRef,
        same_digest: bool,
        tests: Vec<String>,
        total: u32,
        deselected: u32,
        done: bool,
        workers: u32,
    },
    CollectionFailed {
        run: RunRef,
        exit_code: i32,
        output: String,
    },
    Notice {
        run: RunRef,
        message: String,
    },
    Events {
        run: RunRef,
        events: Vec<(u32, Event)>,
    },
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "", "passed", "failed", "skipped", "error", "xfailed", "xpassed", "setup", "call",
        ])
        .prop_map(str::to_string),
        1 => vec(any::<char>(), 0..12).prop_map(String::from_iter),
    ]
}

fn nodeid() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(TESTS.to_vec()).prop_map(str::to_string),
        vec(any::<char>(), 0..24).prop_map(String::from_iter),
    ]
}

fn run_ref() -> impl Strategy<Value = RunRef> {
    prop_oneof![
        4 => Just(RunRef::Real),
        1 => text().prop_map(RunRef::Other),
    ]
}

fn lease_ref() -> impl Strategy<Value = LeaseRef> {
    prop_oneof![
        4 => (0usize..4).prop_map(LeaseRef::Handed),
        1 => any::<u64>().prop_map(LeaseRef::Raw),
    ]
}

fn small_or_any_u32(small: u32) -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0..small, 1 => any::<u32>()]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::Want),
        Just(Event::Nothing),
        (lease_ref(), small_or_any_u32(4)).prop_map(|(l, t)| Event::Started(l, t)),
        (
            lease_ref(),
            small_or_any_u32(4),
            prop_oneof![4 => 1i32..=3, 1 => any::<i32>()],
            text(),
            text(),
            prop_oneof![4 => 0.0f64..2.0, 1 => any::<f64>()],
            text(),
        )
            .prop_map(
                |(lease, test, phase, outcome, category, duration, longrepr)| {
                    Event::Report {
                        lease,
                        test,
                        phase,
                        outcome,
                        category,
                        duration,
                        longrepr,
                    }
                }
            ),
        (lease_ref(), small_or_any_u32(4)).prop_map(|(l, t)| Event::Finished(l, t)),
        vec(lease_ref(), 0..4).prop_map(Event::Revoked),
        (any::<i32>(), any::<i32>(), text(), vec(lease_ref(), 0..4)).prop_map(
            |(exit_code, signal, reason, unstarted)| Event::Exited {
                exit_code,
                signal,
                reason,
                unstarted,
            }
        ),
    ]
}

fn agent_message() -> impl Strategy<Value = Template> {
    prop_oneof![
        1 => Just(Template::Empty),
        1 => prop_oneof![Just(PROTOCOL_VERSION), any::<u32>()].prop_map(Template::Hello),
        2 => (
            run_ref(),
            any::<bool>(),
            vec(nodeid(), 0..5),
            small_or_any_u32(5),
            small_or_any_u32(3),
            any::<bool>(),
            small_or_any_u32(3),
        )
            .prop_map(|(run, same_digest, tests, total, deselected, done, workers)| {
                Template::Collected {
                    run,
                    same_digest,
                    tests,
                    total,
                    deselected,
                    done,
                    workers,
                }
            }),
        1 => (run_ref(), any::<i32>(), text()).prop_map(|(run, exit_code, output)| {
            Template::CollectionFailed {
                run,
                exit_code,
                output,
            }
        }),
        1 => (run_ref(), text()).prop_map(|(run, message)| Template::Notice { run, message }),
        8 => (run_ref(), vec((small_or_any_u32(3), event()), 0..8))
            .prop_map(|(run, events)| Template::Events { run, events }),
    ]
}

/// The wire message for `template`, in the run `run_id` where `handed` are the agent's leases.
fn materialize(template: &Template, run_id: &str, handed: &[Lease]) -> AgentMessage {
    let run = |r: &RunRef| match r {
        RunRef::Real => run_id.to_string(),
        RunRef::Other(other) => other.clone(),
    };
    let lease = |l: &LeaseRef| match *l {
        LeaseRef::Handed(i) if !handed.is_empty() => handed[i % handed.len()].lease,
        LeaseRef::Handed(i) => i as u64,
        LeaseRef::Raw(n) => n,
    };
    let kind = match template {
        Template::Empty => None,
        Template::Hello(version) => Some(agent_message::Kind::Hello(AgentHello {
            protocol_version: *version,
            agent_id: "a-second-hello".into(),
            workers: 2,
            ..Default::default()
        })),
        Template::Collected {
            run: r,
            same_digest,
            tests,
            total,
            deselected,
            done,
            workers,
        } => Some(agent_message::Kind::Collected(Collected {
            run_id: run(r),
            digest: if *same_digest {
                DIGEST.into()
            } else {
                "another-digest".into()
            },
            total: *total,
            deselected: *deselected,
            tests: tests.iter().map(|id| collected_test(id)).collect(),
            done: *done,
            workers: *workers,
        })),
        Template::CollectionFailed {
            run: r,
            exit_code,
            output,
        } => Some(agent_message::Kind::CollectionFailed(CollectionFailed {
            run_id: run(r),
            exit_code: *exit_code,
            output: output.clone(),
        })),
        Template::Notice { run: r, message } => Some(agent_message::Kind::Notice(AgentNotice {
            run_id: run(r),
            message: message.clone(),
        })),
        Template::Events { run: r, events } => Some(agent_message::Kind::Events(WorkerEvents {
            run_id: run(r),
            events: events
                .iter()
                .map(|(worker, event)| WorkerEvent {
                    worker: *worker,
                    kind: match event {
                        Event::Nothing => None,
                        Event::Want => Some(worker_event::Kind::WantWork(WantWork {})),
                        Event::Started(l, test) => Some(worker_event::Kind::Started(TestStarted {
                            lease: lease(l),
                            test_index: *test,
                            at: 0.0,
                        })),
                        Event::Report {
                            lease: l,
                            test,
                            phase,
                            outcome,
                            category,
                            duration,
                            longrepr,
                        } => Some(worker_event::Kind::Report(PhaseReport {
                            lease: lease(l),
                            test_index: *test,
                            phase: *phase,
                            outcome: outcome.clone(),
                            category: category.clone(),
                            duration: *duration,
                            longrepr: longrepr.clone(),
                            ..Default::default()
                        })),
                        Event::Finished(l, test) => {
                            Some(worker_event::Kind::Finished(TestFinished {
                                lease: lease(l),
                                test_index: *test,
                            }))
                        }
                        Event::Revoked(leases) => {
                            Some(worker_event::Kind::Revoked(fly_common::proto::Revoked {
                                leases: leases.iter().map(lease).collect(),
                            }))
                        }
                        Event::Exited {
                            exit_code,
                            signal,
                            reason,
                            unstarted,
                        } => Some(worker_event::Kind::Exited(WorkerExited {
                            exit_code: *exit_code,
                            signal: *signal,
                            reason: reason.clone(),
                            unstarted: unstarted.iter().map(lease).collect(),
                        })),
                    },
                })
                .collect(),
        })),
    };
    AgentMessage { kind }
}

fn collected_test(nodeid: &str) -> CollectedTest {
    CollectedTest {
        nodeid: nodeid.to_string(),
        file: "t.py".into(),
        line: 1,
        ..Default::default()
    }
}

// --- scripted agents and clients over real gRPC ----------------------------------------------

/// An agent speaking through a test's own stream.
struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<CoordinatorMessage>,
}

impl Agent {
    /// Joins with a hello and waits for the welcome.
    async fn join(channel: Channel, id: &str) -> Result<Agent, String> {
        let (tx, out) = mpsc::channel(1024);
        let hello = AgentMessage {
            kind: Some(agent_message::Kind::Hello(AgentHello {
                protocol_version: PROTOCOL_VERSION,
                agent_id: id.to_string(),
                hostname: id.to_string(),
                workers: 2,
                ..Default::default()
            })),
        };
        tx.send(hello).await.map_err(|_| "cannot send the hello")?;
        let rx = AgentsClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .join(ReceiverStream::new(out))
            .await
            .map_err(|status| format!("{id} could not join: {status}"))?
            .into_inner();
        let mut agent = Agent { tx, rx };
        match agent.next().await? {
            coordinator_message::Kind::Welcome(_) => Ok(agent),
            other => Err(format!("{id} expected a welcome, got {other:?}")),
        }
    }

    async fn next(&mut self) -> Result<coordinator_message::Kind, String> {
        match tokio::time::timeout(WAIT, self.rx.next()).await {
            Ok(Some(Ok(CoordinatorMessage { kind: Some(kind) }))) => Ok(kind),
            Ok(Some(Ok(_))) => Err("an empty message from the coordinator".into()),
            Ok(Some(Err(status))) => Err(format!("the agent stream failed: {status}")),
            Ok(None) => Err("the coordinator closed the agent stream".into()),
            Err(_) => Err("no message from the coordinator (hang guard)".into()),
        }
    }

    async fn send(&self, kind: agent_message::Kind) -> Result<(), String> {
        self.tx
            .send(AgentMessage { kind: Some(kind) })
            .await
            .map_err(|_| "the agent stream is closed".to_string())
    }

    async fn want(&self, run_id: &str, workers: &[u32]) -> Result<(), String> {
        let events = workers
            .iter()
            .map(|w| WorkerEvent {
                worker: *w,
                kind: Some(worker_event::Kind::WantWork(WantWork {})),
            })
            .collect();
        self.send(agent_message::Kind::Events(WorkerEvents {
            run_id: run_id.to_string(),
            events,
        }))
        .await
    }

    /// Hangs up and waits until the coordinator has handled the departure (it then closes
    /// its side): everything sent before was handled by then.
    async fn leave(self) -> Result<(), String> {
        let Agent { tx, mut rx } = self;
        drop(tx);
        tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = rx.next().await {} })
            .await
            .map_err(|_| "the coordinator never closed a departed agent's stream".to_string())
    }
}

async fn submit(channel: Channel) -> Result<Streaming<RunEvent>, String> {
    RunsClient::new(channel)
        .submit(SubmitRequest {
            protocol_version: PROTOCOL_VERSION,
            project: "fuzz".into(),
            pytest_args: vec!["-q".into()],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|status| format!("the submission was refused: {status}"))
}

fn collection(run_id: &str, with_list: bool) -> agent_message::Kind {
    agent_message::Kind::Collected(Collected {
        run_id: run_id.to_string(),
        digest: DIGEST.into(),
        total: TESTS.len() as u32,
        deselected: 0,
        tests: if with_list {
            TESTS.iter().map(|id| collected_test(id)).collect()
        } else {
            Vec::new()
        },
        done: true,
        workers: 2,
    })
}

/// A passing test's reports and its end, as a well-behaved worker sends them.
fn passing(lease: &Lease) -> Vec<WorkerEvent> {
    let report = |phase: i32, category: &str| {
        worker_event::Kind::Report(PhaseReport {
            lease: lease.lease,
            test_index: lease.test_index,
            phase,
            outcome: "passed".into(),
            category: category.into(),
            duration: 0.001,
            ..Default::default()
        })
    };
    [
        report(1, ""),
        report(2, "passed"),
        report(3, ""),
        worker_event::Kind::Finished(TestFinished {
            lease: lease.lease,
            test_index: lease.test_index,
        }),
    ]
    .into_iter()
    .map(|kind| WorkerEvent {
        worker: 0,
        kind: Some(kind),
    })
    .collect()
}

/// A well-behaved agent serves the run until it ends: it collects when asked, runs every test
/// it is handed (all pass) and asks for more. Returns how many results each test got.
async fn finish_run(
    agent: &mut Agent,
    events: &mut Streaming<RunEvent>,
) -> Result<BTreeMap<u32, u32>, String> {
    let mut results: BTreeMap<u32, u32> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::select! {
            message = agent.next() => match message? {
                coordinator_message::Kind::StartRun(start) => {
                    agent.send(collection(&start.run_id, start.want_collection)).await?;
                    agent.want(&start.run_id, &[0, 1]).await?;
                }
                coordinator_message::Kind::SendCollection(request) => {
                    agent.send(collection(&request.run_id, true)).await?;
                }
                coordinator_message::Kind::Work(work) => {
                    for assignment in work.assignments {
                        if assignment.leases.is_empty() {
                            continue;
                        }
                        let mut batch: Vec<WorkerEvent> =
                            assignment.leases.iter().flat_map(passing).collect();
                        for event in &mut batch {
                            event.worker = assignment.worker;
                        }
                        batch.push(WorkerEvent {
                            worker: assignment.worker,
                            kind: Some(worker_event::Kind::WantWork(WantWork {})),
                        });
                        agent
                            .send(agent_message::Kind::Events(WorkerEvents {
                                run_id: work.run_id.clone(),
                                events: batch,
                            }))
                            .await?;
                    }
                }
                _ => {}
            },
            event = events.next() => match event {
                Some(Ok(RunEvent { kind: Some(run_event::Kind::Result(result)) })) => {
                    *results.entry(result.test_index).or_default() += 1;
                }
                Some(Ok(RunEvent { kind: Some(run_event::Kind::Finished(_)) })) => {
                    return Ok(results);
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => return Err(format!("the run's stream failed: {status}")),
                None => return Err("the run's stream ended without a finish".into()),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("the run never finished (hang guard); results so far {results:?}"));
            }
        }
    }
}

fn assert_each_test_counted_once(results: &BTreeMap<u32, u32>) -> Result<(), String> {
    let expected: BTreeMap<u32, u32> = (0..TESTS.len() as u32).map(|i| (i, 1)).collect();
    if *results == expected {
        Ok(())
    } else {
        Err(format!(
            "every test should get exactly one result, got {results:?}"
        ))
    }
}

/// One fuzz case: agent A joins the run, is handed work, sends `templates`, and leaves; agent B
/// must then be able to finish the run, with one result per test.
async fn dispatcher_case(templates: &[Template]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let node = Node::start(&dir.path().join("fly.db"), Duration::from_secs(10))
        .map_err(|e| format!("{e:#}"))?;
    let channel = node
        .in_memory_channel()
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut a = Agent::join(channel.clone(), "agent-a").await?;
    let mut events = submit(channel.clone()).await?;
    let run_id = match a.next().await? {
        coordinator_message::Kind::StartRun(start) => start.run_id,
        other => return Err(format!("expected StartRun, got {other:?}")),
    };
    a.send(collection(&run_id, true)).await?;
    a.want(&run_id, &[0, 1]).await?;
    let handed: Vec<Lease> = match a.next().await? {
        coordinator_message::Kind::Work(work) => work
            .assignments
            .into_iter()
            .flat_map(|assignment| assignment.leases)
            .collect(),
        other => return Err(format!("expected work, got {other:?}")),
    };
    for template in templates {
        let message = materialize(template, &run_id, &handed);
        if a.tx.send(message).await.is_err() {
            break;
        }
    }
    a.leave().await?;

    let mut b = Agent::join(channel, "agent-b").await?;
    let results = finish_run(&mut b, &mut events).await?;
    // Results A's messages finished count too; none may count twice.
    assert_each_test_counted_once(&results)?;
    drop(b);
    node.shutdown().await.map_err(|e| format!("{e:#}"))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn whatever_an_agent_sends_another_agent_can_finish_the_run_and_each_test_counts_once(
        templates in vec(agent_message(), 1..16)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        runtime
            .block_on(dispatcher_case(&templates))
            .map_err(TestCaseError::fail)?;
    }
}

// --- bytes on the port ---------------------------------------------------------------------

/// A coordinator serving gRPC on a loopback port.
struct Served {
    _dir: tempfile::TempDir,
    node: Node,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(&dir.path().join("fly.db"), Duration::from_secs(10)).unwrap();
        let (listener, addr) = node::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = node
            .serve_tcp(listener, &Security::default(), async {
                let _ = stopped.await;
            })
            .unwrap();
        Served {
            _dir: dir,
            node,
            addr,
            stop: Some(stop),
            server,
        }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A normal run from start to end on `agent` (a fresh one when `None`): a client submits,
    /// the agent collects and runs every test.
    async fn assert_a_run_works(&self, agent: Option<Agent>) {
        let mut agent = match agent {
            Some(agent) => agent,
            None => Agent::join(self.channel().await, "well-behaved")
                .await
                .unwrap(),
        };
        let mut events = submit(self.channel().await).await.unwrap();
        let results = finish_run(&mut agent, &mut events).await.unwrap();
        assert_each_test_counted_once(&results).unwrap();
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(WAIT, &mut self.server).await;
        self.node.shutdown().await.unwrap();
    }
}

/// Writes `bytes` to a fresh connection and reads until the server closes it (or stops
/// reading); returns what came back. The server must neither hang nor crash.
async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may close before taking everything: a failed write is an answer too.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the coordinator kept a connection open after {} bytes of garbage (hang guard)",
        bytes.len()
    );
    answer
}

#[tokio::test]
async fn garbage_and_http1_bytes_on_the_grpc_port_are_refused_and_the_coordinator_carries_on() {
    let served = Served::start().await;
    // An agent already connected must not notice.
    let bystander = Agent::join(served.channel().await, "bystander")
        .await
        .unwrap();

    let mut noise = Vec::new();
    let mut state: u32 = 0x9e37_79b9;
    for _ in 0..64 * 1024 {
        // A small LCG: reproducible noise without a dependency.
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        noise.push((state >> 24) as u8);
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise),
        (
            "an HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nHost: coordinator\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            "an HTTP/1.1 POST to the agent service",
            b"POST /fly.v1.Agents/Join HTTP/1.1\r\nHost: c\r\nContent-Type: application/grpc\r\n\
              Content-Length: 5\r\n\r\n\x00\x00\x00\x00\x00"
                .to_vec(),
        ),
        (
            "the HTTP/2 preface and then garbage",
            [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0xff; 64][..]].concat(),
        ),
        ("nothing at all", Vec::new()),
    ];
    for (what, bytes) in &cases {
        let answer = send_raw(served.addr, bytes).await;
        // Whatever the answer (nothing, a GOAWAY, an HTTP/1 error), it is no success.
        let text = String::from_utf8_lossy(&answer);
        assert!(
            !text.contains("200 OK"),
            "{what} was answered with success: {text:?}"
        );
    }

    // The agent that was connected all along serves a whole run, and so does a new one.
    served.assert_a_run_works(Some(bystander)).await;
    served.assert_a_run_works(None).await;
    served.stop().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_ends_only_its_agents_stream_and_the_run_says_why() {
    let served = Served::start().await;
    let mut oversized = Agent::join(served.channel().await, "oversized")
        .await
        .unwrap();
    let mut events = submit(served.channel().await).await.unwrap();
    let run_id = match oversized.next().await.unwrap() {
        coordinator_message::Kind::StartRun(start) => start.run_id,
        other => panic!("expected StartRun, got {other:?}"),
    };
    let huge = AgentMessage {
        kind: Some(agent_message::Kind::Notice(AgentNotice {
            run_id: run_id.clone(),
            message: "x".repeat(MAX_MESSAGE_BYTES + 1),
        })),
    };
    let _ = oversized.tx.send(huge).await;
    // The run's client is told which agent left and why.
    let notice = tokio::time::timeout(WAIT, async {
        while let Some(Ok(event)) = events.next().await {
            if let Some(run_event::Kind::Notice(notice)) = event.kind {
                if notice.message.contains("oversized") {
                    return Some(notice.message);
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("a notice that the agent with the oversized message left");
    assert!(
        notice.contains("too large"),
        "the notice should say the message was too large: {notice}"
    );
    // Its own stream is over: it must reconnect.
    let end = tokio::time::timeout(WAIT, oversized.rx.next()).await;
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "the oversized agent's stream should end, got {end:?}"
    );

    // The run goes on with another agent, and the coordinator serves new runs.
    let mut agent = Agent::join(served.channel().await, "well-behaved")
        .await
        .unwrap();
    let results = finish_run(&mut agent, &mut events).await.unwrap();
    assert_each_test_counted_once(&results).unwrap();
    drop(agent);
    served.assert_a_run_works(None).await;
    served.stop().await;
}
