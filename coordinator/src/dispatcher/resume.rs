//! `run --resume RUN_ID`: carrying on with an unfinished run. The dispatcher reads the recorded
//! run (off the loop), refuses what cannot be resumed, and creates a run with the old run's
//! pytest arguments whose tests with a recorded result are counted, streamed to the client and
//! skipped, so only the rest run and the client sees the combined run.
//!
//! Tests are matched by node id, not by index: the new collection is whatever pytest collects
//! now. A test collected now without a recorded result runs (including one added since); a
//! recorded result of a test no longer collected is left out of the combined run, with a
//! notice.

use std::collections::HashMap;

use fly_common::exit_code;
use fly_common::outcome::Counts;
use fly_common::proto::{
    run_event, AgentNotice, CategoryCount, RunEvent, RunFinished, RunStatus, SubmitRequest,
    TestResult,
};
use tokio::sync::oneshot;
use tonic::Status;
use tracing::info;

use super::{Action, AgentConn, AgentSlot, Dispatcher, FollowerTx, Input, RunPhase, RunState};
use crate::collection::Collection;
use crate::scheduler::Scheduler;
use crate::store::{count_result, LookupError, RecordedRun, Write, STATUS_CREATED, STATUS_RUNNING};

/// What a resumed run carries on with.
pub(super) struct Resume {
    /// The run it resumes.
    pub(super) from: String,
    /// Recorded results by node id, until the run's collection is in.
    pub(super) results: HashMap<String, TestResult>,
}

impl Dispatcher {
    /// Reads the run a `--resume` submission names, off the loop; the answer comes back as
    /// [`Input::ResumeLoaded`].
    pub(super) fn load_resumed(
        &self,
        request: SubmitRequest,
        tx: FollowerTx,
        reply: oneshot::Sender<Result<String, Status>>,
    ) {
        let load = self.store.load_run(&request.resume_of);
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let recorded = load.await;
            // If the dispatcher has stopped, dropping `reply` tells the client so.
            inputs.send(Input::ResumeLoaded {
                request,
                tx,
                reply,
                recorded,
            });
        });
    }

    /// Refuses a run that cannot be resumed, answers a complete one with its recorded verdict,
    /// or creates the run that carries on with it.
    pub(super) fn resume_loaded(
        &mut self,
        mut request: SubmitRequest,
        tx: FollowerTx,
        reply: oneshot::Sender<Result<String, Status>>,
        recorded: Result<RecordedRun, LookupError>,
        now: std::time::Instant,
    ) {
        let given = request.resume_of.clone();
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(LookupError::NotFound(_)) => {
                let _ = reply.send(Err(Status::not_found(format!(
                    "cannot resume run {given}: there is no such run in {}",
                    self.store.path().display()
                ))));
                return;
            }
            Err(err @ LookupError::Ambiguous { .. }) => {
                let _ = reply.send(Err(Status::failed_precondition(format!(
                    "cannot resume run {given}: {err}"
                ))));
                return;
            }
            Err(LookupError::Store(err)) => {
                let _ = reply.send(Err(Status::internal(format!(
                    "cannot resume run {given}: {err}"
                ))));
                return;
            }
        };
        if let Err(reason) = self.resumable(&recorded) {
            let _ = reply.send(Err(Status::failed_precondition(format!(
                "cannot resume run {}: {reason}",
                recorded.id
            ))));
            return;
        }
        let complete = !recorded.collection.is_empty()
            && recorded
                .collection
                .iter()
                .all(|nodeid| recorded.results.contains_key(nodeid));
        if complete {
            answer_complete(recorded, &tx);
            // No run was created: there is nothing to follow or cancel.
            let _ = reply.send(Ok(String::new()));
            return;
        }
        info!(
            from = %recorded.id,
            recorded = recorded.results.len(),
            "resuming a run"
        );
        request.project = recorded.project;
        request.pytest_args = recorded.pytest_args;
        let run_id = self.submit(request, tx, reply, now);
        self.store.write(Write::RunResumed {
            run_id: run_id.clone(),
            resumed_from: recorded.id.clone(),
        });
        if let Some(run) = self.runs.get_mut(&run_id) {
            run.resume = Some(Resume {
                from: recorded.id,
                results: recorded.results,
            });
        }
    }

    /// Why a recorded run cannot be carried on with, if it cannot.
    fn resumable(&self, recorded: &RecordedRun) -> Result<(), String> {
        // A resume submitted a moment ago has no row the store could have read yet.
        let later = self.runs.values().find(|run| {
            run.resume
                .as_ref()
                .is_some_and(|resume| resume.from == recorded.id)
        });
        if let Some(later) = later.map(|run| &run.id).or(recorded.resumed_by.as_ref()) {
            return Err(format!(
                "run {later} already carries on with it; resume that one instead \
                 (`--resume {later}`)"
            ));
        }
        let in_progress = match self.runs.get(&recorded.id) {
            Some(run) => run.phase != RunPhase::Finished,
            // When a store opens alone, runs whose coordinator died are marked interrupted: one
            // still in progress belongs to another coordinator using the same database.
            None => recorded.status == STATUS_CREATED || recorded.status == STATUS_RUNNING,
        };
        if in_progress {
            return Err(
                "it is still in progress (here, or on another coordinator that has this \
                 database open); wait for it to end, or cancel it (Ctrl-C in its `run`) and \
                 resume it then"
                    .into(),
            );
        }
        Ok(())
    }

    /// A resumed run whose every collected test had a recorded result ends at once.
    pub(super) fn finish_if_all_recorded(&mut self, run_id: &str) {
        let done = self.runs.get(run_id).is_some_and(|run| {
            run.resume.is_some()
                && run.phase == RunPhase::Running
                && run.scheduler.as_ref().is_some_and(Scheduler::is_done)
        });
        if done {
            self.apply(run_id, vec![Action::RunDone]);
        }
    }
}

/// Takes the recorded results of a resumed run's tests into the run, once its collection and
/// scheduler exist: they count, they go to the client as results, and the scheduler skips
/// them. Tells the client how much is left.
pub(super) fn skip_recorded(
    run: &mut RunState,
    agents: &HashMap<AgentSlot, AgentConn>,
    tests: &Collection,
    scheduler: &mut Scheduler,
) {
    let Some(resume) = run.resume.as_mut() else {
        return;
    };
    let mut recorded = std::mem::take(&mut resume.results);
    let from = resume.from.clone();
    let mut replay = Vec::new();
    let mut skipped = Vec::new();
    for (index, nodeid) in tests.nodeids().enumerate() {
        if let Some(mut result) = recorded.remove(nodeid) {
            result.test_index = index as u32;
            count_result(&mut run.counts, &result);
            skipped.push(index as u32);
            replay.push(result);
        }
    }
    scheduler.skip(&skipped);
    let to_run = tests.len() - skipped.len();
    info!(run = %run.id, %from, to_run, recorded = skipped.len(), "resuming");
    let mut status = run.status(
        agents,
        format!(
            "resuming run {from}: {to_run} of {} tests still to run",
            tests.len()
        ),
    );
    status.finished = skipped.len() as u32;
    run.broadcast(run_event::Kind::Status(status));
    if !recorded.is_empty() {
        let message = format!(
            "{} tests of run {from} are not collected any more; their results are left out",
            recorded.len()
        );
        run.broadcast(run_event::Kind::Notice(AgentNotice {
            run_id: run.id.clone(),
            message,
        }));
    }
    for result in replay {
        run.broadcast(run_event::Kind::Result(result));
    }
}

/// Answers a `--resume` of a run every test of which has a recorded result: its results and
/// its verdict, with nothing run.
fn answer_complete(recorded: RecordedRun, tx: &FollowerTx) {
    let mut counts = Counts::default();
    let mut results = Vec::new();
    for (index, nodeid) in recorded.collection.iter().enumerate() {
        if let Some(result) = recorded.results.get(nodeid) {
            count_result(&mut counts, result);
            let mut result = result.clone();
            result.test_index = index as u32;
            results.push(result);
        }
    }
    counts.add("deselected", recorded.deselected);
    // `failed` also covers a flaky test under --flaky-fails, which the counts cannot show.
    let code = if counts.any_failed() || recorded.status == "failed" {
        exit_code::TESTS_FAILED
    } else {
        exit_code::OK
    };
    let collected = recorded.collection.len() as u32;
    let send = |kind| {
        let _ = tx.send(Ok(RunEvent { kind: Some(kind) }));
    };
    send(run_event::Kind::Status(RunStatus {
        run_id: recorded.id.clone(),
        message: format!(
            "resuming run {}: 0 of {collected} tests still to run",
            recorded.id
        ),
        collected,
        finished: collected,
        ..Default::default()
    }));
    for result in results {
        send(run_event::Kind::Result(result));
    }
    send(run_event::Kind::Finished(RunFinished {
        exit_code: code,
        counts: counts
            .ordered()
            .into_iter()
            .map(|(category, count)| CategoryCount { category, count })
            .collect(),
        wall_seconds: recorded.wall_seconds,
        output: String::new(),
        message: format!(
            "nothing to resume: every test of run {} has a result ({})",
            recorded.id, recorded.status
        ),
        collected,
    }));
}

/// The message of a cancelled run: why, and what is left for `run --resume`.
pub(super) fn interrupted_message(run: &RunState, reason: &str) -> String {
    let total = run.collection.as_ref().map_or(0, |c| c.len());
    let finished = run.scheduler.as_ref().map_or(0, Scheduler::finished_count);
    if total == 0 || finished >= total {
        return format!("interrupted: {reason}");
    }
    format!(
        "interrupted: {reason}; {} of {total} tests have no result (`run --resume {}` runs them)",
        total - finished,
        run.id
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::scheduler::{Action, Event, Scheduler, WorkerKey};

    /// Every lease handed out by `actions`, as (lease, test).
    fn assigned(actions: &[Action]) -> Vec<(u64, u32)> {
        actions
            .iter()
            .flat_map(|action| match action {
                Action::Assign { leases, .. } => leases.iter().map(|l| (l.lease, l.test)).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn skipped_tests_are_never_handed_out_and_count_as_finished() {
        let now = Instant::now();
        let mut scheduler = Scheduler::uniform(5);
        scheduler.skip(&[1, 3, 3, 9]);
        assert_eq!(scheduler.finished_count(), 2);
        assert!(!scheduler.is_done());
        scheduler.add_agent(1, 1, 1.0);
        let worker = WorkerKey {
            agent: 1,
            worker: 0,
        };
        let mut handed = Vec::new();
        let mut actions = scheduler.handle(Event::WantWork(worker), now);
        for _ in 0..10 {
            let leases = assigned(&actions);
            if leases.is_empty() {
                break;
            }
            handed.extend(leases.iter().map(|(_, test)| *test));
            actions.clear();
            for (lease, _) in leases {
                actions.extend(scheduler.handle(Event::Started { lease }, now));
                actions.extend(scheduler.handle(
                    Event::Finished {
                        lease,
                        seconds: 0.1,
                    },
                    now,
                ));
            }
            actions.extend(scheduler.handle(Event::WantWork(worker), now));
        }
        handed.sort_unstable();
        assert_eq!(handed, vec![0, 2, 4]);
        assert!(scheduler.is_done());
        assert!(actions.contains(&Action::RunDone), "{actions:?}");
    }

    #[test]
    fn skipping_every_test_leaves_a_finished_queue() {
        let mut scheduler = Scheduler::uniform(2);
        scheduler.skip(&[0, 1]);
        assert!(scheduler.is_done());
        assert_eq!(scheduler.finished_count(), 2);
    }
}
