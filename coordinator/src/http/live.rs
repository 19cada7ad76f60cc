//! The run page's data: a [`RunView`] built from the most recent phase reports of a run in
//! SQLite (read-only), with a bar for each test a worker is running right now, and serialised
//! as the JSON the page polls: the run, its figures, recent failures, and the timeline in the
//! report's own format ([`html::data_json`]), so the same drawing code draws it.
//!
//! The timeline holds at most [`TIMELINE_REPORTS`] phase reports, the most recent ones, so a
//! poll of a run of a million tests costs about as much as one of a few thousand: for a run in
//! progress they are found among the newest [`SCAN_ROWS`] rows of the table (its reports are
//! among the newest), never by walking the whole table; for a finished run within the span of
//! its rows, found with one pass over its index entries (once: the page stops polling a
//! finished run). Test indexes are renumbered to the tests shown, so the page's list of node
//! ids stays as small as the timeline.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rusqlite::params;
use serde::Serialize;

use crate::observe::{epoch_now, AgentNow, RunNow};
use crate::report::{
    html, phase_record, AgentInfo, Db, Failure, PhaseRecord, ReportError, ResultRecord, RunInfo,
    RunInput, RunStats, RunView, SlowTest, PHASE_COLUMNS,
};

/// Phase reports a live timeline shows at most (about a third as many tests).
pub const TIMELINE_REPORTS: usize = 30_000;

/// Newest rows of the reports table searched for a run in progress.
pub const SCAN_ROWS: usize = 300_000;

/// Failures the run page lists, with their tracebacks cut to [`FAILURE_TEXT`] bytes.
pub const PAGE_FAILURES: usize = 20;
const FAILURE_TEXT: usize = 16 * 1024;

/// The outcome of a bar whose test a worker is running now.
const RUNNING: &str = "running";

/// A test a worker runs now, as the run page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RunningTest {
    pub agent_id: String,
    pub hostname: String,
    pub worker: u32,
    pub nodeid: String,
    pub since: f64,
}

#[derive(Serialize)]
struct RunPage<'a> {
    at: f64,
    live: Option<&'a RunNow>,
    run: &'a RunInfo,
    agents: &'a [AgentInfo],
    stats: &'a RunStats,
    running: &'a [RunningTest],
    failures: &'a [Failure],
    failures_total: usize,
    slowest: &'a [SlowTest],
    /// Phase reports the timeline shows, and whether older ones were left out.
    shown_reports: usize,
    truncated: bool,
}

/// The run page's JSON for `run` (a run id, an id prefix or `latest`): `live` is the
/// dispatcher's view of it while it runs, `agents` the connected agents (for the tests their
/// workers run now). Blocking: call it from the blocking pool.
pub fn run_json(
    db_path: &Path,
    run: &str,
    live_runs: &[RunNow],
    agents: &[AgentNow],
) -> Result<String, ReportError> {
    let db = Db::open(db_path)?;
    let live_match = live_runs
        .iter()
        .find(|r| r.id == run || (run.len() >= 4 && r.id.starts_with(run)));
    let run_id = match db.resolve_run(run) {
        Ok(id) => id,
        // Submitted a moment ago: its row may not be committed yet.
        Err(ReportError::UnknownRun { .. } | ReportError::NoRuns { .. })
            if live_match.is_some() =>
        {
            live_match.map(|r| r.id.clone()).unwrap_or_default()
        }
        Err(err) => return Err(err),
    };
    let live = live_runs.iter().find(|r| r.id == run_id);
    let info = match db.read_run(&run_id) {
        Ok(info) => info,
        Err(ReportError::UnknownRun { .. }) if live.is_some() => live_info(live),
        Err(err) => return Err(err),
    };
    let run_agents = db.read_agents(&run_id)?;
    let now = epoch_now();
    let run_id_ref = run_id.as_str();
    let running: Vec<(RunningTest, u32, u64)> = agents
        .iter()
        .flat_map(|agent| {
            agent.worker_states.iter().filter_map(move |w| {
                let test = w.test.as_ref().filter(|t| t.run == run_id_ref)?;
                Some((
                    RunningTest {
                        agent_id: agent.id.clone(),
                        hostname: agent.hostname.clone(),
                        worker: w.worker,
                        nodeid: test.nodeid.clone(),
                        since: test.since,
                    },
                    test.test_index,
                    test.lease,
                ))
            })
        })
        .collect();

    let (mut reports, truncated) = if live.is_some_and(|r| r.phase == "collecting") {
        (Vec::new(), false)
    } else {
        recent_reports(&db, &run_id, live.is_some())?
    };
    // A bar for each running test, from its last reported phase (or its start) to now.
    let mut last_stop: HashMap<u64, f64> = HashMap::new();
    for report in &reports {
        let stop = last_stop.entry(report.lease).or_insert(f64::MIN);
        *stop = stop.max(report.stop);
    }
    let running_leases: HashSet<u64> = running.iter().map(|(_, _, lease)| *lease).collect();
    for (test, index, lease) in &running {
        let start = last_stop
            .get(lease)
            .copied()
            .unwrap_or(test.since)
            .max(test.since);
        reports.push(PhaseRecord {
            test_index: *index,
            nodeid: test.nodeid.clone(),
            lease: *lease,
            phase: String::new(),
            outcome: String::new(),
            category: RUNNING.into(),
            duration: (now - start).max(0.0),
            start,
            stop: now.max(start),
            agent_id: test.agent_id.clone(),
            worker: test.worker,
            superseded: false,
            longrepr: None,
            message: None,
            sections: Vec::new(),
        });
    }
    let shown_reports = reports.len() - running.len();
    let results = results_of(&db, &run_id, &reports)?;
    let (collection, reports, results) = renumber(reports, results);

    let mut view = RunView::build(RunInput {
        run: info,
        agents: run_agents,
        collection,
        reports,
        results,
    });
    for bar in view.lanes.iter_mut().flat_map(|l| l.bars.iter_mut()) {
        if running_leases.contains(&bar.lease) && !bar.superseded {
            bar.outcome = RUNNING.into();
        }
    }
    let failures_total = view.failures.len() + view.failures_omitted;
    let failures: Vec<Failure> = view
        .failures
        .iter()
        .take(PAGE_FAILURES)
        .map(|f| Failure {
            longrepr: f.longrepr.as_deref().map(|t| cut(t, FAILURE_TEXT)),
            sections: f
                .sections
                .iter()
                .map(|(name, text)| (name.clone(), cut(text, FAILURE_TEXT)))
                .collect(),
            ..f.clone()
        })
        .collect();
    let running: Vec<RunningTest> = running.into_iter().map(|(t, _, _)| t).collect();
    let page = RunPage {
        at: now,
        live,
        run: &view.run,
        agents: &view.agents,
        stats: &view.stats,
        running: &running,
        failures: &failures,
        failures_total,
        slowest: &view.slowest_tests[..view.slowest_tests.len().min(10)],
        shown_reports,
        truncated,
    };
    // The page's fields, then the timeline as the report's script-safe JSON.
    let head = serde_json::to_string(&page).unwrap_or_else(|_| "{}".into());
    let head = head.strip_suffix('}').unwrap_or("{");
    let separator = if head.len() > 1 { "," } else { "" };
    Ok(format!(
        "{head}{separator}\"timeline\":{}}}",
        html::data_json(&view)
    ))
}

/// A run the database does not have yet, from the dispatcher's view.
fn live_info(live: Option<&RunNow>) -> RunInfo {
    RunInfo {
        id: live.map(|r| r.id.clone()).unwrap_or_default(),
        project: live.map(|r| r.project.clone()).unwrap_or_default(),
        status: "created".into(),
        pytest_args: Vec::new(),
        client_cwd: None,
        created_at: live.map_or(0.0, |r| r.created_at),
        started_at: None,
        finished_at: None,
        exit_code: None,
        collected: live.map(|r| i64::from(r.collected)),
        deselected: None,
        counts: live.map(|r| r.counts.clone()).unwrap_or_default(),
        message: None,
    }
}

/// At most [`TIMELINE_REPORTS`] of the run's most recent phase reports, oldest first, and
/// whether there were more.
fn recent_reports(
    db: &Db,
    run_id: &str,
    live: bool,
) -> Result<(Vec<PhaseRecord>, bool), ReportError> {
    let limit = i64::try_from(TIMELINE_REPORTS + 1).unwrap_or(i64::MAX);
    let scan = i64::try_from(SCAN_ROWS).unwrap_or(i64::MAX);
    let failed = db.sqlite("reading the run's recent reports");
    // Walks the table backwards by rowid from the newest row that can be the run's, and stops
    // at the limit: the run's index would visit (and sort) every report of the run.
    let mut reports = if live {
        // A run in progress: among the newest rows of the table.
        let sql = format!(
            "SELECT {PHASE_COLUMNS} FROM reports NOT INDEXED
             WHERE id > (SELECT max(id) FROM reports) - ?3 AND run_id = ?1
             ORDER BY id DESC LIMIT ?2"
        );
        let mut stmt = db.conn().prepare(&sql).map_err(&failed)?;
        let rows = stmt
            .query_map(params![run_id, limit, scan], phase_record)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(&failed)?;
        rows
    } else {
        // A finished run: within the span of its rows (one pass over its index entries).
        let span: (Option<i64>, Option<i64>) = db
            .conn()
            .query_row(
                "SELECT min(id), max(id) FROM reports WHERE run_id = ?1",
                [run_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(&failed)?;
        let (Some(first), Some(last)) = span else {
            return Ok((Vec::new(), false));
        };
        let sql = format!(
            "SELECT {PHASE_COLUMNS} FROM reports NOT INDEXED
             WHERE id BETWEEN ?3 AND ?4 AND run_id = ?1 ORDER BY id DESC LIMIT ?2"
        );
        let mut stmt = db.conn().prepare(&sql).map_err(&failed)?;
        let rows = stmt
            .query_map(params![run_id, limit, first, last], phase_record)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(&failed)?;
        rows
    };
    let truncated = reports.len() > TIMELINE_REPORTS;
    reports.truncate(TIMELINE_REPORTS);
    reports.reverse();
    Ok((reports, truncated))
}

/// The results of the tests these reports are about.
fn results_of(
    db: &Db,
    run_id: &str,
    reports: &[PhaseRecord],
) -> Result<Vec<ResultRecord>, ReportError> {
    let mut tests: Vec<u32> = reports.iter().map(|r| r.test_index).collect();
    tests.sort_unstable();
    tests.dedup();
    if tests.is_empty() {
        return Ok(Vec::new());
    }
    let list = serde_json::to_string(&tests).unwrap_or_else(|_| "[]".into());
    let mut stmt = db
        .conn()
        .prepare(
            "SELECT test_index, nodeid, outcome, duration, attempts, lease, agent_id, worker
             FROM results
             WHERE run_id = ?1 AND test_index IN (SELECT value FROM json_each(?2))
             ORDER BY test_index",
        )
        .map_err(db.sqlite("reading the run's results"))?;
    let results = stmt
        .query_map(params![run_id, list], |row| {
            Ok(ResultRecord {
                test_index: to_u32(row.get(0)?),
                nodeid: row.get(1)?,
                outcome: row.get(2)?,
                duration: row.get(3)?,
                attempts: to_u32(row.get(4)?),
                lease: u64::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
                agent_id: row.get(6)?,
                worker: to_u32(row.get(7)?),
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(db.sqlite("reading the run's results"))?;
    Ok(results)
}

/// Numbers the tests shown 0, 1, 2, ... in order of appearance, so the view's list of node
/// ids holds only them (a test index can be near a million).
fn renumber(
    mut reports: Vec<PhaseRecord>,
    mut results: Vec<ResultRecord>,
) -> (Vec<String>, Vec<PhaseRecord>, Vec<ResultRecord>) {
    let mut local: HashMap<u32, u32> = HashMap::new();
    let mut collection: Vec<String> = Vec::new();
    for report in &mut reports {
        let next = u32::try_from(collection.len()).unwrap_or(u32::MAX);
        let index = *local.entry(report.test_index).or_insert_with(|| {
            collection.push(report.nodeid.clone());
            next
        });
        report.test_index = index;
    }
    results.retain_mut(|result| match local.get(&result.test_index) {
        Some(index) => {
            result.test_index = *index;
            true
        }
        None => false,
    });
    (collection, reports, results)
}

fn to_u32(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// At most `limit` bytes of `text`, cut at a character boundary, with a note when cut.
fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[... {} more bytes: see the full report]",
        &text[..end],
        text.len() - end
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(test_index: u32, lease: u64, nodeid: &str) -> PhaseRecord {
        PhaseRecord {
            test_index,
            nodeid: nodeid.into(),
            lease,
            phase: "call".into(),
            outcome: "passed".into(),
            category: "passed".into(),
            duration: 1.0,
            start: 0.0,
            stop: 1.0,
            agent_id: "a".into(),
            worker: 0,
            superseded: false,
            longrepr: None,
            message: None,
            sections: Vec::new(),
        }
    }

    #[test]
    fn renumbering_keeps_the_list_of_node_ids_as_small_as_the_timeline() {
        let reports = vec![
            report(999_999, 1, "t.py::far"),
            report(5, 2, "t.py::near"),
            report(999_999, 1, "t.py::far"),
        ];
        let results = vec![
            ResultRecord {
                test_index: 5,
                nodeid: "t.py::near".into(),
                outcome: "passed".into(),
                duration: 1.0,
                attempts: 1,
                lease: 2,
                agent_id: "a".into(),
                worker: 0,
            },
            ResultRecord {
                test_index: 7,
                nodeid: "t.py::not-shown".into(),
                outcome: "passed".into(),
                duration: 1.0,
                attempts: 1,
                lease: 3,
                agent_id: "a".into(),
                worker: 0,
            },
        ];
        let (collection, reports, results) = renumber(reports, results);
        assert_eq!(collection, ["t.py::far", "t.py::near"]);
        let indexes: Vec<u32> = reports.iter().map(|r| r.test_index).collect();
        assert_eq!(indexes, [0, 1, 0]);
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].test_index, 1);
    }

    /// A run of `tests` passing tests on one agent, written through the store, with the test
    /// after them running now on worker 1.
    async fn recorded_run(dir: &Path, tests: u32) -> (std::path::PathBuf, Vec<RunNow>, AgentNow) {
        use fly_common::proto::{AgentHello, CollectedTest, PhaseReport, Topology};

        use crate::observe::{TestNow, Watch, WorkerNow};
        use crate::store::{Store, Write};

        let path = dir.join("fly.db");
        let store = Store::open(&path).unwrap();
        store.write(Write::RunCreated {
            run_id: "run-1".into(),
            project: "p".into(),
            pytest_args: vec![".".into()],
            client_cwd: "/tmp".into(),
            created_at: 1000.0,
        });
        let collection: Vec<CollectedTest> = (0..=tests)
            .map(|i| CollectedTest {
                nodeid: format!("t.py::test_{i}"),
                file: "t.py".into(),
                ..CollectedTest::default()
            })
            .collect();
        store.write(Write::RunCollected {
            run_id: "run-1".into(),
            tests: std::sync::Arc::new(crate::collection::Collection::from(collection.as_slice())),
            deselected: 0,
        });
        store.write(Write::AgentConnected {
            agent_id: "agent-1".into(),
            hostname: "host-1".into(),
            fly_version: "0".into(),
            protocol_version: 1,
            workers: 2,
            topology: Topology::default(),
            labels: Vec::new(),
            workdir: "/w".into(),
            python: "python".into(),
            connected_at: 1000.0,
            speed: 1.0,
        });
        store.write(Write::RunAgent {
            run_id: "run-1".into(),
            agent_id: "agent-1".into(),
            workers: 2,
            accepted: true,
            reason: String::new(),
        });
        for test in 0..tests {
            let start = 1001.0 + f64::from(test) * 0.01;
            store.write(Write::Report {
                run_id: "run-1".into(),
                nodeid: format!("t.py::test_{test}"),
                agent_id: "agent-1".into(),
                worker: 0,
                superseded: false,
                report: PhaseReport {
                    lease: u64::from(test) + 1,
                    test_index: test,
                    phase: 2,
                    outcome: "passed".into(),
                    category: "passed".into(),
                    duration: 0.01,
                    start,
                    stop: start + 0.01,
                    ..PhaseReport::default()
                },
            });
        }
        store.close().await.unwrap();
        let live = RunNow {
            id: "run-1".into(),
            project: "p".into(),
            phase: "running",
            created_at: 1000.0,
            collected: tests + 1,
            finished: tests,
            queued: 0,
            running: 1,
            counts: vec![("passed".into(), tests)],
            agents: 1,
            workers: 2,
            remaining_seconds: 0.01,
            capacity: 2.0,
            eta_seconds: Some(0.005),
            followers_behind: 0,
        };
        let mut watch = Watch::new();
        watch.agent_joined(
            1,
            &AgentHello {
                agent_id: "agent-1".into(),
                hostname: "host-1".into(),
                workers: 2,
                ..AgentHello::default()
            },
        );
        let mut agent = watch.agents()[0].1.agent.clone();
        agent.worker_states = vec![
            WorkerNow {
                worker: 0,
                test: None,
            },
            WorkerNow {
                worker: 1,
                test: Some(TestNow {
                    run: "run-1".into(),
                    test_index: tests,
                    lease: u64::from(tests) + 1,
                    nodeid: format!("t.py::test_{tests}"),
                    since: epoch_now() - 1.0,
                }),
            },
        ];
        (path, vec![live], agent)
    }

    fn page(path: &Path, run: &str, live: &[RunNow], agent: &AgentNow) -> serde_json::Value {
        let json = run_json(path, run, live, std::slice::from_ref(agent)).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    #[tokio::test]
    async fn a_live_run_shows_its_bars_and_the_test_running_now() {
        let dir = tempfile::tempdir().unwrap();
        let (path, live, agent) = recorded_run(dir.path(), 5).await;
        let page = page(&path, "run-1", &live, &agent);
        assert_eq!(page["live"]["id"], "run-1");
        assert_eq!(page["truncated"], false);
        assert_eq!(page["shown_reports"], 5);
        assert_eq!(page["running"][0]["nodeid"], "t.py::test_5");
        let timeline = &page["timeline"];
        let names: Vec<&str> = timeline["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        let lanes = timeline["lanes"].as_array().unwrap();
        assert_eq!(lanes.len(), 2, "both workers have a lane");
        assert_eq!(lanes[0]["bars"].as_array().unwrap().len(), 5);
        let running = &lanes[1]["bars"][0];
        assert_eq!(names[running[1].as_u64().unwrap() as usize], "running");
        assert_eq!(timeline["tests"].as_array().unwrap().len(), 6);
        assert_eq!(timeline["agents"][0]["label"], "host-1 (agent-1)");
    }

    #[tokio::test]
    async fn a_large_run_shows_only_its_most_recent_reports() {
        let dir = tempfile::tempdir().unwrap();
        let tests = u32::try_from(TIMELINE_REPORTS).unwrap() + 50;
        let (path, live, agent) = recorded_run(dir.path(), tests).await;
        for live in [&live[..], &[]] {
            let page = page(&path, "run-1", live, &agent);
            assert_eq!(page["truncated"], true);
            assert_eq!(page["shown_reports"], TIMELINE_REPORTS);
            // Only the tests shown are named: the oldest 50 are left out.
            let names = page["timeline"]["tests"].as_array().unwrap();
            assert!(names.len() <= TIMELINE_REPORTS + 1, "{}", names.len());
            assert!(!names.iter().any(|n| n == "t.py::test_0"));
            assert!(names
                .iter()
                .any(|n| *n == format!("t.py::test_{}", tests - 1)));
        }
    }

    #[test]
    fn cut_keeps_short_text_and_marks_long_text() {
        assert_eq!(cut("short", 10), "short");
        let long = "é".repeat(10);
        let text = cut(&long, 5);
        assert!(text.starts_with("éé\n"), "{text}");
        assert!(text.contains("more bytes"));
    }
}
