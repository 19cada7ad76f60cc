//! The assertions every complete run of the fixture project makes: fly agrees with plain pytest
//! on the same project (exit code, summary counts, each test's verdict, the collection with its
//! odd node ids), records every phase of every test in SQLite, shows failures the way pytest
//! does, and its workers honour pytest's fixture contract.

use std::collections::BTreeMap;
use std::path::Path;

use crate::db::{FlyDb, Row};
use crate::fixture_log::{self, ProcessLog};
use crate::process::Finished;
use crate::pytest::{junit_key, parse_summary_line, JunitVerdict, PlainPytest};

/// Text the fixture project's failing tests and fixtures raise; each must reach the user.
pub const FAILURE_MARKERS: [&str; 5] = [
    "right-side-deliberate-failure",
    "broken-setup-deliberate",
    "broken-teardown-deliberate",
    "failure-with-captured-output",
    "strict-xpass-deliberate",
];

/// Node ids of the fixture project that a runner could easily mangle. pytest escapes the
/// non-ASCII parameter id to backslash sequences, and keeps the non-ASCII function name.
pub const ODD_NODEIDS: [&str; 6] = [
    r"test_odd_ids.py::test_ids[unicode-\xe9-\u2713-\u65e5\u672c]",
    "test_odd_ids.py::test_ids[with space]",
    "test_odd_ids.py::test_ids[brackets[inner]]",
    "test_odd_ids.py::test_ids[colons::inside]",
    "test_odd_ids.py::test_ids[quote'and\"double]",
    "test_odd_ids.py::test_café",
];

/// What a checked run left in the database, for checks specific to one test.
pub struct CheckedRun {
    pub run_id: String,
    pub results: Vec<Row>,
}

/// Asserts that the fly run `fly` (its database at `db_path`, its fixture logs in `fly_logs`)
/// agrees with plain pytest's run `oracle` (fixture logs in `oracle_logs`) on the same project.
pub fn assert_run_matches_pytest(
    fly: &Finished,
    db_path: &Path,
    fly_logs: &Path,
    oracle: &PlainPytest,
    oracle_logs: &Path,
) -> CheckedRun {
    assert_output_matches(fly, oracle);
    let checked = assert_database_matches(db_path, oracle);
    assert_fixture_logs_match(
        &read_logs(fly_logs),
        &read_logs(oracle_logs),
        &oracle.collection,
    );
    checked
}

/// What the user sees: pytest's exit code, pytest's summary line last with the same counts,
/// and every failure shown under pytest's FAILURES / ERRORS headers.
pub fn assert_output_matches(run: &Finished, oracle: &PlainPytest) {
    let described = run.describe();
    assert_eq!(
        run.code,
        Some(oracle.exit_code),
        "exit code differs from plain pytest's\n{described}"
    );
    let counts = parse_summary_line(run.last_stdout_line()).unwrap_or_else(|| {
        panic!(
            "the last stdout line is not a pytest summary line: {:?}\n{described}",
            run.last_stdout_line()
        )
    });
    assert_eq!(
        counts,
        oracle.counts,
        "summary line counts differ from plain pytest's ({:?})\n{described}",
        oracle.run.last_stdout_line()
    );
    if oracle.counts.get("failed").copied().unwrap_or(0) > 0 {
        assert!(
            run.stdout.contains(" FAILURES "),
            "no FAILURES header in the output\n{described}"
        );
    }
    if oracle.counts.get("error").copied().unwrap_or(0) > 0 {
        assert!(
            run.stdout.contains(" ERRORS "),
            "no ERRORS header in the output\n{described}"
        );
    }
    let missing: Vec<&str> = FAILURE_MARKERS
        .iter()
        .copied()
        .filter(|marker| !run.stdout.contains(marker))
        .collect();
    assert!(
        missing.is_empty(),
        "the output does not show these failures: {missing:?}\n{described}"
    );
}

/// What fly recorded in SQLite: the run's exit code and collection, one result per test with
/// plain pytest's verdict, and every phase report.
pub fn assert_database_matches(db_path: &Path, oracle: &PlainPytest) -> CheckedRun {
    let db = FlyDb::open_or_panic(db_path);
    let run_id = db.run_id();
    let run = db.run(&run_id);
    assert_eq!(
        run.int("exit_code"),
        Some(i64::from(oracle.exit_code)),
        "runs.exit_code"
    );
    assert_eq!(
        run.int("collected"),
        i64::try_from(oracle.collection.len()).ok(),
        "runs.collected"
    );

    let collection: Vec<String> = db
        .run_tests(&run_id)
        .iter()
        .map(|row| row.text("nodeid"))
        .collect();
    assert_eq!(
        collection, oracle.collection,
        "fly's collection (run_tests, by test_index) differs from `pytest --collect-only`"
    );
    for odd in ODD_NODEIDS {
        assert!(
            collection.iter().any(|nodeid| nodeid == odd),
            "node id {odd:?} did not survive: {collection:#?}"
        );
    }

    let results = db.results(&run_id);
    assert_eq!(
        results.len(),
        collection.len(),
        "results should hold one row per collected test"
    );
    let mut wrong = Vec::new();
    for (row, nodeid) in results.iter().zip(&collection) {
        let recorded = row.text("nodeid");
        if &recorded != nodeid {
            wrong.push(format!(
                "test_index {}: results.nodeid {recorded:?}, run_tests says {nodeid:?}",
                row.text("test_index")
            ));
            continue;
        }
        let outcome = row.text("outcome");
        let expected = oracle.verdicts.get(&junit_key(nodeid));
        let actual = JunitVerdict::from_outcome(&outcome);
        if actual.is_none() || actual.as_ref() != expected {
            wrong.push(format!(
                "{nodeid}: fly says {outcome:?}, plain pytest's JUnit XML says {expected:?}"
            ));
        }
        if row.int("attempts").unwrap_or(0) < 1 {
            wrong.push(format!("{nodeid}: attempts is {:?}", row.text("attempts")));
        }
    }
    assert!(
        wrong.is_empty(),
        "fly's per-test outcomes differ from plain pytest's:\n{}",
        wrong.join("\n")
    );

    assert_every_phase_recorded(&db, &run_id, &collection);

    CheckedRun { run_id, results }
}

/// The fixture contract, on the oracle's logs first (which proves the checker right on this
/// project) and then on every worker of the run under test; every collected test started
/// exactly once, the same tests got their fixtures set up as under plain pytest, and each
/// worker saw `PYTEST_XDIST_WORKER=gwN`.
pub fn assert_fixture_logs_match(
    logs: &[ProcessLog],
    oracle_logs: &[ProcessLog],
    collection: &[String],
) {
    fixture_log::assert_fixture_contract("plain pytest", oracle_logs);
    fixture_log::assert_fixture_contract("the run under test", logs);
    let started = fixture_log::tally(logs, false);
    let once: BTreeMap<String, u32> = collection.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(
        started, once,
        "every collected test should start exactly once over all workers"
    );
    assert_eq!(
        fixture_log::tally(logs, true),
        fixture_log::tally(oracle_logs, true),
        "the workers set up fixtures for other tests than plain pytest did"
    );
    for (pid, names) in fixture_log::worker_names(logs) {
        let well_named = names.iter().all(|name| {
            name.strip_prefix("gw")
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        });
        assert!(
            !names.is_empty() && well_named,
            "worker pid {pid} saw PYTEST_XDIST_WORKER {names:?}, expected gwN"
        );
    }
}

/// Reads the fixture logs in `dir`, failing the test when they cannot be read.
pub fn read_logs(dir: &Path) -> Vec<ProcessLog> {
    fixture_log::read_logs(dir).unwrap_or_else(|e| panic!("fixture logs: {e}"))
}

/// Every test has one setup and one teardown report, and one call report exactly when its
/// setup passed.
fn assert_every_phase_recorded(db: &FlyDb, run_id: &str, collection: &[String]) {
    let mut phases: BTreeMap<i64, Vec<(String, String)>> = BTreeMap::new();
    for row in db.reports(run_id) {
        let index = row
            .int("test_index")
            .unwrap_or_else(|| panic!("reports row without a test_index: {row:?}"));
        phases
            .entry(index)
            .or_default()
            .push((row.text("phase"), row.text("outcome")));
    }
    let mut wrong = Vec::new();
    for (index, nodeid) in collection.iter().enumerate() {
        let reports = i64::try_from(index)
            .ok()
            .and_then(|index| phases.get(&index))
            .cloned()
            .unwrap_or_default();
        let of = |phase: &str| -> Vec<&str> {
            reports
                .iter()
                .filter(|(p, _)| p == phase)
                .map(|(_, outcome)| outcome.as_str())
                .collect()
        };
        let (setup, call, teardown) = (of("setup"), of("call"), of("teardown"));
        let calls_expected = usize::from(setup == ["passed"]);
        if setup.len() != 1 || teardown.len() != 1 || call.len() != calls_expected {
            wrong.push(format!(
                "{nodeid}: setup {setup:?}, call {call:?}, teardown {teardown:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "reports should hold a setup and a teardown row for every test, and a call row for \
         every test whose setup passed:\n{}",
        wrong.join("\n")
    );
}
