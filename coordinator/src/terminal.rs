//! What `fly-coordinator run` prints, in pytest's own shapes: the FAILURES and ERRORS
//! sections with each traceback, the short test summary, and the `=== 1 failed, 3 passed in
//! 0.52s ===` line, so people and tools that read pytest output read fly's.

use fly_common::outcome::{Counts, Phase};
use fly_common::proto::{RunFinished, TestResult};

/// pytest's separator line: `==== title ====` filling `width` columns.
pub fn sep(ch: char, title: &str, width: usize) -> String {
    if title.is_empty() {
        return ch.to_string().repeat(width);
    }
    let n = (width.saturating_sub(title.chars().count() + 2) / 2).max(1);
    let side = ch.to_string().repeat(n);
    let mut line = format!("{side} {title} {side}");
    if line.chars().count() < width {
        line.push(ch);
    }
    line
}

/// The terminal width pytest would use: `COLUMNS`, else 80.
pub fn width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .filter(|w| *w >= 40)
        .unwrap_or(80)
}

/// pytest's headline for a test: its name within the file, `Class.test[param]`.
pub fn head_line(nodeid: &str) -> String {
    let (path, params) = match nodeid.find('[') {
        Some(i) => nodeid.split_at(i),
        None => (nodeid, ""),
    };
    let name = match path.find("::") {
        Some(i) => &path[i + 2..],
        None => path,
    };
    format!("{}{}", name.replace("::", "."), params)
}

/// Renders everything printed after the run: failures, errors, short summary, summary line.
pub fn render_end(failures: &[TestResult], finished: &RunFinished, width: usize) -> String {
    let mut out = String::new();
    if !finished.output.is_empty() {
        out.push_str(finished.output.trim_end());
        out.push('\n');
    }
    let mut failed_blocks = Vec::new();
    let mut error_blocks = Vec::new();
    let mut short = Vec::new();
    for result in failures {
        let head = head_line(&result.nodeid);
        for phase in &result.phases {
            let Some(which) = Phase::from_proto(phase.phase) else {
                continue;
            };
            let mut block = String::new();
            let title = match (which, phase.category.as_str()) {
                (Phase::Call, "failed") => head.clone(),
                (Phase::Setup | Phase::Teardown, "error") => {
                    format!("ERROR at {} of {}", which.as_str(), head)
                }
                _ => continue,
            };
            block.push_str(&sep('_', &title, width));
            block.push('\n');
            if !phase.longrepr.is_empty() {
                block.push_str(phase.longrepr.trim_end());
                block.push('\n');
            }
            for section in &phase.sections {
                block.push_str(&sep('-', &section.name, width));
                block.push('\n');
                block.push_str(section.text.trim_end());
                block.push('\n');
            }
            let word = if phase.category == "error" {
                "ERROR"
            } else {
                "FAILED"
            };
            short.push(if phase.message.is_empty() {
                format!("{word} {}", result.nodeid)
            } else {
                format!("{word} {} - {}", result.nodeid, phase.message)
            });
            if phase.category == "error" {
                error_blocks.push(block);
            } else {
                failed_blocks.push(block);
            }
        }
    }
    if !error_blocks.is_empty() {
        out.push_str(&sep('=', "ERRORS", width));
        out.push('\n');
        out.push_str(&error_blocks.concat());
    }
    if !failed_blocks.is_empty() {
        out.push_str(&sep('=', "FAILURES", width));
        out.push('\n');
        out.push_str(&failed_blocks.concat());
    }
    if !short.is_empty() {
        out.push_str(&sep('=', "short test summary info", width));
        out.push('\n');
        for line in short {
            out.push_str(&line);
            out.push('\n');
        }
    }
    if !finished.message.is_empty() {
        out.push_str(&format!("fly: {}\n", finished.message));
    }
    // When pytest stopped before running tests, its own output (above) already ends the way
    // pytest ends it; a second summary line would only repeat it.
    if finished.output.is_empty() {
        let mut counts = Counts::default();
        for c in &finished.counts {
            counts.add(&c.category, c.count);
        }
        let line = counts.summary_line(finished.wall_seconds);
        out.push_str(&sep('=', &line, width));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::{CategoryCount, PhaseResult};

    #[test]
    fn separator_lines_match_pytest() {
        // pytest: `=================== 1 passed in 0.01s ===================` (80 wide).
        let line = sep('=', "1 passed in 0.01s", 80);
        assert_eq!(line.len(), 80);
        assert_eq!(
            line,
            "============================== 1 passed in 0.01s ==============================="
        );
        assert_eq!(sep('=', "FAILURES", 80).len(), 80);
    }

    #[test]
    fn head_lines_keep_parameters_whole() {
        assert_eq!(head_line("t.py::test_a"), "test_a");
        assert_eq!(head_line("t.py::TestX::test_a"), "TestX.test_a");
        assert_eq!(head_line("t.py::test_p[a::b c]"), "test_p[a::b c]");
    }

    #[test]
    fn failures_and_errors_print_under_pytest_headers() {
        let failing = TestResult {
            nodeid: "t.py::test_bad".into(),
            outcome: "failed".into(),
            phases: vec![PhaseResult {
                phase: Phase::Call.to_proto() as i32,
                outcome: "failed".into(),
                category: "failed".into(),
                longrepr: "E   assert 1 == 2".into(),
                message: "assert 1 == 2".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let erroring = TestResult {
            nodeid: "t.py::test_setup".into(),
            outcome: "error".into(),
            phases: vec![PhaseResult {
                phase: Phase::Setup.to_proto() as i32,
                outcome: "failed".into(),
                category: "error".into(),
                longrepr: "RuntimeError: boom".into(),
                message: "RuntimeError: boom".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let finished = RunFinished {
            exit_code: 1,
            counts: vec![
                CategoryCount {
                    category: "failed".into(),
                    count: 1,
                },
                CategoryCount {
                    category: "error".into(),
                    count: 1,
                },
            ],
            wall_seconds: 1.5,
            ..Default::default()
        };
        let text = render_end(&[failing, erroring], &finished, 80);
        let errors = text.find(" ERRORS ").unwrap();
        let failures = text.find(" FAILURES ").unwrap();
        assert!(errors < failures, "{text}");
        assert!(text.contains("ERROR at setup of test_setup"));
        assert!(text.contains("FAILED t.py::test_bad - assert 1 == 2"));
        let last = text.lines().last().unwrap();
        assert!(
            last.starts_with("=") && last.contains(" 1 failed, 1 error in 1.50s "),
            "{text}"
        );
    }
}
