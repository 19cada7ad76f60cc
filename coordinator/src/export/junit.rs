//! `run --junit-xml`: the run as JUnit XML, in the shape pytest's own `--junitxml` writes
//! (suite "pytest", one testcase per test named the way pytest names it), so CI systems and
//! dashboards that read pytest's file read fly's the same way.
//!
//! What goes where:
//! - `failed` -> `<failure message=...>` with the traceback; `error` (a setup or teardown
//!   error) -> `<error message="failed on setup with ...">`; `skipped` -> `<skipped
//!   type="pytest.skip">`; `xfailed` -> `<skipped type="pytest.xfail">`; `passed` and
//!   `xpassed` pass (a strict xpass arrives as `failed`, as pytest reports it).
//! - Captured stdout and log sections -> `<system-out>`, stderr -> `<system-err>` (the
//!   coordinator sends captured output with failures and errors only).
//! - Properties `agent`, `worker`, `attempts`: who ran the attempt that counts, and how many
//!   attempts the test took (more than one when a worker crashed or an agent left mid-test;
//!   only the final attempt's reports reach the client, so earlier attempts are counted, not
//!   shown as `<rerunFailure>`).
//!
//! Differences from pytest's file: pytest writes a test whose call fails and whose teardown
//! errors as two testcases; fly writes one failure whose text carries the teardown error too.
//! pytest's suite `tests` count includes a passing test with a teardown error twice; fly's
//! counts each testcase once. Schema-wise, fly adds what the Jenkins schema (junit-10.xsd)
//! lacks: `properties` inside a testcase (as pytest's `record_property` writes) and a `skipped`
//! count on `<testsuites>` (as quick-junit and cargo-nextest write).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, FixedOffset, Utc};
use fly_common::outcome::Phase;
use fly_common::proto::{PhaseResult, RunFinished, TestResult};
use quick_junit::{
    NonSuccessKind, Property, Report, SerializeError, TestCase, TestCaseStatus, TestSuite,
};

use super::Collector;

/// The `<testsuites name>` pytest writes.
pub const REPORT_NAME: &str = "pytest tests";
/// The `<testsuite name>` pytest writes.
pub const SUITE_NAME: &str = "pytest";

/// The run as a JUnit report: one suite, one testcase per test in collection order.
pub fn report(run: &Collector, finished: &RunFinished) -> Report {
    let mut suite = TestSuite::new(SUITE_NAME);
    suite.set_timestamp(to_datetime(run.submitted()));
    suite.set_time(seconds(finished.wall_seconds));
    if !run.run_id().is_empty() {
        suite.add_property(Property::new("run_id", xml_text(run.run_id())));
    }
    for result in run.results_in_collection_order() {
        suite.add_test_case(test_case(result));
    }
    if run.is_empty() && !finished.output.trim().is_empty() {
        // The run ended before any test ran (a usage or collection error): keep pytest's
        // explanation with the empty suite, where a CI page shows it.
        suite.set_system_err(xml_text(&finished.output));
    }
    let mut report = Report::new(REPORT_NAME);
    report.set_time(seconds(finished.wall_seconds));
    report.add_test_suite(suite);
    report
}

/// The report as UTF-8 XML bytes.
pub fn to_xml(report: &Report) -> Result<Vec<u8>, SerializeError> {
    let mut out = Vec::new();
    report.serialize(&mut out)?;
    Ok(out)
}

/// One test's testcase.
pub fn test_case(result: &TestResult) -> TestCase {
    let (classname, name) = junit_names(&result.nodeid);
    let mut case = TestCase::new(xml_text(&name), status(result));
    case.set_classname(xml_text(&classname));
    let duration = if result.phases.is_empty() {
        result.duration
    } else {
        result.phases.iter().map(|p| p.duration).sum()
    };
    case.set_time(seconds(duration));
    let started = result
        .phases
        .iter()
        .map(|p| p.start)
        .filter(|start| start.is_finite() && *start > 0.0)
        .reduce(f64::min);
    if let Some(started) = started.and_then(epoch_datetime) {
        case.set_timestamp(started);
    }
    case.add_property(Property::new("agent", xml_text(&result.agent_id)));
    case.add_property(Property::new("worker", result.worker.to_string()));
    case.add_property(Property::new(
        "attempts",
        result.attempts.max(1).to_string(),
    ));

    let mut out = String::new();
    let mut err = String::new();
    // pytest repeats the sections of earlier phases in each later report ("Captured stdout
    // call" comes again with the teardown): each section once.
    let mut seen = std::collections::HashSet::new();
    for phase in &result.phases {
        for section in phase
            .sections
            .iter()
            .filter(|s| seen.insert(s.name.as_str()))
        {
            let target = if section.name.contains("stderr") {
                &mut err
            } else {
                &mut out
            };
            // pytest's own header for captured output: the section's name centred in dashes.
            let _ = writeln!(target, "{:-^80}", format!(" {} ", section.name));
            target.push_str(&section.text);
            if !section.text.ends_with('\n') {
                target.push('\n');
            }
        }
    }
    if !out.is_empty() {
        case.set_system_out(xml_text(&out));
    }
    if !err.is_empty() {
        case.set_system_err(xml_text(&err));
    }
    case
}

/// The testcase status for a test's final outcome, with pytest's messages.
fn status(result: &TestResult) -> TestCaseStatus {
    let with_category = |category: &str| result.phases.iter().find(|p| p.category == category);
    match result.outcome.as_str() {
        "failed" => {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            let mut text = String::new();
            if let Some(phase) = with_category("failed") {
                let message = summary(phase);
                if !message.is_empty() {
                    status.set_message(xml_text(message));
                }
                text.push_str(&phase.longrepr);
            }
            // A setup or teardown error besides the failure (pytest writes a second testcase
            // for it): one testcase per test here, so its report follows the failure's.
            for phase in result.phases.iter().filter(|p| p.category == "error") {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                let _ = writeln!(text, "{}", error_message(phase));
                text.push_str(&phase.longrepr);
            }
            if !text.is_empty() {
                status.set_description(xml_text(&text));
            }
            status
        }
        "error" => {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
            match with_category("error") {
                Some(phase) => {
                    status.set_message(xml_text(&error_message(phase)));
                    if !phase.longrepr.is_empty() {
                        status.set_description(xml_text(&phase.longrepr));
                    }
                }
                None => {
                    status.set_message("the test finished without a report of its phases");
                }
            }
            status
        }
        "skipped" => {
            let mut status = TestCaseStatus::skipped();
            status.set_type("pytest.skip");
            if let Some(phase) = with_category("skipped") {
                if !phase.message.is_empty() {
                    status.set_message(xml_text(&phase.message));
                }
            }
            status
        }
        "xfailed" => {
            let mut status = TestCaseStatus::skipped();
            status.set_type("pytest.xfail");
            if let Some(phase) = with_category("xfailed") {
                if !phase.message.is_empty() {
                    status.set_message(xml_text(&phase.message));
                }
            }
            status
        }
        // "passed", "xpassed" (non-strict: pytest's file records it as passing).
        _ => TestCaseStatus::success(),
    }
}

/// pytest's message for a setup or teardown error: `failed on teardown with "<reason>"`.
fn error_message(phase: &PhaseResult) -> String {
    let when = Phase::from_proto(phase.phase)
        .map(|p| p.as_str())
        .unwrap_or("setup");
    format!("failed on {when} with \"{}\"", summary(phase))
}

/// A report's one-line summary: its message, else the last line of its traceback (where
/// Python names the exception).
fn summary(phase: &PhaseResult) -> &str {
    if !phase.message.is_empty() {
        return &phase.message;
    }
    phase
        .longrepr
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default()
}

/// The `(classname, name)` pytest's JUnit XML gives a node id (its `mangle_test_address`):
/// parameters are split off first (they may hold `::`, `/` and `.`), the file path becomes a
/// dotted module name without `.py`, classes join the classname, and the name is the last part
/// with its parameters.
pub fn junit_names(nodeid: &str) -> (String, String) {
    let (path, params) = match nodeid.find('[') {
        Some(at) => nodeid.split_at(at),
        None => (nodeid, ""),
    };
    let mut names: Vec<String> = path.split("::").map(str::to_string).collect();
    let module = names[0].replace('/', ".");
    names[0] = match module.strip_suffix(".py") {
        Some(stripped) => stripped.to_string(),
        None => module,
    };
    let mut name = names.pop().unwrap_or_default();
    name.push_str(params);
    (names.join("."), name)
}

/// Text as XML 1.0 can carry it. Characters XML cannot hold at all (most control characters,
/// U+FFFE, U+FFFF) become a visible `#xNN`, as pytest's junitxml writes them, so a reader sees
/// that something was there. Tabs are expanded to the next multiple of eight columns and a
/// lone carriage return becomes a newline, since quick-junit drops both. ANSI colour
/// sequences are left for quick-junit, which removes them whole.
pub fn xml_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut column = 0usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\t' => {
                let spaces = 8 - column % 8;
                out.extend(std::iter::repeat_n(' ', spaces));
                column += spaces;
            }
            '\r' => {
                if chars.peek() != Some(&'\n') {
                    out.push('\n');
                    column = 0;
                }
            }
            '\n' => {
                out.push('\n');
                column = 0;
            }
            '\x1b' => out.push(c),
            c if is_xml_char(c) => {
                out.push(c);
                column += 1;
            }
            c => {
                let before = out.len();
                let _ = write!(out, "#x{:02X}", c as u32);
                column += out.len() - before;
            }
        }
    }
    out
}

/// XML 1.0's `Char` production, less the tab, newline and carriage return handled apart.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// Seconds as a `Duration`; negative, NaN or infinite figures (from a broken report) are 0.
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or_default()
}

fn to_datetime(time: SystemTime) -> DateTime<FixedOffset> {
    DateTime::<Utc>::from(time).fixed_offset()
}

/// Unix epoch seconds as a timestamp; `None` for figures no clock gives.
fn epoch_datetime(epoch: f64) -> Option<DateTime<FixedOffset>> {
    if !epoch.is_finite() || epoch <= 0.0 || epoch >= i64::MAX as f64 {
        return None;
    }
    let secs = epoch.floor();
    let nanos = ((epoch - secs) * 1e9).round().min(999_999_999.0) as u32;
    DateTime::<Utc>::from_timestamp(secs as i64, nanos).map(|t| t.fixed_offset())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::Section;

    fn phase(which: Phase, outcome: &str, category: &str) -> PhaseResult {
        PhaseResult {
            phase: which.to_proto() as i32,
            outcome: outcome.into(),
            category: category.into(),
            duration: 0.25,
            start: 1_800_000_000.5,
            stop: 1_800_000_000.75,
            ..Default::default()
        }
    }

    fn result(nodeid: &str, outcome: &str, phases: Vec<PhaseResult>) -> TestResult {
        TestResult {
            nodeid: nodeid.into(),
            outcome: outcome.into(),
            agent_id: "agent-1".into(),
            worker: 1,
            attempts: 1,
            phases,
            ..Default::default()
        }
    }

    fn xml_of(results: Vec<TestResult>) -> String {
        let mut run = Collector::new();
        for (index, mut result) in results.into_iter().enumerate() {
            result.test_index = index as u32;
            run.add(result);
        }
        let finished = RunFinished {
            wall_seconds: 1.5,
            ..Default::default()
        };
        String::from_utf8(to_xml(&report(&run, &finished)).unwrap()).unwrap()
    }

    #[test]
    fn node_ids_split_the_way_pytest_names_testcases() {
        let cases = [
            ("test_a.py::test_b", ("test_a", "test_b")),
            (
                "pkg/sub/test_a.py::TestX::test_b",
                ("pkg.sub.test_a.TestX", "test_b"),
            ),
            (
                "pkg/test_a.py::TestX::TestInner::test_b[1-2]",
                ("pkg.test_a.TestX.TestInner", "test_b[1-2]"),
            ),
            ("test_a.py::test_p[a::b c]", ("test_a", "test_p[a::b c]")),
            ("test_a.py::test_p[a/b.py]", ("test_a", "test_p[a/b.py]")),
            (
                "test_a.py::test_p[brackets[inner]]",
                ("test_a", "test_p[brackets[inner]]"),
            ),
            ("test_a.py::test_café", ("test_a", "test_café")),
            (
                "test_a.py::test_ids[unicode-\\xe9-\\u2713]",
                ("test_a", "test_ids[unicode-\\xe9-\\u2713]"),
            ),
            ("test_py.py::test_x", ("test_py", "test_x")),
            ("doc.txt", ("", "doc.txt")),
        ];
        for (nodeid, (classname, name)) in cases {
            assert_eq!(
                junit_names(nodeid),
                (classname.to_string(), name.to_string()),
                "{nodeid}"
            );
        }
    }

    #[test]
    fn text_xml_cannot_carry_is_made_visible_and_the_rest_kept() {
        assert_eq!(xml_text("bell\x07 nul\x00 end"), "bell#x07 nul#x00 end");
        assert_eq!(xml_text("\u{FFFE}\u{FFFF}"), "#xFFFE#xFFFF");
        assert_eq!(xml_text("a\tb"), "a       b");
        assert_eq!(xml_text("50%\r100%\r\n"), "50%\n100%\n");
        assert_eq!(xml_text("<&>\"' é ✓ 日本 🎉"), "<&>\"' é ✓ 日本 🎉");
    }

    #[test]
    fn every_outcome_lands_where_pytest_puts_it_and_the_file_stays_valid_xml() {
        let mut failing = phase(Phase::Call, "failed", "failed");
        failing.message = "AssertionError: <1> & \"2\"".into();
        failing.longrepr = "E   assert 1 == 2\x1b[31m red\x1b[0m\x07".into();
        failing.sections = vec![
            Section {
                name: "Captured stdout call".into(),
                text: "out ]]> <tag> \x00\x0b\x0c\u{FFFF} done".into(),
            },
            Section {
                name: "Captured stderr call".into(),
                text: "err\ttab".into(),
            },
        ];
        // pytest's teardown report repeats the sections of the call.
        let mut repeated = phase(Phase::Teardown, "passed", "");
        repeated.sections = failing.sections.clone();
        let mut setup_error = phase(Phase::Setup, "failed", "error");
        setup_error.message = "RuntimeError: broken".into();
        setup_error.longrepr = "raise RuntimeError('broken')".into();
        let mut skip = phase(Phase::Setup, "skipped", "skipped");
        skip.message = "no reason & no way".into();
        let mut xfail = phase(Phase::Call, "skipped", "xfailed");
        xfail.message = "known bug".into();
        let mut teardown_error = phase(Phase::Teardown, "failed", "error");
        teardown_error.message = "RuntimeError: teardown".into();
        let xml = xml_of(vec![
            result(
                "pkg/test_a.py::TestX::test_ok[a::b]",
                "passed",
                vec![phase(Phase::Call, "passed", "passed")],
            ),
            result("test_b.py::test_fails", "failed", vec![failing, repeated]),
            result("test_b.py::test_setup", "error", vec![setup_error]),
            result("test_b.py::test_skip", "skipped", vec![skip]),
            result("test_b.py::test_xfail", "xfailed", vec![xfail]),
            result(
                "test_b.py::test_xpass",
                "xpassed",
                vec![phase(Phase::Call, "passed", "xpassed")],
            ),
            result(
                "test_b.py::test_both",
                "failed",
                vec![phase(Phase::Call, "failed", "failed"), teardown_error],
            ),
        ]);

        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        let suite = doc
            .descendants()
            .find(|n| n.has_tag_name("testsuite"))
            .unwrap();
        assert_eq!(suite.attribute("name"), Some("pytest"));
        assert_eq!(suite.attribute("tests"), Some("7"));
        assert_eq!(suite.attribute("failures"), Some("2"));
        assert_eq!(suite.attribute("errors"), Some("1"));
        assert_eq!(suite.attribute("skipped"), Some("2"));
        assert_eq!(suite.attribute("time"), Some("1.500"));
        let case = |name: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name("testcase") && n.attribute("name") == Some(name))
                .unwrap_or_else(|| panic!("no testcase {name}\n{xml}"))
        };
        let child = |name: &str, tag: &str| {
            case(name)
                .children()
                .find(|c| c.has_tag_name(tag))
                .unwrap_or_else(|| panic!("no <{tag}> in {name}\n{xml}"))
        };

        let ok = case("test_ok[a::b]");
        assert_eq!(ok.attribute("classname"), Some("pkg.test_a.TestX"));
        assert_eq!(ok.attribute("time"), Some("0.250"));
        let properties: Vec<(&str, &str)> = child("test_ok[a::b]", "properties")
            .children()
            .filter(|c| c.has_tag_name("property"))
            .map(|p| (p.attribute("name").unwrap(), p.attribute("value").unwrap()))
            .collect();
        assert_eq!(
            properties,
            [("agent", "agent-1"), ("worker", "1"), ("attempts", "1")]
        );

        let failure = child("test_fails", "failure");
        assert_eq!(
            failure.attribute("message"),
            Some("AssertionError: <1> & \"2\"")
        );
        let text = failure.text().unwrap();
        assert!(text.contains("assert 1 == 2"), "{text}");
        assert!(text.contains(" red#x07"), "colour codes dropped: {text}");
        assert!(!text.contains('\x1b'), "{text}");
        let out = child("test_fails", "system-out").text().unwrap();
        assert_eq!(out.matches("Captured stdout call").count(), 1, "{out}");
        assert!(
            out.contains("out ]]> <tag> #x00#x0B#x0C#xFFFF done"),
            "{out}"
        );
        let err = child("test_fails", "system-err").text().unwrap();
        assert!(err.contains("err     tab"), "{err}");

        assert_eq!(
            child("test_setup", "error").attribute("message"),
            Some("failed on setup with \"RuntimeError: broken\"")
        );
        let skipped = child("test_skip", "skipped");
        assert_eq!(skipped.attribute("type"), Some("pytest.skip"));
        assert_eq!(skipped.attribute("message"), Some("no reason & no way"));
        let xfailed = child("test_xfail", "skipped");
        assert_eq!(xfailed.attribute("type"), Some("pytest.xfail"));
        assert_eq!(xfailed.attribute("message"), Some("known bug"));
        assert!(case("test_xpass")
            .children()
            .all(|c| !c.has_tag_name("failure") && !c.has_tag_name("skipped")));
        let both = child("test_both", "failure").text().unwrap();
        assert!(
            both.contains("failed on teardown with \"RuntimeError: teardown\""),
            "{both}"
        );
    }

    #[test]
    fn an_empty_run_is_an_empty_suite_that_keeps_pytests_explanation() {
        let finished = RunFinished {
            exit_code: 4,
            output: "ERROR: usage: pytest [options]\x1b[0m".into(),
            ..Default::default()
        };
        let xml =
            String::from_utf8(to_xml(&report(&Collector::new(), &finished)).unwrap()).unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let suite = doc
            .descendants()
            .find(|n| n.has_tag_name("testsuite"))
            .unwrap();
        assert_eq!(suite.attribute("tests"), Some("0"));
        let err = suite
            .children()
            .find(|c| c.has_tag_name("system-err"))
            .unwrap();
        assert_eq!(err.text(), Some("ERROR: usage: pytest [options]"));
    }

    #[test]
    fn a_report_without_a_message_is_summed_up_by_its_last_traceback_line() {
        let mut crashed = phase(Phase::Call, "failed", "failed");
        crashed.longrepr = "Traceback (most recent call last):\n  ...\nValueError: boom\n\n".into();
        let xml = xml_of(vec![result("t.py::test", "failed", vec![crashed])]);
        assert!(
            xml.contains("<failure message=\"ValueError: boom\">"),
            "{xml}"
        );
    }

    #[test]
    fn broken_timings_never_panic() {
        let mut odd = phase(Phase::Call, "passed", "passed");
        odd.duration = f64::NAN;
        odd.start = f64::INFINITY;
        let mut negative = phase(Phase::Teardown, "passed", "");
        negative.duration = -1.0;
        negative.start = -5.0;
        let xml = xml_of(vec![result("t.py::test", "passed", vec![odd, negative])]);
        assert!(xml.contains("name=\"test\""), "{xml}");
    }
}
