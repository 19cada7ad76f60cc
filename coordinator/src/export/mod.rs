//! Files a run leaves for other tools: JUnit XML that CI systems ingest (`run --junit-xml`)
//! and a Chrome trace-event timeline that Perfetto opens (`run --trace-json`).
//!
//! Both are built on the client side from the `RunEvent` stream, never from the database:
//! `run --connect` talks to a coordinator on another machine and has no database. A
//! [`Collector`] keeps every [`TestResult`] as it arrives; once `RunFinished` is in, [`write_all`]
//! writes each requested file to a temporary file beside it and renames it into place, so a
//! crash never leaves half a file where a CI step expects a whole one.

pub mod junit;
pub mod trace;

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fly_common::exit_code;
use fly_common::proto::{RunFinished, TestResult};

/// Which files `run` writes after the run, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exports {
    /// `--junit-xml PATH`.
    pub junit_xml: Option<PathBuf>,
    /// `--trace-json PATH`.
    pub trace_json: Option<PathBuf>,
}

impl Exports {
    /// True when no file was asked for (the client then keeps no results).
    pub fn is_empty(&self) -> bool {
        self.junit_xml.is_none() && self.trace_json.is_none()
    }
}

/// Why an export file could not be written. The message names the file and the path.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write the JUnit XML report to {}: {source}", path.display())]
    JunitIo { path: PathBuf, source: io::Error },
    #[error("cannot build the JUnit XML report for {}: {source}", path.display())]
    JunitXml {
        path: PathBuf,
        source: quick_junit::SerializeError,
    },
    #[error("cannot write the trace to {}: {source}", path.display())]
    TraceIo { path: PathBuf, source: io::Error },
    #[error("cannot encode the trace for {}: {source}", path.display())]
    TraceJson {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The run as the client saw it: every final result, in arrival order.
#[derive(Debug, Clone)]
pub struct Collector {
    submitted: SystemTime,
    run_id: String,
    results: Vec<TestResult>,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

impl Collector {
    /// A collector for a run submitted now (the JUnit suite's timestamp).
    pub fn new() -> Collector {
        Collector::submitted_at(SystemTime::now())
    }

    /// A collector for a run submitted at `submitted`.
    pub fn submitted_at(submitted: SystemTime) -> Collector {
        Collector {
            submitted,
            run_id: String::new(),
            results: Vec::new(),
        }
    }

    /// Records the run id the coordinator gave the run (a JUnit suite property).
    pub fn set_run_id(&mut self, run_id: &str) {
        self.run_id = run_id.to_string();
    }

    /// Keeps one test's final result.
    pub fn add(&mut self, result: TestResult) {
        self.results.push(result);
    }

    pub fn submitted(&self) -> SystemTime {
        self.submitted
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The results in collection order (by test index), whatever order they finished in.
    pub fn results_in_collection_order(&self) -> Vec<&TestResult> {
        let mut results: Vec<&TestResult> = self.results.iter().collect();
        results.sort_by_key(|r| r.test_index);
        results
    }

    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }
}

/// What [`write_all`] did with each requested file.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Files written, with what they are ("JUnit XML", "trace").
    pub written: Vec<(&'static str, PathBuf)>,
    /// Files deliberately not written, with the reason (a trace of a run that ran no test).
    pub skipped: Vec<(&'static str, PathBuf, &'static str)>,
    /// Files that could not be written.
    pub errors: Vec<ExportError>,
}

/// Writes every file `exports` asks for. A file that fails does not stop the others.
///
/// The JUnit file is written even when no test ran (an empty suite: CI steps expect the file);
/// the trace is not, since it would hold no track.
pub fn write_all(exports: &Exports, run: &Collector, finished: &RunFinished) -> Outcome {
    let mut outcome = Outcome::default();
    if let Some(path) = &exports.junit_xml {
        match junit::to_xml(&junit::report(run, finished)) {
            Ok(xml) => match write_atomically(path, &xml) {
                Ok(()) => outcome.written.push(("JUnit XML", path.clone())),
                Err(source) => outcome.errors.push(ExportError::JunitIo {
                    path: path.clone(),
                    source,
                }),
            },
            Err(source) => outcome.errors.push(ExportError::JunitXml {
                path: path.clone(),
                source,
            }),
        }
    }
    if let Some(path) = &exports.trace_json {
        if run.is_empty() {
            outcome
                .skipped
                .push(("trace", path.clone(), "no test ran, so it would be empty"));
        } else {
            match serde_json::to_vec(&trace::trace(run)) {
                Ok(json) => match write_atomically(path, &json) {
                    Ok(()) => outcome.written.push(("trace", path.clone())),
                    Err(source) => outcome.errors.push(ExportError::TraceIo {
                        path: path.clone(),
                        source,
                    }),
                },
                Err(source) => outcome.errors.push(ExportError::TraceJson {
                    path: path.clone(),
                    source,
                }),
            }
        }
    }
    outcome
}

/// Writes the requested files after a run, says on stderr what was written, and returns the
/// exit code `run` should end with: pytest's, or 3 (internal error) when a file could not be
/// written and pytest's code was 0. A failed write never hides a test failure's exit code.
pub fn write_and_report(exports: &Exports, run: &Collector, finished: &RunFinished) -> i32 {
    let outcome = write_all(exports, run, finished);
    for (what, path) in &outcome.written {
        eprintln!("fly: wrote the {what} to {}", path.display());
    }
    for (what, path, why) in &outcome.skipped {
        eprintln!("fly: did not write the {what} to {}: {why}", path.display());
    }
    for error in &outcome.errors {
        eprintln!("fly-coordinator: error: {error}");
    }
    if !outcome.errors.is_empty() && finished.exit_code == exit_code::OK {
        exit_code::INTERNAL_ERROR
    } else {
        finished.exit_code
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// readers see the old file or the whole new one, never a part. Missing parent directories are
/// created, as pytest does for `--junitxml`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names a directory, not a file",
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = dir.join(temp_name);
    // A leftover of a process that died mid-write with the same pid; ours to replace.
    let _ = fs::remove_file(&temp);
    let result = (|| {
        // create_new: never follow a link someone put at the temporary name meanwhile.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_the_file_and_leave_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deeper").join("report.xml");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("report.xml")]);
    }

    #[test]
    fn a_path_that_cannot_be_written_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        fs::write(&blocker, b"x").unwrap();
        let exports = Exports {
            junit_xml: Some(blocker.join("junit.xml")),
            trace_json: None,
        };
        let outcome = write_all(&exports, &Collector::new(), &RunFinished::default());
        assert!(outcome.written.is_empty());
        assert_eq!(outcome.errors.len(), 1);
        let message = outcome.errors[0].to_string();
        assert!(message.contains("JUnit XML"), "{message}");
        assert!(message.contains("a-file"), "{message}");
    }

    #[test]
    fn a_failed_write_turns_success_into_an_internal_error_but_never_hides_failures() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        fs::write(&blocker, b"x").unwrap();
        let exports = Exports {
            junit_xml: None,
            trace_json: Some(blocker.join("trace.json")),
        };
        let mut run = Collector::new();
        run.add(TestResult {
            nodeid: "t.py::test".into(),
            phases: vec![fly_common::proto::PhaseResult {
                start: 1_800_000_000.0,
                stop: 1_800_000_000.5,
                ..Default::default()
            }],
            ..Default::default()
        });
        let finished = |exit_code| RunFinished {
            exit_code,
            ..Default::default()
        };
        assert_eq!(
            write_and_report(&exports, &run, &finished(exit_code::OK)),
            exit_code::INTERNAL_ERROR
        );
        assert_eq!(
            write_and_report(&exports, &run, &finished(exit_code::TESTS_FAILED)),
            exit_code::TESTS_FAILED
        );
    }

    #[test]
    fn a_run_without_tests_still_gets_its_junit_file_but_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let exports = Exports {
            junit_xml: Some(dir.path().join("junit.xml")),
            trace_json: Some(dir.path().join("trace.json")),
        };
        let finished = RunFinished {
            exit_code: 5,
            ..Default::default()
        };
        let outcome = write_all(&exports, &Collector::new(), &finished);
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        assert_eq!(outcome.written.len(), 1);
        assert_eq!(outcome.skipped.len(), 1);
        let xml = fs::read_to_string(dir.path().join("junit.xml")).unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let suite = doc
            .descendants()
            .find(|n| n.has_tag_name("testsuite"))
            .unwrap();
        assert_eq!(suite.attribute("tests"), Some("0"));
        assert!(!dir.path().join("trace.json").exists());
    }
}
