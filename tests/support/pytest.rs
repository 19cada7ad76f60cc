//! The oracle: what plain pytest says about a project. It runs pytest with `--junitxml`, reads
//! the per-test verdicts from the XML and the counts from pytest's own summary line, and lists
//! the collection, so a fly run can be compared with it test by test.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::process::{Finished, Proc};
use crate::HANG_GUARD;

/// Counts by pytest category ("failed", "passed", "skipped", "xfailed", "xpassed", "error",
/// "warnings", ...), as a summary line states them.
pub type Counts = BTreeMap<String, u32>;

/// Parses a pytest summary line such as
/// `==== 3 failed, 120 passed, 2 skipped, 1 xfailed, 2 errors in 4.51s ====`.
/// Nouns are normalised to pytest's category names ("errors" -> "error", "warning" ->
/// "warnings"). `None` when the line is not a summary line.
pub fn parse_summary_line(line: &str) -> Option<Counts> {
    let line = line.trim();
    if !line.starts_with('=') || !line.ends_with('=') {
        return None;
    }
    let body = line.trim_matches('=').trim();
    let (counts, duration) = body.rsplit_once(" in ")?;
    if !duration.trim_end().ends_with(')') && !duration.trim_end().ends_with('s') {
        return None;
    }
    let mut out = Counts::new();
    if counts == "no tests ran" {
        return Some(out);
    }
    for part in counts.split(", ") {
        let (n, noun) = part.split_once(' ')?;
        let n: u32 = n.parse().ok()?;
        let category = match noun {
            "errors" => "error",
            "warning" => "warnings",
            other => other,
        };
        *out.entry(category.to_string()).or_default() += n;
    }
    Some(out)
}

/// A test's verdict as JUnit XML can state it. JUnit cannot tell an xpassed test from a passed
/// one, so both are `Passed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum JunitVerdict {
    Passed,
    Failed,
    Error,
    Skipped,
    Xfailed,
}

impl JunitVerdict {
    /// The JUnit verdict of one of fly's final outcomes (the `results.outcome` column).
    pub fn from_outcome(outcome: &str) -> Option<JunitVerdict> {
        Some(match outcome {
            "passed" | "xpassed" => JunitVerdict::Passed,
            "failed" => JunitVerdict::Failed,
            "error" => JunitVerdict::Error,
            "skipped" => JunitVerdict::Skipped,
            "xfailed" => JunitVerdict::Xfailed,
            _ => return None,
        })
    }
}

/// The (classname, name) pair pytest's JUnit XML writes for a node id, computed the way
/// pytest's `mangle_test_address` does: parameters are split off first (they may contain `::`
/// and `/`), the file path becomes a dotted module name, classes join the classname.
pub fn junit_key(nodeid: &str) -> (String, String) {
    let (path, params) = match nodeid.find('[') {
        Some(at) => nodeid.split_at(at),
        None => (nodeid, ""),
    };
    let mut names: Vec<String> = path.split("::").map(str::to_string).collect();
    let module = names[0].replace('/', ".");
    names[0] = module.strip_suffix(".py").unwrap_or(&module).to_string();
    let mut name = names.pop().unwrap_or_default();
    name.push_str(params);
    (names.join("."), name)
}

/// Reads every `<testcase>` of a pytest JUnit XML report into its verdict. A failure wins over
/// an error in the same testcase, as a failing call wins over a teardown error in fly's final
/// outcome.
pub fn parse_junit(xml: &str) -> Result<BTreeMap<(String, String), JunitVerdict>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid JUnit XML: {e}"))?;
    let mut verdicts = BTreeMap::new();
    for case in doc.descendants().filter(|n| n.has_tag_name("testcase")) {
        let classname = case.attribute("classname").unwrap_or_default().to_string();
        let name = case
            .attribute("name")
            .ok_or("a testcase without a name")?
            .to_string();
        let child = |tag: &str| case.children().find(|c| c.has_tag_name(tag));
        let verdict = if child("failure").is_some() {
            JunitVerdict::Failed
        } else if child("error").is_some() {
            JunitVerdict::Error
        } else if let Some(skipped) = child("skipped") {
            if skipped.attribute("type") == Some("pytest.xfail") {
                JunitVerdict::Xfailed
            } else {
                JunitVerdict::Skipped
            }
        } else {
            JunitVerdict::Passed
        };
        let key = (classname, name);
        if verdicts.insert(key.clone(), verdict).is_some() {
            return Err(format!("testcase {key:?} appears twice"));
        }
    }
    Ok(verdicts)
}

/// Plain pytest's account of a project.
#[derive(Debug, Clone)]
pub struct PlainPytest {
    pub run: Finished,
    pub exit_code: i32,
    pub counts: Counts,
    pub verdicts: BTreeMap<(String, String), JunitVerdict>,
    /// Node ids in collection order, from `--collect-only -q`.
    pub collection: Vec<String>,
}

/// A `python -m pytest` command in `project` with a clean, predictable environment; fixture
/// bookkeeping goes to `log_dir`, or nowhere.
pub fn pytest_command(python: &Path, project: &Path, log_dir: Option<&Path>) -> Command {
    let mut command = Command::new(python);
    command
        .args(["-m", "pytest"])
        .current_dir(project)
        .env("PYTHONIOENCODING", "utf-8")
        .env_remove("FLY_GATE_FILE")
        .env_remove("PYTEST_ADDOPTS")
        .env_remove("PYTEST_XDIST_WORKER");
    match log_dir {
        Some(dir) => command.env("FLY_FIXTURE_LOG_DIR", dir),
        None => command.env_remove("FLY_FIXTURE_LOG_DIR"),
    };
    command
}

/// Runs plain pytest with `args` on `project`: once to collect, once to run with
/// `--junitxml=junit_path`. Fixture bookkeeping goes to `log_dir`.
pub fn run_plain_pytest(
    python: &Path,
    project: &Path,
    args: &[&str],
    junit_path: &Path,
    log_dir: &Path,
) -> PlainPytest {
    let collect = Proc::spawn(
        "pytest --collect-only",
        pytest_command(python, project, None)
            .args(["--collect-only", "-q"])
            .args(args),
    )
    .wait(HANG_GUARD);
    let collection: Vec<String> = collect
        .stdout
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::to_string)
        .collect();

    let junit_arg = format!("--junitxml={}", junit_path.display());
    let run = Proc::spawn(
        "plain pytest",
        pytest_command(python, project, Some(log_dir))
            .arg(&junit_arg)
            .args(args),
    )
    .wait(HANG_GUARD);
    let exit_code = run
        .code
        .unwrap_or_else(|| panic!("plain pytest was killed\n{}", run.describe()));
    let counts = parse_summary_line(run.last_stdout_line())
        .unwrap_or_else(|| panic!("plain pytest printed no summary line\n{}", run.describe()));
    let xml = std::fs::read_to_string(junit_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", junit_path.display()));
    let verdicts = parse_junit(&xml).unwrap_or_else(|e| panic!("{}: {e}", junit_path.display()));
    assert_eq!(
        verdicts.len(),
        collection.len(),
        "plain pytest's JUnit XML and its collection disagree\n{}",
        collect.describe()
    );
    PlainPytest {
        run,
        exit_code,
        counts,
        verdicts,
        collection,
    }
}

/// Plain pytest's exit code and output for `args` on `project`, for cases (usage errors, empty
/// selections) where fly must behave exactly like pytest.
pub fn run_plain_pytest_only(python: &Path, project: &Path, args: &[&str]) -> Finished {
    Proc::spawn(
        "plain pytest",
        pytest_command(python, project, None).args(args),
    )
    .wait(HANG_GUARD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_parse_into_categories() {
        let counts = parse_summary_line(
            "=== 4 failed, 45 passed, 3 skipped, 1 xfailed, 1 xpassed, 2 errors in 0.19s ====",
        )
        .expect("a summary line");
        let expected: Counts = [
            ("failed", 4),
            ("passed", 45),
            ("skipped", 3),
            ("xfailed", 1),
            ("xpassed", 1),
            ("error", 2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(counts, expected);
        let one = parse_summary_line("==== 1 error, 1 warning in 72.35s (0:01:12) ====").unwrap();
        assert_eq!(one.get("error"), Some(&1));
        assert_eq!(one.get("warnings"), Some(&1));
        assert_eq!(
            parse_summary_line("===== no tests ran in 0.01s ====="),
            Some(Counts::new())
        );
        assert_eq!(parse_summary_line("test_a.py::test_b PASSED"), None);
    }

    #[test]
    fn junit_keys_follow_pytest_mangling() {
        assert_eq!(
            junit_key("test_odd_ids.py::test_ids[colons::inside]"),
            ("test_odd_ids".into(), "test_ids[colons::inside]".into())
        );
        assert_eq!(
            junit_key("pkg/test_class.py::TestA::test_b[a/b]"),
            ("pkg.test_class.TestA".into(), "test_b[a/b]".into())
        );
    }

    #[test]
    fn junit_verdicts_cover_every_kind() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite>
            <testcase classname="m" name="ok" />
            <testcase classname="m" name="f"><failure message="x"/></testcase>
            <testcase classname="m" name="e"><error message="x"/></testcase>
            <testcase classname="m" name="s"><skipped type="pytest.skip" message="x"/></testcase>
            <testcase classname="m" name="x"><skipped type="pytest.xfail" message="x"/></testcase>
            </testsuite></testsuites>"#;
        let verdicts = parse_junit(xml).unwrap();
        let get = |name: &str| verdicts[&("m".to_string(), name.to_string())];
        assert_eq!(get("ok"), JunitVerdict::Passed);
        assert_eq!(get("f"), JunitVerdict::Failed);
        assert_eq!(get("e"), JunitVerdict::Error);
        assert_eq!(get("s"), JunitVerdict::Skipped);
        assert_eq!(get("x"), JunitVerdict::Xfailed);
    }
}
