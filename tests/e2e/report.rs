//! Reading the record back: after two `run --local --workers 2` runs of the fixture project,
//! `report --html` writes a page showing both workers, every test and the failures'
//! tracebacks; `runs` lists both runs with pytest's summary; `slowest` shows each slow test's
//! duration in both runs; `flaky` finds nothing in a deterministic project.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use fly_tests::check::{FAILURE_MARKERS, ODD_NODEIDS};
use fly_tests::db::FlyDb;
use fly_tests::fly;
use fly_tests::paths::fly_binary;
use fly_tests::process::{Finished, Proc};
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;

const SUMMARY: &str = "4 failed, 45 passed, 3 skipped, 1 xfailed, 1 xpassed, 2 errors";

/// `fly-coordinator ARGS` in `cwd`, to completion.
fn coordinator(cwd: &Path, args: &[&str]) -> Finished {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command.args(args).current_dir(cwd).env_remove("FLY_DB");
    let name = format!("fly-coordinator {}", args.first().copied().unwrap_or(""));
    Proc::spawn(&name, &mut command).wait(HANG_GUARD)
}

/// The JSON the page embeds for its timeline.
/// The latest run's failing phase reports, to explain a failed count.
fn failing_reports(db: &Path) -> String {
    let record = FlyDb::open_or_panic(db);
    let run_id = record.run_id();
    let rows = record.query(
        "reports",
        "SELECT nodeid, lease, phase, category, superseded FROM reports
         WHERE run_id = ?1 AND (category IN ('failed', 'error') OR outcome = 'failed')",
        &[&run_id],
    );
    format!("{rows:#?}")
}

fn embedded_data(page: &str) -> serde_json::Value {
    let open = "<script id=\"fly-data\" type=\"application/json\">";
    let start = page.find(open).expect("the page embeds its data") + open.len();
    let end = start + page[start..].find("</script>").expect("a closed script");
    serde_json::from_str(&page[start..end]).expect("the embedded data is JSON")
}

#[test]
fn report_runs_and_slowest_show_what_the_runs_did() {
    let sandbox = Sandbox::new("report");
    let project = sandbox.copy_project("project");
    let db = sandbox.path("fly.db");
    let mut run_ids = Vec::new();
    for round in 1..=2 {
        let run = fly::run_local(&project, &db, None, &["."]).wait(HANG_GUARD);
        assert_eq!(run.code, Some(1), "run {round}\n{}", run.describe());
        run_ids.push(FlyDb::open_or_panic(&db).run_id());
    }
    assert_ne!(run_ids[0], run_ids[1]);
    let db_arg = db.to_str().expect("a UTF-8 temp path");

    // report --html
    let html = sandbox.path("out.html");
    let report = coordinator(
        &project,
        &[
            "report",
            "--db",
            db_arg,
            "--html",
            html.to_str().expect("UTF-8"),
        ],
    );
    assert_eq!(report.code, Some(0), "{}", report.describe());
    assert!(
        report.stdout.contains(&run_ids[1]) && report.stdout.contains("55 tests on 2 workers"),
        "the latest run is reported: {}",
        report.describe()
    );
    let page = std::fs::read_to_string(&html).expect("the report was written");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page needs no network"
    );
    let data = embedded_data(&page);
    let lanes = data["lanes"].as_array().expect("lanes");
    assert_eq!(lanes.len(), 2, "one lane per worker");
    // Both workers have a lane; which of them ran which tests is the scheduler's call (on a
    // loaded machine one worker can finish everything before the other is ready).
    let mut tests = HashSet::new();
    for lane in lanes {
        let bars = lane["bars"].as_array().expect("bars");
        for bar in bars {
            tests.insert(bar[0].as_u64().expect("test index"));
        }
    }
    assert_eq!(tests.len(), 55, "every test has a bar");
    let nodeids: Vec<&str> = data["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    for odd in ODD_NODEIDS {
        assert!(nodeids.contains(&odd), "{odd} survives the page intact");
    }
    for marker in FAILURE_MARKERS {
        assert!(page.contains(marker), "the page shows the failure {marker}");
    }
    // Four failed calls, a setup error and a teardown error.
    assert!(
        page.contains("Failures (6)"),
        "six failing phases; the page has {:?}\n{}",
        page.find("Failures (")
            .map(|at| &page[at..(at + 16).min(page.len())]),
        failing_reports(&db)
    );
    assert!(page.contains(SUMMARY));
    let utilization = data["stats"]["overall_utilization"]
        .as_f64()
        .expect("utilization");
    assert!(utilization > 0.0 && utilization <= 1.0, "{utilization}");

    // runs
    let runs = coordinator(&project, &["runs", "--db", db_arg]);
    assert_eq!(runs.code, Some(0), "{}", runs.describe());
    let lines: Vec<&str> = runs.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two runs:\n{}", runs.stdout);
    assert!(
        lines[1].starts_with(&run_ids[1]),
        "newest first:\n{}",
        runs.stdout
    );
    assert!(lines[2].starts_with(&run_ids[0]), "{}", runs.stdout);
    for line in &lines[1..] {
        assert!(
            line.contains("project") && line.contains("failed"),
            "{line}"
        );
        assert!(line.contains(" 55 ") && line.ends_with(SUMMARY), "{line}");
    }

    // slowest
    let slowest = coordinator(&project, &["slowest", "--db", db_arg, "--limit", "5"]);
    assert_eq!(slowest.code, Some(0), "{}", slowest.describe());
    let text = &slowest.stdout;
    assert!(text.contains("in its last 2 run(s)"), "{text}");
    let header = text
        .lines()
        .find(|l| l.trim_end().ends_with("TEST"))
        .unwrap_or_else(|| panic!("a table header:\n{text}"));
    assert!(
        header.contains(&run_ids[0][..8]) && header.contains(&run_ids[1][..8]),
        "a column per run: {header}"
    );
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with("TREND:"))
        .collect();
    assert_eq!(rows.len(), 5, "{text}");
    for row in rows {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert!(cells.len() >= 4, "{row}");
        // Both runs ran every test: two durations, and a trend in percent.
        assert!(cells[..2].iter().all(|c| *c != "-"), "{row}");
        assert!(cells[2].ends_with('%'), "{row}");
        assert!(nodeids.contains(&cells[3..].join(" ").as_str()), "{row}");
    }

    // flaky: the fixture project is deterministic.
    let flaky = coordinator(&project, &["flaky", "--db", db_arg]);
    assert_eq!(flaky.code, Some(0), "{}", flaky.describe());
    assert!(
        flaky.stdout.contains("in its last 2 run(s)") && flaky.stdout.contains("\nnone"),
        "{}",
        flaky.stdout
    );
}
