//! Retention: deleting what old runs recorded (their phase reports, results, collection and
//! agents) so the database stays bounded over months of runs, while each run's summary row and
//! the duration history stay.
//!
//! A prune is a [`Job`] the writer thread advances one [`Job::step`] at a time, between the
//! batches of ordinary writes: each step is one short transaction deleting at most a chunk of
//! rows (5,000 by default), so reports keep landing while a prune of a year's worth of runs goes
//! on. Doing it on the writer thread rather than on a connection of its own keeps the store's
//! invariant that one thread writes the file: a second writer would contend for SQLite's single
//! write lock, and every contention would cost the ordinary batches a busy-timeout wait.
//!
//! What is pruned, oldest finished first:
//! - with a maximum age, every run that finished before `now - max_age`;
//! - with a size cap, further runs while the data in the file (pages in use, see [`used_bytes`])
//!   is above the cap.
//!
//! What is never pruned: a run in progress (not finished), a run that finished within the last
//! [`RECENT_GRACE`] (its history may not be recorded yet: the dispatcher queues that only once
//! the client has its verdict), a run that a kept run resumed (`run --resume` reads the results
//! of the whole chain), and the tables `runs` (a pruned run keeps its row, with `pruned_at` set),
//! `agents`, `durations` and `scope_costs`.
//!
//! Space: deleted rows leave free pages that SQLite reuses for new rows, so a pruned file stops
//! growing but does not shrink (the store does not use `auto_vacuum`, which can only be switched
//! on by rewriting the whole file). The size cap therefore bounds the data, and the file settles
//! at the cap plus what is written between two prunes. `VACUUM` (for example `sqlite3 fly.db
//! VACUUM` while the coordinator is stopped) gives the free pages back to the filesystem.

use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{STATUS_CREATED, STATUS_RUNNING};

/// Runs that finished more recently than this are never pruned, whatever the policy: the
/// history of a run is recorded shortly after it finishes, from its results.
pub const RECENT_GRACE: Duration = Duration::from_secs(10 * 60);

/// What to keep. The default keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Retention {
    /// Prune runs that finished longer ago than this.
    pub max_age: Option<Duration>,
    /// Prune the oldest finished runs while the data in the file is above this many bytes.
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Whether this policy prunes nothing.
    pub fn keeps_everything(&self) -> bool {
        self.max_age.is_none() && self.max_bytes.is_none()
    }
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneSummary {
    /// Runs whose rows were deleted (their `runs` row stays, marked pruned).
    pub runs: u64,
    /// Rows deleted from `reports`, `results`, `run_tests` and `run_agents`.
    pub rows: u64,
    /// Bytes of data in the file before and after: pages in use times the page size (free
    /// pages, which SQLite reuses, do not count).
    pub used_before: u64,
    pub used_after: u64,
    /// The size of the database file (pages in use and free), without its WAL.
    pub file_bytes: u64,
    /// The size cap was not reached: what is left is runs in progress, runs that finished
    /// recently, runs that kept runs resumed, and what is never pruned.
    pub over_size_cap: bool,
    /// False when the store closed before the prune was done (it carries on at the next one).
    pub complete: bool,
    /// Transactions the prune took.
    pub steps: u64,
}

/// Whether a job has more to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    More,
    Done,
}

/// One prune, advanced by the writer thread between batches.
#[derive(Debug)]
pub(super) struct Job {
    /// Runs that finished before this (epoch seconds) are pruned regardless of size; None
    /// once there are no more of them (or with no maximum age).
    age_cutoff: Option<f64>,
    /// Runs that finished before this may be pruned to meet the size cap.
    grace_cutoff: f64,
    max_bytes: Option<u64>,
    /// When runs pruned by this job are marked pruned.
    now: f64,
    /// The run whose rows are being deleted: a run with many reports takes several steps.
    current: Option<String>,
    summary: PruneSummary,
    started: bool,
}

/// The tables holding a run's rows, biggest first, each with the statement deleting up to
/// `?2` of the run's rows. The three big tables are keyed by the run's integer key (schema
/// version 6); the key itself stays, as the `runs` row does.
const RUN_TABLES: [&str; 4] = [
    "DELETE FROM phase_reports WHERE id IN (SELECT id FROM phase_reports
         WHERE run = (SELECT seq FROM run_keys WHERE run_id = ?1) LIMIT ?2)",
    "DELETE FROM test_results WHERE (run, test_index) IN (SELECT run, test_index
         FROM test_results WHERE run = (SELECT seq FROM run_keys WHERE run_id = ?1) LIMIT ?2)",
    "DELETE FROM collected WHERE (run, test_index) IN (SELECT run, test_index
         FROM collected WHERE run = (SELECT seq FROM run_keys WHERE run_id = ?1) LIMIT ?2)",
    "DELETE FROM run_agents WHERE rowid IN
         (SELECT rowid FROM run_agents WHERE run_id = ?1 LIMIT ?2)",
];

/// The oldest finished run not pruned yet that finished before `?1` and that no kept run
/// resumed. `pruned_at IS NULL` and the order by `finished_at` make it a walk of the
/// `runs_to_prune` index from its start.
const OLDEST_PRUNABLE: &str = "
    SELECT id FROM runs
    WHERE pruned_at IS NULL AND finished_at < ?1 AND status NOT IN (?2, ?3)
      AND NOT EXISTS (SELECT 1 FROM runs AS later
                      WHERE later.resumed_from = runs.id AND later.pruned_at IS NULL)
    ORDER BY finished_at LIMIT 1";

impl Job {
    /// A prune of what `retention` does not keep, as of `now` (epoch seconds).
    pub(super) fn new(retention: Retention, now: f64) -> Job {
        let grace_cutoff = now - RECENT_GRACE.as_secs_f64();
        Job {
            age_cutoff: retention
                .max_age
                .map(|age| (now - age.as_secs_f64()).min(grace_cutoff)),
            grace_cutoff,
            max_bytes: retention.max_bytes,
            now,
            current: None,
            summary: PruneSummary::default(),
            started: false,
        }
    }

    /// What the job did so far.
    pub(super) fn summary(&self) -> &PruneSummary {
        &self.summary
    }

    /// Deletes up to `chunk` rows in one transaction. On an error nothing of this step is
    /// committed and the job may be dropped: every committed step left the file consistent, and
    /// a run left half deleted is finished first by the next prune (see [`half_pruned`]).
    pub(super) fn step(
        &mut self,
        conn: &mut Connection,
        chunk: usize,
    ) -> rusqlite::Result<Progress> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !self.started {
            self.summary.used_before = used_bytes(&tx)?.0;
            self.current = half_pruned(&tx)?;
            self.started = true;
        }
        let mut budget = chunk.max(1);
        let mut progress = Progress::More;
        while budget > 0 {
            let run = match self.current.take() {
                Some(run) => run,
                None => match self.next_run(&tx)? {
                    Some(run) => {
                        // Marked first: readers see at once that the run's rows are going, and
                        // a prune cut short finds the run again by its mark.
                        tx.prepare_cached("UPDATE runs SET pruned_at = ?2 WHERE id = ?1")?
                            .execute(params![run, self.now])?;
                        self.summary.runs += 1;
                        // Marking counts as a row, so a stretch of runs without rows is bounded
                        // by the chunk too.
                        budget -= 1;
                        run
                    }
                    None => {
                        progress = Progress::Done;
                        break;
                    }
                },
            };
            let mut emptied = true;
            for delete in RUN_TABLES {
                if budget == 0 {
                    emptied = false;
                    break;
                }
                let deleted = tx
                    .prepare_cached(delete)?
                    .execute(params![run, budget as i64])?;
                self.summary.rows += deleted as u64;
                // A table that gave fewer rows than asked has no more of the run's.
                emptied = deleted < budget;
                budget -= deleted.min(budget);
            }
            if !emptied {
                // Maybe more rows of this run: the next step carries on with it.
                self.current = Some(run);
            }
        }
        let (used, file) = used_bytes(&tx)?;
        tx.commit()?;
        self.summary.steps += 1;
        self.summary.used_after = used;
        self.summary.file_bytes = file;
        if progress == Progress::Done {
            self.summary.complete = true;
        }
        Ok(progress)
    }

    /// The next run to prune, or None when the policy is met.
    fn next_run(&mut self, conn: &Connection) -> rusqlite::Result<Option<String>> {
        if let Some(cutoff) = self.age_cutoff {
            match oldest_prunable(conn, cutoff)? {
                Some(run) => return Ok(Some(run)),
                None => self.age_cutoff = None,
            }
        }
        let Some(cap) = self.max_bytes else {
            return Ok(None);
        };
        if used_bytes(conn)?.0 <= cap {
            self.summary.over_size_cap = false;
            return Ok(None);
        }
        let run = oldest_prunable(conn, self.grace_cutoff)?;
        self.summary.over_size_cap = run.is_none();
        Ok(run)
    }
}

fn oldest_prunable(conn: &Connection, finished_before: f64) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(OLDEST_PRUNABLE)?
        .query_row(
            params![finished_before, STATUS_CREATED, STATUS_RUNNING],
            |row| row.get(0),
        )
        .optional()
}

/// The run a prune cut short (the store closed, or a step failed) left with rows: one of the
/// runs the latest prune marked, since a prune marks a run before deleting its rows and deletes
/// one run's rows at a time.
fn half_pruned(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT id FROM runs
         WHERE pruned_at = (SELECT max(pruned_at) FROM runs)
           AND (EXISTS (SELECT 1 FROM run_keys k JOIN phase_reports p ON p.run = k.seq
                        WHERE k.run_id = runs.id)
                OR EXISTS (SELECT 1 FROM run_keys k JOIN test_results r ON r.run = k.seq
                           WHERE k.run_id = runs.id)
                OR EXISTS (SELECT 1 FROM run_keys k JOIN collected c ON c.run = k.seq
                           WHERE k.run_id = runs.id)
                OR EXISTS (SELECT 1 FROM run_agents WHERE run_id = runs.id))
         LIMIT 1",
        [],
        |row| row.get(0),
    )
    .optional()
}

/// Bytes of the file in use (pages holding data) and in all (the file without its WAL).
fn used_bytes(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    let pragma = |name: &str| -> rusqlite::Result<u64> {
        let value: i64 = conn.pragma_query_value(None, name, |row| row.get(0))?;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    let page_size = pragma("page_size")?;
    let pages = pragma("page_count")?;
    let free = pragma("freelist_count")?;
    Ok((pages.saturating_sub(free) * page_size, pages * page_size))
}
