//! The clients following a run (its submitter, and `follow` calls), and how a run's events
//! reach them without a slow one making the coordinator hold the run's results in memory.
//!
//! A follower's events go down a channel to its gRPC stream, which counts the bytes waiting in
//! it ([`FollowerTx::queued_bytes`]). While under [`QUEUE_LIMIT`] bytes wait, every event is
//! sent as it happens. A follower that stops reading (a suspended terminal, a slow link) fills
//! its channel to the limit and falls *behind*: the dispatcher then holds its events until the
//! next tick. At the tick, a follower that has drained its channel to half the limit gets them
//! and is live again (a hiccup costs nothing more). One still full has them handed to its
//! catch-up task, results as test indexes only (4 bytes each): the task reads those results
//! back from the store once they are committed and sends them as the channel drains, never
//! letting more than the limit (and one page) wait. The run's end reaches a follower behind
//! the same way, after its results.
//!
//! So every follower gets every result exactly once, and the end last; the coordinator holds
//! about [`QUEUE_LIMIT`] bytes per follower, one tick of events, and 4 bytes per result a
//! stalled follower has yet to get. Results the store cannot give back as they were streamed
//! (a resumed run's carried results, a test lost with its workers whose error the dispatcher
//! makes up) are kept whole even for a stalled follower: they are few, or were held in memory
//! anyway.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fly_common::proto::{run_event, RunEvent};
use prost::Message as _;
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{debug, warn};

use crate::store::Store;

/// Bytes of events that may wait for one follower before it falls behind.
pub const QUEUE_LIMIT: usize = 1 << 20;

/// Results a catch-up task reads from the store at once.
const PAGE: usize = 256;

/// Reads of a page a catch-up task tries before it gives the follower up (the database may be
/// locked by another process for a while).
const READ_ATTEMPTS: u32 = 5;

/// Makes the two ends of a follower's channel: the dispatcher sends on the first, the gRPC
/// stream reads the second.
pub fn channel() -> (FollowerTx, FollowerStream) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue::default());
    (
        FollowerTx {
            tx,
            queue: queue.clone(),
        },
        FollowerStream { rx, queue },
    )
}

type Item = (usize, Result<RunEvent, Status>);

#[derive(Default)]
struct Queue {
    bytes: AtomicUsize,
    drained: Notify,
}

/// Where a follower's events go.
#[derive(Clone)]
pub struct FollowerTx {
    tx: mpsc::UnboundedSender<Item>,
    queue: Arc<Queue>,
}

impl FollowerTx {
    /// Sends one event, however full the channel is (callers that must bound it look at
    /// [`FollowerTx::queued_bytes`] first). False when the follower is gone.
    pub fn send(&self, event: Result<RunEvent, Status>) -> bool {
        let size = event.as_ref().map(|e| e.encoded_len()).unwrap_or(0);
        self.send_sized(size, event)
    }

    /// [`FollowerTx::send`] of an event whose encoded size the caller has at hand.
    fn send_sized(&self, size: usize, event: Result<RunEvent, Status>) -> bool {
        self.queue.bytes.fetch_add(size, Ordering::Relaxed);
        if self.tx.send((size, event)).is_err() {
            self.queue.bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Bytes of events sent and not yet taken by the follower's stream.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the follower is gone (its stream dropped).
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Waits until fewer than [`QUEUE_LIMIT`] bytes wait. False when the follower is gone.
    async fn room(&self) -> bool {
        loop {
            let drained = self.queue.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.tx.is_closed() {
                return false;
            }
            if self.queued_bytes() < QUEUE_LIMIT {
                return true;
            }
            tokio::select! {
                _ = drained => {}
                _ = self.tx.closed() => return false,
            }
        }
    }
}

/// A follower's events, as its gRPC stream takes them.
pub struct FollowerStream {
    rx: mpsc::UnboundedReceiver<Item>,
    queue: Arc<Queue>,
}

impl FollowerStream {
    /// The next event if one is waiting.
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<Result<RunEvent, Status>> {
        let (size, event) = self.rx.try_recv().ok()?;
        self.queue.bytes.fetch_sub(size, Ordering::Relaxed);
        self.queue.drained.notify_waiters();
        Some(event)
    }
}

impl tokio_stream::Stream for FollowerStream {
    type Item = Result<RunEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some((size, event))) => {
                self.queue.bytes.fetch_sub(size, Ordering::Relaxed);
                self.queue.drained.notify_waiters();
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What a catch-up task is asked to send, in order.
enum CatchUp {
    /// Results to read from the store (committed, or queued for writing before this was sent).
    Results(Vec<u32>),
    Event(RunEvent),
}

/// An event held for a follower behind until the next tick.
enum Held {
    /// A result the store holds: its test index is all that is kept once handed over.
    Stored(u32, RunEvent),
    Event(RunEvent),
}

/// A follower's catch-up task.
struct Task {
    commands: mpsc::UnboundedSender<CatchUp>,
    /// Commands sent and not yet carried out.
    pending: Arc<AtomicUsize>,
}

/// What the dispatcher keeps for a follower behind.
#[derive(Default)]
struct Behind {
    /// The events since the last tick, in order, but for statuses.
    window: Vec<Held>,
    /// The newest status of the window (older ones are stale by then).
    status: Option<RunEvent>,
    /// The catch-up task, once anything was handed over.
    task: Option<Task>,
}

struct Follower {
    tx: FollowerTx,
    behind: Option<Behind>,
}

/// A run's followers.
#[derive(Default)]
pub(super) struct Followers {
    list: Vec<Follower>,
}

impl Followers {
    pub(super) fn new(tx: FollowerTx) -> Followers {
        let mut followers = Followers::default();
        followers.push(tx);
        followers
    }

    pub(super) fn push(&mut self, tx: FollowerTx) {
        self.list.push(Follower { tx, behind: None });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Followers that fell behind and have not caught up yet.
    pub(super) fn behind(&self) -> usize {
        self.list.iter().filter(|f| f.behind.is_some()).count()
    }

    /// Sends an event to every follower; to one behind, it goes with its results.
    pub(super) fn send(&mut self, event: RunEvent) {
        self.deliver(event, None);
    }

    /// Sends a test's final result, which the store holds (its write queued before this call),
    /// so a follower behind gets it read back from there.
    pub(super) fn send_stored_result(&mut self, test_index: u32, event: RunEvent) {
        self.deliver(event, Some(test_index));
    }

    fn deliver(&mut self, event: RunEvent, stored: Option<u32>) {
        let size = event.encoded_len();
        self.list.retain_mut(|follower| {
            if follower.behind.is_none() {
                if follower.tx.queued_bytes() + size <= QUEUE_LIMIT {
                    return follower.tx.send_sized(size, Ok(event.clone()));
                }
                if follower.tx.is_closed() {
                    return false;
                }
                debug!(
                    queued_bytes = follower.tx.queued_bytes(),
                    "a follower fell behind its run"
                );
                follower.behind = Some(Behind::default());
            }
            let Some(behind) = follower.behind.as_mut() else {
                return true;
            };
            match (stored, &event.kind) {
                (Some(index), _) => behind.window.push(Held::Stored(index, event.clone())),
                (None, Some(run_event::Kind::Status(_))) => behind.status = Some(event.clone()),
                (None, _) => behind.window.push(Held::Event(event.clone())),
            }
            true
        });
    }

    /// Every tick: a follower behind that has drained its channel and has nothing left with
    /// its catch-up task gets the tick's events and is live again; the others' events are
    /// handed to their catch-up task (results as test indexes only).
    pub(super) fn catch_up(&mut self, store: &Store, run_id: &str) {
        self.list.retain_mut(|follower| {
            let Some(behind) = follower.behind.as_mut() else {
                return true;
            };
            if behind.caught_up(&follower.tx) {
                let alive = behind.send_window(&follower.tx);
                follower.behind = None;
                return alive;
            }
            behind.hand_over(&follower.tx, store, run_id)
        });
    }

    /// The run has ended with `finished`: a follower that kept up gets it once every write of
    /// the run is committed (the results it names are then on disk); one behind gets it after
    /// the results it still has to get. The future resolves once those that kept up are told.
    pub(super) fn finish(
        mut self,
        store: &Store,
        run_id: &str,
        finished: RunEvent,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut live = Vec::new();
        for mut follower in self.list.drain(..) {
            match follower.behind.as_mut() {
                Some(behind) if behind.caught_up(&follower.tx) => {
                    if behind.send_window(&follower.tx) {
                        live.push(follower.tx);
                    }
                }
                Some(behind) => {
                    behind.window.push(Held::Event(finished.clone()));
                    behind.hand_over(&follower.tx, store, run_id);
                }
                None => live.push(follower.tx),
            }
        }
        let store = store.clone();
        async move {
            if let Err(err) = store.flush().await {
                warn!(%err, "store flush before reporting a finished run failed");
            }
            for tx in live {
                tx.send(Ok(finished.clone()));
            }
        }
    }
}

impl Behind {
    /// Whether the follower has taken what it was sent (its channel is at most half full)
    /// and its catch-up task has nothing left, so the window can go to it as it is.
    fn caught_up(&self, tx: &FollowerTx) -> bool {
        self.task
            .as_ref()
            .is_none_or(|task| task.pending.load(Ordering::Acquire) == 0)
            && tx.queued_bytes() <= QUEUE_LIMIT / 2
    }

    /// Sends the window straight to the follower. False when the follower is gone.
    fn send_window(&mut self, tx: &FollowerTx) -> bool {
        let mut alive = true;
        for held in self.window.drain(..) {
            let (Held::Stored(_, event) | Held::Event(event)) = held;
            alive &= tx.send(Ok(event));
        }
        if let Some(status) = self.status.take() {
            alive &= tx.send(Ok(status));
        }
        alive
    }

    /// Hands the window to the catch-up task, results as test indexes only. False when the
    /// follower is gone.
    fn hand_over(&mut self, tx: &FollowerTx, store: &Store, run_id: &str) -> bool {
        if self.window.is_empty() && self.status.is_none() {
            return !tx.is_closed();
        }
        let task = self.task.get_or_insert_with(|| {
            let (commands, receiver) = mpsc::unbounded_channel();
            let pending = Arc::new(AtomicUsize::new(0));
            tokio::spawn(catch_up(
                store.clone(),
                run_id.to_string(),
                tx.clone(),
                receiver,
                pending.clone(),
            ));
            Task { commands, pending }
        });
        let mut commands = Vec::new();
        let mut indexes = Vec::new();
        for held in self.window.drain(..) {
            match held {
                Held::Stored(index, _) => indexes.push(index),
                Held::Event(event) => {
                    if !indexes.is_empty() {
                        commands.push(CatchUp::Results(std::mem::take(&mut indexes)));
                    }
                    commands.push(CatchUp::Event(event));
                }
            }
        }
        if !indexes.is_empty() {
            commands.push(CatchUp::Results(indexes));
        }
        if let Some(status) = self.status.take() {
            commands.push(CatchUp::Event(status));
        }
        let mut alive = true;
        for command in commands {
            task.pending.fetch_add(1, Ordering::AcqRel);
            alive &= task.commands.send(command).is_ok();
        }
        alive
    }
}

/// Sends a follower behind what the dispatcher hands over, reading results from the store,
/// as fast as the follower takes them. Ends when the follower is gone or the dispatcher has
/// nothing more to hand over (the run ended).
async fn catch_up(
    store: Store,
    run_id: String,
    tx: FollowerTx,
    mut commands: mpsc::UnboundedReceiver<CatchUp>,
    pending: Arc<AtomicUsize>,
) {
    while let Some(command) = commands.recv().await {
        if !carry_out(command, &store, &run_id, &tx).await {
            return;
        }
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends what one command names. False when the follower is gone or cannot be served.
async fn carry_out(command: CatchUp, store: &Store, run_id: &str, tx: &FollowerTx) -> bool {
    let indexes = match command {
        CatchUp::Event(event) => return tx.room().await && tx.send(Ok(event)),
        CatchUp::Results(indexes) => indexes,
    };
    if let Err(err) = store.flush().await {
        give_up(tx, run_id, &err.to_string());
        return false;
    }
    for page in indexes.chunks(PAGE) {
        if !tx.room().await {
            return false;
        }
        let results = match read_page(store, run_id, page).await {
            Ok(results) => results,
            Err(err) => {
                give_up(tx, run_id, &err);
                return false;
            }
        };
        if results.len() < page.len() {
            warn!(
                run = %run_id,
                missing = page.len() - results.len(),
                "results a follower missed are not in the database"
            );
        }
        for result in results {
            let event = RunEvent {
                kind: Some(run_event::Kind::Result(result)),
            };
            if !tx.send(Ok(event)) {
                return false;
            }
        }
    }
    true
}

/// One page of results, retried while the database is locked or busy.
async fn read_page(
    store: &Store,
    run_id: &str,
    page: &[u32],
) -> Result<Vec<fly_common::proto::TestResult>, String> {
    let mut wait = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match store.read_results(run_id, page.to_vec()).await {
            Ok(results) => return Ok(results),
            Err(err) if attempt < READ_ATTEMPTS => {
                warn!(run = %run_id, %err, attempt, "reading results for a follower failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 4;
                attempt += 1;
            }
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// Ends a follower's stream with the reason it cannot get the rest of the run.
fn give_up(tx: &FollowerTx, run_id: &str, err: &str) {
    warn!(run = %run_id, %err, "a follower behind its run cannot be sent the results it missed");
    tx.send(Err(Status::internal(format!(
        "this client fell behind run {run_id} and the coordinator cannot read the results it \
         missed back from its database: {err}. The run goes on; `fly-coordinator report` \
         shows it once it ends"
    ))));
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fly_common::outcome::Phase;
    use fly_common::proto::{
        CollectedTest, PhaseReport, PhaseResult, RunFinished, Section, TestResult,
    };
    use tokio_stream::StreamExt;

    use super::*;
    use crate::collection::Collection;
    use crate::store::Write;

    const RUN: &str = "run-1";
    const TESTS: u32 = 3_000;

    /// Test `index`'s result as the dispatcher streams it: a failure with a traceback and
    /// captured output, about 1.3 KB.
    fn live_result(index: u32) -> TestResult {
        TestResult {
            test_index: index,
            nodeid: format!("t.py::test_{index}"),
            outcome: "failed".into(),
            duration: 0.25,
            agent_id: "agent".into(),
            worker: index % 4,
            phases: vec![PhaseResult {
                phase: Phase::Call.to_proto() as i32,
                outcome: "failed".into(),
                category: "failed".into(),
                duration: 0.25,
                longrepr: format!("assert {index} == 0\n{}", "E   ".repeat(200)),
                sections: vec![Section {
                    name: "Captured stdout call".into(),
                    text: format!("{}\n", "out ".repeat(100)),
                }],
                message: String::new(),
                start: 1000.0 + f64::from(index),
                stop: 1000.25 + f64::from(index),
            }],
            attempts: 1,
            flaky: false,
        }
    }

    /// The writes the dispatcher queues for that result before it streams it.
    fn writes_of(result: &TestResult) -> Vec<Write> {
        let phase = &result.phases[0];
        vec![
            Write::Report {
                run_id: RUN.into(),
                nodeid: result.nodeid.clone(),
                agent_id: result.agent_id.clone(),
                worker: result.worker,
                superseded: false,
                report: PhaseReport {
                    lease: u64::from(result.test_index) + 1,
                    test_index: result.test_index,
                    phase: phase.phase,
                    outcome: phase.outcome.clone(),
                    category: phase.category.clone(),
                    duration: phase.duration,
                    start: phase.start,
                    stop: phase.stop,
                    longrepr: phase.longrepr.clone(),
                    sections: phase.sections.clone(),
                    message: String::new(),
                },
            },
            Write::TestResult {
                run_id: RUN.into(),
                test_index: result.test_index,
                nodeid: result.nodeid.clone(),
                outcome: result.outcome.clone(),
                duration: result.duration,
                attempts: 1,
                lease: u64::from(result.test_index) + 1,
                agent_id: result.agent_id.clone(),
                worker: result.worker,
            },
        ]
    }

    fn result_event(result: TestResult) -> RunEvent {
        RunEvent {
            kind: Some(run_event::Kind::Result(result)),
        }
    }

    /// Records a result a follower got; each must come once.
    fn record(results: &mut HashMap<u32, TestResult>, result: TestResult) {
        let index = result.test_index;
        assert!(
            results.insert(index, result).is_none(),
            "test {index} was sent twice"
        );
    }

    /// Reads a follower's stream to its end, adding to `results`. True when the run's end
    /// came last.
    async fn read_to_end(
        stream: &mut FollowerStream,
        results: &mut HashMap<u32, TestResult>,
    ) -> bool {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(20), stream.next())
                .await
                .expect("the follower's stream stalled")
                .expect("the stream ended before the run's end")
                .expect("an error on the stream");
            match event.kind {
                Some(run_event::Kind::Result(result)) => record(results, result),
                Some(run_event::Kind::Finished(_)) => return stream.try_recv().is_none(),
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn a_follower_that_reads_again_by_the_next_tick_is_live_again_and_misses_nothing() {
        // No result is in the store: one read back from there would be missing.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("fly.sqlite")).expect("open");
        let (tx, mut stream) = channel();
        let mut followers = Followers::new(tx);
        let mut sent = Vec::new();
        let mut send = |followers: &mut Followers, index: u32| {
            followers.send_stored_result(index, result_event(live_result(index)));
            sent.push(index);
        };
        let mut index = 0;
        while followers.behind() == 0 {
            send(&mut followers, index);
            index += 1;
        }
        // A hiccup: a few more results while it is behind, then it reads everything.
        for _ in 0..100 {
            send(&mut followers, index);
            index += 1;
        }
        let mut got = Vec::new();
        while let Some(Ok(RunEvent {
            kind: Some(run_event::Kind::Result(result)),
        })) = stream.try_recv()
        {
            got.push(result.test_index);
        }
        followers.catch_up(&store, RUN);
        assert_eq!(followers.behind(), 0, "the follower is live again");
        for _ in 0..100 {
            send(&mut followers, index);
            index += 1;
        }
        let finished = RunEvent {
            kind: Some(run_event::Kind::Finished(RunFinished::default())),
        };
        followers.finish(&store, RUN, finished).await;
        let mut rest = HashMap::new();
        assert!(read_to_end(&mut stream, &mut rest).await);
        let mut rest: Vec<u32> = rest.into_keys().collect();
        rest.sort_unstable();
        got.extend(rest);
        assert_eq!(got, sent, "every result once, in order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_that_stops_reading_gets_every_result_once_from_the_store_with_little_held()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("fly.sqlite")).expect("open");
        store.write(Write::RunCreated {
            run_id: RUN.into(),
            project: "p".into(),
            pytest_args: Vec::new(),
            client_cwd: String::new(),
            created_at: 1.0,
        });
        let tests: Vec<CollectedTest> = (0..TESTS)
            .map(|i| CollectedTest {
                nodeid: format!("t.py::test_{i}"),
                file: "t.py".into(),
                ..Default::default()
            })
            .collect();
        store.write(Write::RunCollected {
            run_id: RUN.into(),
            tests: Arc::new(Collection::from(tests.as_slice())),
            deselected: 0,
        });

        let (slow_tx, mut slow) = channel();
        let (quick_tx, mut quick) = channel();
        let mut followers = Followers::new(slow_tx.clone());
        followers.push(quick_tx);
        let quick_reader = tokio::spawn(async move {
            let mut results = HashMap::new();
            let end_last = read_to_end(&mut quick, &mut results).await;
            (results, end_last)
        });
        let mut slow_results = HashMap::new();

        let mut most_held = 0;
        let mut fell_behind = false;
        // Results finish in an order of their own, not the collection's.
        for step in 0..TESTS {
            let index = (step * 7) % TESTS;
            let result = live_result(index);
            for write in writes_of(&result) {
                store.write(write);
            }
            followers.send_stored_result(index, result_event(result));
            fell_behind |= followers.behind() == 1;
            most_held = most_held.max(slow_tx.queued_bytes());
            if step % 100 == 99 {
                // A tick. Then the slow follower takes a few events, as a terminal that
                // is suspended now and then would.
                followers.catch_up(&store, RUN);
                for _ in 0..20 {
                    if let Some(Ok(RunEvent {
                        kind: Some(run_event::Kind::Result(result)),
                    })) = slow.try_recv()
                    {
                        record(&mut slow_results, result);
                    }
                }
                tokio::task::yield_now().await;
            }
        }
        assert!(
            fell_behind,
            "the follower that stopped reading never fell behind"
        );
        let finished = RunEvent {
            kind: Some(run_event::Kind::Finished(RunFinished {
                exit_code: 1,
                ..Default::default()
            })),
        };
        let told = followers.finish(&store, RUN, finished);
        told.await;

        let (quick_results, quick_end_last) = quick_reader.await.expect("reader");
        assert_eq!(quick_results.len(), TESTS as usize);
        assert!(quick_end_last);

        // The slow follower, reading again, gets every result exactly once, as it was streamed.
        let sampler = {
            let tx = slow_tx.clone();
            tokio::spawn(async move {
                let mut most = 0;
                while !tx.is_closed() {
                    most = most.max(tx.queued_bytes());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                most
            })
        };
        drop(slow_tx);
        let slow_end_last = read_to_end(&mut slow, &mut slow_results).await;
        assert!(
            slow_end_last,
            "the run's end came before some of its results"
        );
        drop(slow);
        most_held = most_held.max(sampler.await.expect("sampler"));
        assert_eq!(slow_results.len(), TESTS as usize);
        for (index, result) in &slow_results {
            assert_eq!(
                result,
                &live_result(*index),
                "test {index} read back differs"
            );
        }
        let page_bytes = PAGE * result_event(live_result(TESTS - 1)).encoded_len();
        assert!(
            most_held <= QUEUE_LIMIT + page_bytes,
            "{most_held} bytes waited for the slow follower"
        );
    }
}
