//! Questions across runs, answered from the record: which runs there were (`runs`), which tests
//! are slowest and how their durations moved (`slowest`), and which tests are flaky (`flaky`).
//! Each query returns plain structs; the `print_*` functions write them as text tables.
//!
//! **Flaky** has two kinds:
//! - *outcome changed*: within the window of a project's recent runs, a test whose outcome
//!   class (pass: passed, xpassed; fail: failed, error; skip: skipped; xfail: xfailed) differs
//!   between runs *of the same test*. There is no per-test content hash yet, so "the same test"
//!   means: the same nodeid, in runs whose pytest arguments are equal. A test edited between two
//!   runs with the same arguments therefore still counts; that is the known limitation.
//! - *passed on rerun*: a result with more than one attempt whose final outcome is passed. An
//!   attempt can also be repeated because its agent went away, so the earlier attempts'
//!   outcomes are listed for the user to judge.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;

use fly_common::outcome::{final_outcome, Phase};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{format_seconds, parse_counts, summary_text, Db, ReportError};

/// The local date and time of an epoch column, as SQLite formats it.
const LOCAL_TIME: &str = "strftime('%Y-%m-%d %H:%M:%S', created_at, 'unixepoch', 'localtime')";

/// One line of `fly-coordinator runs`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub project: String,
    pub status: String,
    /// Epoch seconds.
    pub created_at: f64,
    /// Local time, `YYYY-MM-DD HH:MM:SS`.
    pub created: String,
    /// `finished_at - created_at`: what the user waited, collection included. None while
    /// running.
    pub duration: Option<f64>,
    pub collected: Option<i64>,
    pub exit_code: Option<i64>,
    /// pytest's summary counts, in pytest's order.
    pub counts: Vec<(String, u32)>,
}

impl RunSummary {
    pub fn summary(&self) -> String {
        summary_text(&self.counts)
    }
}

/// A run named in a history table.
#[derive(Debug, Clone, Serialize)]
pub struct RunRef {
    pub id: String,
    pub created: String,
}

/// The most recent runs, newest first; of `project` only when given.
pub fn recent_runs(
    db: &Db,
    project: Option<&str>,
    limit: usize,
) -> Result<Vec<RunSummary>, ReportError> {
    let sql = format!(
        "SELECT id, project, status, created_at, {LOCAL_TIME}, finished_at, collected, exit_code,
             counts
         FROM runs WHERE ?1 IS NULL OR project = ?1
         ORDER BY created_at DESC, rowid DESC LIMIT ?2"
    );
    let mut stmt = db.conn().prepare(&sql).map_err(db.sqlite("listing runs"))?;
    let rows = stmt
        .query_map(params![project, to_i64(limit)], |row| {
            let created_at: f64 = row.get(3)?;
            let finished_at: Option<f64> = row.get(5)?;
            let counts: Option<String> = row.get(8)?;
            Ok(RunSummary {
                id: row.get(0)?,
                project: row.get(1)?,
                status: row.get(2)?,
                created_at,
                created: row.get::<_, Option<String>>(4)?.unwrap_or_default(),
                duration: finished_at.map(|f| (f - created_at).max(0.0)),
                collected: row.get(6)?,
                exit_code: row.get(7)?,
                counts: parse_counts(counts.as_deref()),
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(db.sqlite("listing runs"))?;
    Ok(rows)
}

/// Writes `runs` as a table, or a line saying there are none.
pub fn print_runs(runs: &[RunSummary], out: &mut dyn io::Write) -> io::Result<()> {
    if runs.is_empty() {
        return writeln!(out, "no runs recorded");
    }
    let rows = runs
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.project.clone(),
                r.status.clone(),
                r.created.clone(),
                r.duration.map_or("-".into(), format_seconds),
                r.collected.map_or("-".into(), |c| c.to_string()),
                r.summary(),
            ]
        })
        .collect();
    print_table(
        out,
        &[
            ("RUN", false),
            ("PROJECT", false),
            ("STATUS", false),
            ("CREATED", false),
            ("WALL", true),
            ("COLLECTED", true),
            ("SUMMARY", false),
        ],
        rows,
    )
}

/// The project a history query is about: the one given, else the latest run's. None when the
/// database has no runs.
fn project_or_latest(db: &Db, project: Option<&str>) -> Result<Option<String>, ReportError> {
    if let Some(project) = project {
        return Ok(Some(project.to_string()));
    }
    db.conn()
        .query_row(
            "SELECT project FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(db.sqlite("finding the latest run's project"))
}

/// Up to `limit` most recent runs of `project` that have results, oldest first.
fn runs_with_results(
    db: &Db,
    project: &str,
    limit: usize,
) -> Result<Vec<(RunRef, String)>, ReportError> {
    let sql = format!(
        "SELECT id, {LOCAL_TIME}, pytest_args FROM runs
         WHERE project = ?1 AND EXISTS (SELECT 1 FROM results WHERE results.run_id = runs.id)
         ORDER BY created_at DESC, rowid DESC LIMIT ?2"
    );
    let mut stmt = db
        .conn()
        .prepare(&sql)
        .map_err(db.sqlite("listing the project's runs"))?;
    let mut rows = stmt
        .query_map(params![project, to_i64(limit)], |row| {
            Ok((
                RunRef {
                    id: row.get(0)?,
                    created: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                },
                row.get::<_, String>(2)?,
            ))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(db.sqlite("listing the project's runs"))?;
    rows.reverse();
    Ok(rows)
}

/// One test of `slowest`.
#[derive(Debug, Clone, Serialize)]
pub struct SlowHistory {
    pub nodeid: String,
    /// Its test time in each run of [`Slowest::runs`] (oldest first); None where it has no
    /// result.
    pub durations: Vec<Option<f64>>,
    /// In the latest run.
    pub latest: f64,
    /// `latest / median(earlier) - 1`; None when no earlier run has it.
    pub trend: Option<f64>,
}

/// `fly-coordinator slowest`: the slowest tests of a project's latest run, with their test
/// time (the result's `duration`: setup + call + teardown of the attempt that counts) in each
/// of its recent runs.
#[derive(Debug, Clone, Serialize)]
pub struct Slowest {
    pub project: String,
    /// Oldest first; the last one is the latest.
    pub runs: Vec<RunRef>,
    /// Slowest first.
    pub tests: Vec<SlowHistory>,
}

/// The `limit` slowest tests of the latest of `runs` recent runs of `project` (default: the
/// latest run's project). None when there is no run with results.
pub fn slowest(
    db: &Db,
    project: Option<&str>,
    limit: usize,
    runs: usize,
) -> Result<Option<Slowest>, ReportError> {
    let Some(project) = project_or_latest(db, project)? else {
        return Ok(None);
    };
    let runs: Vec<RunRef> = runs_with_results(db, &project, runs.max(1))?
        .into_iter()
        .map(|(run, _)| run)
        .collect();
    let Some(latest) = runs.last() else {
        return Ok(Some(Slowest {
            project,
            runs,
            tests: Vec::new(),
        }));
    };
    let mut stmt = db
        .conn()
        .prepare(
            "SELECT nodeid, duration FROM results WHERE run_id = ?1
             ORDER BY duration DESC, test_index LIMIT ?2",
        )
        .map_err(db.sqlite("reading the slowest tests"))?;
    let top: Vec<(String, f64)> = stmt
        .query_map(params![latest.id, to_i64(limit)], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(db.sqlite("reading the slowest tests"))?;
    let wanted: HashSet<&str> = top.iter().map(|(n, _)| n.as_str()).collect();
    // One scan per run (results are keyed by test index, not nodeid), keeping only the tests
    // of interest.
    let mut by_run: Vec<HashMap<String, f64>> = Vec::with_capacity(runs.len());
    let mut scan = db
        .conn()
        .prepare("SELECT nodeid, duration FROM results WHERE run_id = ?1")
        .map_err(db.sqlite("reading earlier durations"))?;
    for run in &runs {
        let mut durations = HashMap::new();
        let mut rows = scan
            .query([&run.id])
            .map_err(db.sqlite("reading earlier durations"))?;
        while let Some(row) = rows
            .next()
            .map_err(db.sqlite("reading earlier durations"))?
        {
            let nodeid = row
                .get_ref(0)
                .and_then(|v| Ok(v.as_str()?.to_owned()))
                .map_err(db.sqlite("reading earlier durations"))?;
            if wanted.contains(nodeid.as_str()) {
                let duration: f64 = row.get(1).map_err(db.sqlite("reading earlier durations"))?;
                durations.insert(nodeid, duration);
            }
        }
        by_run.push(durations);
    }
    let tests = top
        .into_iter()
        .map(|(nodeid, latest)| {
            let durations: Vec<Option<f64>> =
                by_run.iter().map(|run| run.get(&nodeid).copied()).collect();
            let earlier: Vec<f64> = durations[..durations.len().saturating_sub(1)]
                .iter()
                .flatten()
                .copied()
                .collect();
            let trend = median(earlier)
                .filter(|m| *m > 0.0)
                .map(|m| latest / m - 1.0);
            SlowHistory {
                nodeid,
                durations,
                latest,
                trend,
            }
        })
        .collect();
    Ok(Some(Slowest {
        project,
        runs,
        tests,
    }))
}

/// Writes `slowest` as a table: one column per run (oldest first, the latest last), the trend,
/// the test.
pub fn print_slowest(slowest: Option<&Slowest>, out: &mut dyn io::Write) -> io::Result<()> {
    let Some(slowest) = slowest else {
        return writeln!(out, "no runs recorded");
    };
    if slowest.tests.is_empty() {
        return writeln!(
            out,
            "project {:?} has no run with results yet",
            slowest.project
        );
    }
    writeln!(
        out,
        "slowest tests of project {:?} in its latest run, with their durations in its last {} \
         run(s), oldest first:",
        slowest.project,
        slowest.runs.len()
    )?;
    let short: Vec<String> = slowest
        .runs
        .iter()
        .map(|r| r.id.get(..8).unwrap_or(&r.id).to_string())
        .collect();
    let mut headers: Vec<(&str, bool)> = short.iter().map(|s| (s.as_str(), true)).collect();
    headers.push(("TREND", true));
    headers.push(("TEST", false));
    let rows = slowest
        .tests
        .iter()
        .map(|t| {
            let mut row: Vec<String> = t
                .durations
                .iter()
                .map(|d| d.map_or("-".into(), format_seconds))
                .collect();
            row.push(match t.trend {
                None => "new".into(),
                Some(x) => format!("{:+.0}%", x * 100.0),
            });
            row.push(t.nodeid.clone());
            row
        })
        .collect();
    print_table(out, &headers, rows)?;
    writeln!(
        out,
        "TREND: the latest duration against the median of the earlier runs."
    )
}

/// Why a test counts as flaky.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FlakyReason {
    /// Its outcome class differed between runs with the same pytest arguments: the outcome in
    /// each of those runs that has it, oldest first.
    OutcomeChanged { outcomes: Vec<(String, String)> },
    /// It passed after more than one attempt in `run_id`; `earlier` are the outcomes of the
    /// attempts that did not count (`no report` for one that never reported).
    PassedOnRerun {
        run_id: String,
        attempts: u32,
        earlier: Vec<String>,
    },
}

/// One line of `fly-coordinator flaky`.
#[derive(Debug, Clone, Serialize)]
pub struct FlakyTest {
    pub nodeid: String,
    pub reason: FlakyReason,
}

/// `fly-coordinator flaky`: the flaky tests of a project's recent runs.
#[derive(Debug, Clone, Serialize)]
pub struct Flaky {
    pub project: String,
    /// The window, oldest first.
    pub runs: Vec<RunRef>,
    pub tests: Vec<FlakyTest>,
}

/// What an outcome says about a test, for comparing runs.
fn outcome_class(outcome: &str) -> &str {
    match outcome {
        "passed" | "xpassed" => "pass",
        "failed" | "error" => "fail",
        "skipped" => "skip",
        "xfailed" => "xfail",
        other => other,
    }
}

/// Flaky tests among the last `runs` runs (with results) of `project` (default: the latest
/// run's project). See the module documentation for what counts. None when there are no runs.
pub fn flaky(db: &Db, project: Option<&str>, runs: usize) -> Result<Option<Flaky>, ReportError> {
    let Some(project) = project_or_latest(db, project)? else {
        return Ok(None);
    };
    let window = runs_with_results(db, &project, runs.max(1))?;
    let mut tests: Vec<FlakyTest> = Vec::new();

    // (a) Outcome changes within each group of runs with equal arguments.
    let mut groups: BTreeMap<&str, Vec<&RunRef>> = BTreeMap::new();
    for (run, args) in &window {
        groups.entry(args.as_str()).or_default().push(run);
    }
    let mut results = db
        .conn()
        .prepare("SELECT nodeid, outcome FROM results WHERE run_id = ?1")
        .map_err(db.sqlite("reading results"))?;
    for group in groups.values().filter(|g| g.len() > 1) {
        // nodeid -> outcome in each run of the group that has it, oldest first.
        let mut seen: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for run in group {
            let rows = results
                .query_map([&run.id], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(db.sqlite("reading results"))?;
            for (nodeid, outcome) in rows {
                seen.entry(nodeid)
                    .or_default()
                    .push((run.id.clone(), outcome));
            }
        }
        for (nodeid, outcomes) in seen {
            let classes: HashSet<&str> = outcomes.iter().map(|(_, o)| outcome_class(o)).collect();
            if classes.len() > 1 {
                tests.push(FlakyTest {
                    nodeid,
                    reason: FlakyReason::OutcomeChanged { outcomes },
                });
            }
        }
    }

    // (b) Passed on a later attempt.
    let mut reruns = db
        .conn()
        .prepare(
            "SELECT test_index, nodeid, attempts, lease FROM results
             WHERE run_id = ?1 AND attempts > 1 AND outcome = 'passed' ORDER BY test_index",
        )
        .map_err(db.sqlite("reading retried results"))?;
    let mut earlier_reports = db
        .conn()
        .prepare(
            "SELECT lease, phase, category FROM reports
             WHERE run_id = ?1 AND test_index = ?2 AND lease <> ?3 ORDER BY id",
        )
        .map_err(db.sqlite("reading earlier attempts"))?;
    for (run, _) in &window {
        let retried = reruns
            .query_map([&run.id], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(db.sqlite("reading retried results"))?;
        for (test_index, nodeid, attempts, lease) in retried {
            let reports = earlier_reports
                .query_map(params![run.id, test_index, lease], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Option<String>>(1)?,
                        row.get::<_, String>(2)?,
                    ))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(db.sqlite("reading earlier attempts"))?;
            let mut by_lease: BTreeMap<i64, Vec<(Phase, String)>> = BTreeMap::new();
            for (lease, phase, category) in reports {
                let entry = by_lease.entry(lease).or_default();
                if let Some(phase) = phase.as_deref().and_then(Phase::parse) {
                    entry.push((phase, category));
                }
            }
            let mut earlier: Vec<String> = by_lease
                .values()
                .map(|phases| final_outcome(phases.iter().map(|(p, c)| (*p, c.as_str()))))
                .collect();
            let attempts = u32::try_from(attempts).unwrap_or(0);
            while earlier.len() + 1 < attempts as usize {
                earlier.push("no report".into());
            }
            tests.push(FlakyTest {
                nodeid,
                reason: FlakyReason::PassedOnRerun {
                    run_id: run.id.clone(),
                    attempts,
                    earlier,
                },
            });
        }
    }
    Ok(Some(Flaky {
        project,
        runs: window.into_iter().map(|(run, _)| run).collect(),
        tests,
    }))
}

/// Writes `flaky` as a table.
pub fn print_flaky(flaky: Option<&Flaky>, out: &mut dyn io::Write) -> io::Result<()> {
    let Some(flaky) = flaky else {
        return writeln!(out, "no runs recorded");
    };
    writeln!(
        out,
        "flaky tests of project {:?} in its last {} run(s) with results:",
        flaky.project,
        flaky.runs.len()
    )?;
    if flaky.tests.is_empty() {
        return writeln!(out, "none");
    }
    let short = |id: &str| id.get(..8).unwrap_or(id).to_string();
    let rows = flaky
        .tests
        .iter()
        .map(|t| match &t.reason {
            FlakyReason::OutcomeChanged { outcomes } => vec![
                "outcome changed".into(),
                outcomes
                    .iter()
                    .map(|(run, outcome)| format!("{outcome}@{}", short(run)))
                    .collect::<Vec<_>>()
                    .join(" "),
                t.nodeid.clone(),
            ],
            FlakyReason::PassedOnRerun {
                run_id,
                attempts,
                earlier,
            } => vec![
                "passed on rerun".into(),
                format!(
                    "attempt {attempts} in {} (earlier: {})",
                    short(run_id),
                    earlier.join(", ")
                ),
                t.nodeid.clone(),
            ],
        })
        .collect();
    print_table(
        out,
        &[("KIND", false), ("DETAIL", false), ("TEST", false)],
        rows,
    )?;
    writeln!(
        out,
        "Outcome changes are counted between runs with the same pytest arguments; a test edited \
         in between is not told apart (no per-test content hash yet)."
    )
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Writes a table with columns padded to their widest cell (right-aligned where asked); the
/// last column is not padded.
fn print_table(
    out: &mut dyn io::Write,
    headers: &[(&str, bool)],
    rows: Vec<Vec<String>>,
) -> io::Result<()> {
    let width = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| width(h)).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(width(cell));
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths[i].saturating_sub(width(cell));
            let right = headers.get(i).is_some_and(|(_, r)| *r);
            if i == last && !right {
                text.push_str(cell);
            } else if right {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            }
        }
        text
    };
    writeln!(out, "{}", line(headers.iter().map(|(h, _)| *h).collect()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn outcome_classes_group_pass_and_fail() {
        assert_eq!(outcome_class("xpassed"), outcome_class("passed"));
        assert_eq!(outcome_class("error"), outcome_class("failed"));
        assert_ne!(outcome_class("skipped"), outcome_class("passed"));
    }

    #[test]
    fn tables_align_columns() {
        let mut out = Vec::new();
        print_table(
            &mut out,
            &[("A", false), ("N", true), ("LAST", false)],
            vec![
                vec!["x".into(), "1".into(), "one".into()],
                vec!["long".into(), "100".into(), "two".into()],
            ],
        )
        .expect("write to memory");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text, "A       N  LAST\nx       1  one\nlong  100  two\n");
    }
}
