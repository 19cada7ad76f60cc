//! `run --junit-xml` and `run --trace-json`: the JUnit file validates against the Jenkins JUnit
//! schema and says what plain pytest's own `--junitxml` says about the same project; the trace
//! is JSON with one named track per worker holding every phase of every test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use fly_tests::db::FlyDb;
use fly_tests::paths::{fly_binary, python};
use fly_tests::process::{Finished, Proc};
use fly_tests::pytest::{junit_key, parse_junit, run_plain_pytest};
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;
use serde_json::Value;

/// `fly-coordinator run --local --workers 2` in `project` with extra `run` options.
fn run_with(
    project: &Path,
    db: &Path,
    options: &[&dyn AsRef<std::ffi::OsStr>],
    pytest_args: &[&str],
) -> Finished {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--local", "--workers", "2", "--db"])
        .arg(db)
        .arg("--python")
        .arg(python());
    for option in options {
        command.arg(option);
    }
    command
        .arg("--")
        .args(pytest_args)
        .current_dir(project)
        .env_remove("FLY_GATE_FILE")
        .env_remove("FLY_FIXTURE_LOG_DIR")
        .env_remove("PYTEST_ADDOPTS")
        .env_remove("PYTEST_XDIST_WORKER")
        .env("PYTHONIOENCODING", "utf-8");
    Proc::spawn("fly-coordinator run --junit-xml --trace-json", &mut command).wait(HANG_GUARD)
}

fn junit_schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("junit")
}

/// Validates `file` against `schema` (in `tests/fixtures/junit`) with Python's xmlschema.
fn assert_valid(schema: &str, file: &Path) {
    let dir = junit_schemas();
    let check = Proc::spawn(
        "xmlschema",
        Command::new(python())
            .arg(dir.join("validate.py"))
            .arg(dir.join(schema))
            .arg(file),
    )
    .wait(HANG_GUARD);
    assert_eq!(
        check.code,
        Some(0),
        "{} does not validate against {schema} (xmlschema comes from \
         `.venv/bin/pip install -r tests/requirements.txt`)\n{}",
        file.display(),
        check.describe()
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The `<testsuite>` counts of a JUnit file, and how many testcases it holds.
#[derive(Debug, PartialEq, Eq)]
struct SuiteCounts {
    tests: u32,
    failures: u32,
    errors: u32,
    skipped: u32,
    testcases: u32,
}

fn suite_counts(xml: &str) -> SuiteCounts {
    let doc = roxmltree::Document::parse(xml).expect("well-formed JUnit XML");
    let suite = doc
        .descendants()
        .find(|n| n.has_tag_name("testsuite"))
        .expect("a <testsuite>");
    let count = |name: &str| -> u32 {
        suite
            .attribute(name)
            .unwrap_or_else(|| panic!("<testsuite> has no {name}"))
            .parse()
            .unwrap_or_else(|e| panic!("<testsuite {name}>: {e}"))
    };
    SuiteCounts {
        tests: count("tests"),
        failures: count("failures"),
        errors: count("errors"),
        skipped: count("skipped"),
        testcases: suite
            .children()
            .filter(|n| n.has_tag_name("testcase"))
            .count() as u32,
    }
}

/// Each testcase's result element (`failure`, `error`, `skipped`) with its message, its
/// properties and its captured stdout, by (classname, name).
#[derive(Debug, Default)]
struct Case {
    result: Option<(String, String)>,
    properties: BTreeMap<String, String>,
    system_out: String,
    text: String,
}

fn cases(xml: &str) -> BTreeMap<(String, String), Case> {
    let doc = roxmltree::Document::parse(xml).expect("well-formed JUnit XML");
    let mut cases = BTreeMap::new();
    for node in doc.descendants().filter(|n| n.has_tag_name("testcase")) {
        let key = (
            node.attribute("classname").unwrap_or_default().to_string(),
            node.attribute("name").unwrap_or_default().to_string(),
        );
        let mut case = Case::default();
        for child in node.children().filter(|c| c.is_element()) {
            match child.tag_name().name() {
                tag @ ("failure" | "error" | "skipped") => {
                    let message = child.attribute("message").unwrap_or_default();
                    case.result = Some((tag.to_string(), message.to_string()));
                    case.text = child.text().unwrap_or_default().to_string();
                }
                "properties" => {
                    for property in child.children().filter(|c| c.has_tag_name("property")) {
                        case.properties.insert(
                            property.attribute("name").unwrap_or_default().to_string(),
                            property.attribute("value").unwrap_or_default().to_string(),
                        );
                    }
                }
                "system-out" => case.system_out = child.text().unwrap_or_default().to_string(),
                _ => {}
            }
        }
        cases.insert(key, case);
    }
    cases
}

#[test]
fn junit_and_trace_files_describe_the_run_as_pytest_and_perfetto_expect() {
    let sandbox = Sandbox::new("export");
    let project = sandbox.copy_project("project");
    let pytest_xml = sandbox.path("pytest-junit.xml");
    let oracle = run_plain_pytest(
        &python(),
        &project,
        &["."],
        &pytest_xml,
        &sandbox.dir("pytest-fixture-logs"),
    );

    let db_path = sandbox.path("fly.db");
    // A directory that does not exist yet: it is created, as pytest creates its own.
    let junit = sandbox.path("reports").join("fly-junit.xml");
    let trace = sandbox.path("fly-trace.json");
    let run = run_with(
        &project,
        &db_path,
        &[&"--junit-xml", &junit, &"--trace-json", &trace],
        &["."],
    );
    assert_eq!(run.code, Some(oracle.exit_code), "{}", run.describe());

    // The schema: the vendored junit-10.xsd accepts pytest's own file, and fly's file
    // validates against it with fly's two documented additions (fly-junit.xsd).
    assert_valid("junit-10.xsd", &pytest_xml);
    assert_valid("fly-junit.xsd", &junit);

    // The counts and the testcases are pytest's.
    let fly_xml = read(&junit);
    let pytest_text = read(&pytest_xml);
    let ours = suite_counts(&fly_xml);
    let theirs = suite_counts(&pytest_text);
    assert_eq!(
        (ours.failures, ours.errors, ours.skipped),
        (theirs.failures, theirs.errors, theirs.skipped),
        "fly {ours:?}\npytest {theirs:?}"
    );
    // pytest's `tests` counts a passing test with a teardown error twice (once passed, once
    // error) though it writes one testcase for it; fly counts testcases.
    assert_eq!(ours.tests, ours.testcases);
    assert_eq!(
        ours.testcases, theirs.testcases,
        "fly {ours:?}\npytest {theirs:?}"
    );
    let verdicts = parse_junit(&fly_xml).unwrap_or_else(|e| panic!("{e}\n{fly_xml}"));
    assert_eq!(verdicts, oracle.verdicts, "fly's verdicts, then pytest's");

    // Messages are pytest's (fly keeps the first line of a multi-line failure message).
    let fly_cases = cases(&fly_xml);
    let pytest_cases = cases(&pytest_text);
    for (key, theirs) in &pytest_cases {
        let ours = &fly_cases[key];
        match (&ours.result, &theirs.result) {
            (None, None) => {}
            (Some((tag, message)), Some((pytest_tag, pytest_message))) => {
                assert_eq!(tag, pytest_tag, "{key:?}");
                assert!(
                    !message.is_empty() && pytest_message.starts_with(message.as_str()),
                    "{key:?}: fly says {message:?}, pytest {pytest_message:?}"
                );
            }
            (ours, theirs) => panic!("{key:?}: fly {ours:?}, pytest {theirs:?}"),
        }
    }
    let failing = &fly_cases[&("test_basic".into(), "test_fails".into())];
    assert!(
        failing
            .text
            .contains("assert left == \"right-side-deliberate-failure\""),
        "the traceback is the failure's text: {failing:?}"
    );
    let printing = &fly_cases[&("test_output".into(), "test_fails_after_printing".into())];
    assert!(
        printing
            .system_out
            .matches("printed-before-failing")
            .count()
            == 1,
        "captured stdout is the testcase's system-out: {printing:?}"
    );

    // Properties name who ran each test, as the database records it.
    let db = FlyDb::open_or_panic(&db_path);
    let run_id = db.run_id();
    let results = db
        .query(
            "results",
            "SELECT nodeid, agent_id, worker, attempts FROM results WHERE run_id = ?1",
            &[&run_id],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(results.len(), oracle.collection.len());
    let mut who_ran: BTreeMap<String, (String, String)> = BTreeMap::new();
    for row in &results {
        let nodeid = row.text("nodeid");
        let case = &fly_cases[&junit_key(&nodeid)];
        let expected: BTreeMap<String, String> = [
            ("agent", row.text("agent_id")),
            ("worker", row.text("worker")),
            ("attempts", row.text("attempts")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(case.properties, expected, "{nodeid}");
        who_ran.insert(nodeid, (row.text("agent_id"), row.text("worker")));
    }

    // The trace: one named track per worker, every phase a complete slice on its track.
    let trace_text = read(&trace);
    let trace: Value = serde_json::from_str(&trace_text).expect("the trace is JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    let track = |e: &Value| (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap());
    let slices: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let tracks: BTreeSet<(u64, u64)> = slices.iter().map(|e| track(e)).collect();
    assert_eq!(tracks.len(), 2, "one track per worker: {tracks:?}");
    let name_of = |kind: &str, key: (u64, u64)| -> String {
        events
            .iter()
            .find(|e| {
                e["ph"] == "M"
                    && e["name"] == kind
                    && e["pid"].as_u64() == Some(key.0)
                    && (kind == "process_name" || e["tid"].as_u64() == Some(key.1))
            })
            .and_then(|e| e["args"]["name"].as_str())
            .unwrap_or_else(|| panic!("no {kind} for track {key:?}"))
            .to_string()
    };
    // (agent, worker) as the track names say, for each track.
    let labels: BTreeMap<(u64, u64), (String, String)> = tracks
        .iter()
        .map(|&key| {
            let process = name_of("process_name", key);
            let thread = name_of("thread_name", key);
            let agent = process
                .strip_prefix("agent ")
                .expect("agent <id>")
                .to_string();
            let worker = thread
                .strip_prefix("worker ")
                .expect("worker <n>")
                .to_string();
            (key, (agent, worker))
        })
        .collect();
    let workers: BTreeSet<&String> = labels.values().map(|(_, worker)| worker).collect();
    assert_eq!(
        workers.len(),
        2,
        "the tracks are two different workers: {labels:?}"
    );
    for slice in &slices {
        let dur = slice["dur"]
            .as_f64()
            .expect("a complete slice has a duration");
        assert!(dur >= 0.0 && slice["ts"].as_f64().is_some(), "{slice}");
    }

    let reports = db
        .query(
            "reports",
            "SELECT nodeid, phase FROM reports WHERE run_id = ?1 AND superseded = 0",
            &[&run_id],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(reports.len() >= oracle.collection.len() * 2);
    for report in &reports {
        let (nodeid, phase) = (report.text("nodeid"), report.text("phase"));
        let slice = slices
            .iter()
            .find(|e| {
                e["cat"] == "phase"
                    && e["name"] == phase.as_str()
                    && e["args"]["nodeid"] == nodeid.as_str()
            })
            .unwrap_or_else(|| panic!("no {phase} slice for {nodeid}"));
        assert_eq!(
            &labels[&track(slice)],
            &who_ran[&nodeid],
            "{nodeid} {phase} is on its worker's track"
        );
    }
    for nodeid in &oracle.collection {
        let test = slices
            .iter()
            .find(|e| e["cat"] == "test" && e["name"] == nodeid.as_str())
            .unwrap_or_else(|| panic!("no slice for {nodeid}"));
        assert_eq!(&labels[&track(test)], &who_ran[nodeid]);
    }
}

#[test]
fn a_run_that_selects_nothing_still_leaves_an_empty_junit_suite() {
    let sandbox = Sandbox::new("export-empty");
    let project = sandbox.copy_project("project");
    let junit = sandbox.path("junit.xml");
    let trace = sandbox.path("trace.json");
    let run = run_with(
        &project,
        &sandbox.path("fly.db"),
        &[&"--junit-xml", &junit, &"--trace-json", &trace],
        &["-k", "no_test_has_this_name"],
    );
    assert_eq!(
        run.code,
        Some(5),
        "pytest's 'no tests ran'\n{}",
        run.describe()
    );
    assert_valid("fly-junit.xsd", &junit);
    let counts = suite_counts(&read(&junit));
    assert_eq!(
        counts,
        SuiteCounts {
            tests: 0,
            failures: 0,
            errors: 0,
            skipped: 0,
            testcases: 0
        }
    );
    assert!(!trace.exists(), "an empty trace is not written");
    assert!(
        run.stderr.contains("did not write the trace"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_report_that_cannot_be_written_fails_a_passing_run_but_keeps_a_failing_runs_code() {
    let sandbox = Sandbox::new("export-unwritable");
    let project = sandbox.copy_project("project");
    // A path under a regular file can never be created.
    let blocker = sandbox.path("not-a-directory");
    std::fs::write(&blocker, "x").expect("write the blocker file");
    let junit = blocker.join("junit.xml");

    let passing = run_with(
        &project,
        &sandbox.path("passing.db"),
        &[&"--junit-xml", &junit],
        &["test_basic.py::test_passes"],
    );
    assert_eq!(passing.code, Some(3), "{}", passing.describe());
    assert!(
        passing
            .stderr
            .contains("cannot write the JUnit XML report to")
            && passing.stderr.contains("not-a-directory"),
        "{}",
        passing.describe()
    );
    assert!(
        passing.stdout.contains("1 passed"),
        "{}",
        passing.describe()
    );

    let failing = run_with(
        &project,
        &sandbox.path("failing.db"),
        &[&"--junit-xml", &junit],
        &["test_basic.py::test_fails"],
    );
    assert_eq!(failing.code, Some(1), "{}", failing.describe());
    assert!(
        failing
            .stderr
            .contains("cannot write the JUnit XML report to"),
        "{}",
        failing.describe()
    );
}
