//! What `fly-coordinator run` prints: plain progress lines when its output goes to a pipe (a CI
//! log), a live bar under a terminal, and at the end pytest's own report: the ERRORS and
//! FAILURES sections with pytest's tracebacks, `--durations`, the short test summary and the
//! summary line, checked against plain pytest's output for the same project.

use std::path::Path;
use std::process::Command;

use fly_tests::fly::clean_env;
use fly_tests::paths::{fly_binary, python};
use fly_tests::process::{Finished, Proc};
use fly_tests::pytest::{parse_summary_line, pytest_command};
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;

/// pytest's arguments for every run here (no cache directory written into the sandbox copy).
const PYTEST_ARGS: [&str; 3] = ["-p", "no:cacheprovider", "."];

/// Plain pytest on `project`, 80 columns wide (as fly prints to a pipe).
fn plain_pytest(project: &Path) -> Finished {
    let mut command = pytest_command(&python(), project, None);
    command.args(PYTEST_ARGS).env("COLUMNS", "80");
    Proc::spawn("plain pytest", &mut command).wait(HANG_GUARD)
}

/// `collected N items` from pytest's header.
fn collected(pytest: &Finished) -> u32 {
    pytest
        .stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("collected ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("pytest printed no collection count\n{}", pytest.describe()))
}

/// The lines of the section whose `=` separator names `title`, up to the next `=` separator.
fn section<'a>(stdout: &'a str, title: &str) -> Vec<&'a str> {
    let is_sep = |line: &str| line.starts_with('=') && line.ends_with('=');
    stdout
        .lines()
        .skip_while(|line| !(is_sep(line) && line.trim_matches('=').trim() == title))
        .skip(1)
        .take_while(|line| !is_sep(line))
        .collect()
}

/// The test blocks of a FAILURES or ERRORS section: each `____ title ____` header with the
/// lines under it.
fn blocks(lines: &[&str]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in lines {
        let title = line.trim_matches('_').trim();
        // `_ _ _ _` lines between traceback entries have no title.
        if line.starts_with('_')
            && line.ends_with('_')
            && !title.trim_matches(['_', ' ']).is_empty()
        {
            out.push((title.to_string(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The entries of a short test summary, one line each. On CI pytest prints a failure's whole
/// message, over several lines; fly knows its first line only, so only that is compared.
fn summary_entries<'a>(lines: &[&'a str]) -> Vec<&'a str> {
    lines
        .iter()
        .copied()
        .filter(|line| line.starts_with("FAILED ") || line.starts_with("ERROR "))
        .collect()
}

/// A plain progress line, `[ 40%] 22/55 tests, 2 failed, 2 running, ETA 3s`, as numbers:
/// (percent, done, total, failed).
fn progress_line(line: &str) -> Option<(u32, u32, u32, u32)> {
    let rest = line.strip_prefix('[')?;
    let (percent, rest) = rest.split_once("%] ")?;
    let (fraction, rest) = rest.split_once(" tests, ")?;
    let (done, total) = fraction.split_once('/')?;
    let (failed, _) = rest.split_once(" failed")?;
    Some((
        percent.trim().parse().ok()?,
        done.parse().ok()?,
        total.parse().ok()?,
        failed.parse().ok()?,
    ))
}

/// Checks the durations section: `count` lines `0.01s call     path::test`, slowest first.
fn assert_durations(stdout: &str, count: usize) {
    let lines = section(stdout, &format!("slowest {count} durations"));
    let mut seconds = Vec::new();
    for line in &lines {
        let (time, rest) = line
            .split_once("s ")
            .unwrap_or_else(|| panic!("not a durations line: {line:?}\n{stdout}"));
        let (phase, nodeid) = rest.split_at(8);
        assert!(
            ["setup   ", "call    ", "teardown"].contains(&phase),
            "{line:?}"
        );
        assert!(
            nodeid.starts_with(' ') && nodeid.contains(".py::"),
            "{line:?}"
        );
        seconds.push(
            time.parse::<f64>()
                .unwrap_or_else(|e| panic!("{line:?}: {e}")),
        );
    }
    assert_eq!(seconds.len(), count, "{stdout}");
    assert!(
        seconds.windows(2).all(|pair| pair[0] >= pair[1]),
        "durations are not slowest first: {lines:#?}"
    );
}

#[test]
fn piped_run_prints_plain_progress_and_pytest_report() {
    let sandbox = Sandbox::new("terminal-pipe");
    let project = sandbox.copy_project("project");
    let pytest = plain_pytest(&project);
    let db = sandbox.path("fly.db");
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--local", "--workers", "2", "--durations", "5"])
        // Every phase counts, so the list has five lines however fast the machine is.
        .args(["--durations-min", "0", "--db"])
        .arg(&db)
        .arg("--python")
        .arg(python())
        .arg("--")
        .args(PYTEST_ARGS)
        .current_dir(&project);
    clean_env(&mut command, None);
    command.env("COLUMNS", "80");
    let run =
        Proc::spawn("fly-coordinator run --local --durations 5", &mut command).wait(HANG_GUARD);
    assert_eq!(run.code, pytest.code, "{}", run.describe());

    // A log gets no control characters at all.
    for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert!(
            !text.contains('\x1b') && !text.contains('\r'),
            "control characters in {name}:\n{}",
            run.describe()
        );
    }

    // Plain progress lines on stderr, moving forward, the last one at 100%.
    let total = collected(&pytest);
    let progress: Vec<(u32, u32, u32, u32)> =
        run.stderr.lines().filter_map(progress_line).collect();
    assert!(
        !progress.is_empty(),
        "no progress lines\n{}",
        run.describe()
    );
    assert!(
        progress
            .windows(2)
            .all(|pair| pair[0].0 <= pair[1].0 && pair[0].1 <= pair[1].1),
        "progress went backwards: {progress:?}"
    );
    assert!(progress.iter().all(|p| p.2 == total), "{progress:?}");
    let last = progress[progress.len() - 1];
    assert_eq!((last.0, last.1), (100, total), "{}", run.describe());

    // The FAILURES and ERRORS sections hold pytest's blocks: each test's header, and the very
    // text plain pytest prints for it (but for object addresses, which differ between runs).
    for title in ["ERRORS", "FAILURES"] {
        let expected = blocks(&section(&pytest.stdout, title));
        let got = blocks(&section(&run.stdout, title));
        assert!(!expected.is_empty(), "{}", pytest.describe());
        let expected_titles: Vec<&String> = expected.iter().map(|(t, _)| t).collect();
        let got_titles: Vec<&String> = got.iter().map(|(t, _)| t).collect();
        assert_eq!(got_titles, expected_titles, "{title}:\n{}", run.stdout);
        for ((name, want), (_, have)) in expected.iter().zip(&got) {
            if want.contains(" at 0x") {
                // The assertion line is the same all the same.
                let assertion = |body: &str| {
                    body.lines()
                        .find(|l| l.starts_with("E   "))
                        .map(str::to_string)
                };
                assert_eq!(assertion(have), assertion(want), "{name}");
            } else {
                assert_eq!(have, want, "the block of {name} differs from pytest's");
            }
        }
    }
    // The failure every project has: the same assertion line as pytest's.
    assert!(run
        .stdout
        .contains("E       AssertionError: assert 'left-side' == 'right-side-d...erate-failure'"));

    // Each failing test was announced on stderr as it finished.
    let short = summary_entries(&section(&pytest.stdout, "short test summary info"));
    assert!(!short.is_empty(), "{}", pytest.describe());
    for line in &short {
        let mut words = line.split_whitespace();
        let (Some(word), Some(nodeid)) = (words.next(), words.next()) else {
            continue;
        };
        assert!(
            run.stderr.lines().any(|l| l == format!("{word} {nodeid}")),
            "no `{word} {nodeid}` line on stderr\n{}",
            run.describe()
        );
    }
    // The short summary is pytest's, entry for entry.
    assert_eq!(
        summary_entries(&section(&run.stdout, "short test summary info")),
        short
    );

    assert_durations(&run.stdout, 5);
    // pytest's order: failures, durations, then the short summary.
    let at = |needle: &str| {
        run.stdout
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in\n{}", run.stdout))
    };
    assert!(at(" FAILURES ") < at(" slowest 5 durations "));
    assert!(at(" slowest 5 durations ") < at(" short test summary info "));

    let fly_counts = parse_summary_line(run.last_stdout_line())
        .unwrap_or_else(|| panic!("no summary line\n{}", run.describe()));
    let pytest_counts = parse_summary_line(pytest.last_stdout_line())
        .unwrap_or_else(|| panic!("no summary line\n{}", pytest.describe()));
    assert_eq!(fly_counts, pytest_counts);
    assert_eq!(run.last_stdout_line().len(), 80);
}

/// `s` quoted for `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn terminal_run_draws_a_live_bar() {
    let sandbox = Sandbox::new("terminal-tty");
    let project = sandbox.copy_project("project");
    let pytest = plain_pytest(&project);
    let db = sandbox.path("fly.db");
    let fly = fly_binary("fly-coordinator");
    let python = python();
    let mut words: Vec<String> = [
        fly.to_string_lossy().as_ref(),
        "run",
        "--local",
        "--workers",
        "2",
        "--db",
        db.to_string_lossy().as_ref(),
        "--python",
        python.to_string_lossy().as_ref(),
        "--",
        // After `--`: fly takes it as its own flag.
        "--durations=3",
    ]
    .iter()
    .map(|w| shell_quote(w))
    .collect();
    words.extend(PYTEST_ARGS.iter().map(|w| shell_quote(w)));
    // util-linux `script` runs the command on a pseudo-terminal and copies what it shows.
    let shell = format!("stty cols 100 rows 40; exec {}", words.join(" "));
    let mut command = Command::new("script");
    command
        .args(["-q", "-e", "-c", &shell, "/dev/null"])
        .current_dir(&project);
    clean_env(&mut command, None);
    command
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env_remove("PY_COLORS")
        .env_remove("FORCE_COLOR")
        .env_remove("COLUMNS");
    let run = Proc::spawn("fly-coordinator run under script", &mut command).wait(HANG_GUARD);
    assert_eq!(run.code, pytest.code, "{}", run.describe());
    let screen = &run.stdout;

    // The bar was drawn and redrawn in place: a line cleared, its counts and the tests running.
    assert!(screen.contains("\x1b[2K"), "no line redraws:\n{screen:?}");
    let plain = strip_ansi(screen);
    assert!(
        plain.contains(" running") && plain.contains(&format!("/{} ", collected(&pytest))),
        "no bar:\n{plain}"
    );
    // Failing tests are announced as they come, in colour.
    assert!(screen.contains("\x1b[31mFAILED\x1b[0m test_basic.py::test_fails"));

    // The report is pytest's, 100 columns wide like the terminal, coloured, ending on the
    // summary line.
    let last = plain
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim_end();
    assert_eq!(last.chars().count(), 100, "{last:?}");
    let counts = parse_summary_line(last).unwrap_or_else(|| panic!("{last:?}\n{plain}"));
    assert_eq!(Some(counts), parse_summary_line(pytest.last_stdout_line()));
    assert!(plain.contains(" slowest 3 durations "), "{plain}");
}

/// `text` without ANSI escape sequences (CSI `ESC [ ... letter`, and `ESC (B`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            if c != '\r' {
                out.push(c);
            }
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            Some('(') => {
                chars.next();
            }
            _ => {}
        }
    }
    out
}

/// The ETA of a plain progress line, in seconds (`ETA 12s`, `ETA 3m05s`).
fn eta_of(line: &str) -> Option<u64> {
    let eta = line.split(", ETA ").nth(1)?.trim();
    let (minutes, seconds) = match eta.split_once('m') {
        Some((m, s)) => (m.parse::<u64>().ok()?, s),
        None => (0, eta),
    };
    Some(minutes * 60 + seconds.strip_suffix('s')?.parse::<u64>().ok()?)
}

/// On a second run the coordinator's schedule knows a long test is still running: halfway
/// through the tests the ETA counts its remaining seconds, where the pace of the short tests
/// alone would promise an end at once.
#[test]
fn a_second_runs_eta_counts_the_long_test_still_running() {
    let sandbox = Sandbox::new("terminal-eta");
    let suite = sandbox.path("suite");
    std::fs::create_dir_all(&suite).expect("suite dir");
    let mut body = String::from("import time\n\ndef test_long():\n    time.sleep(6)\n");
    for i in 0..40 {
        body.push_str(&format!("\ndef test_short_{i}():\n    pass\n"));
    }
    std::fs::write(suite.join("test_eta.py"), body).expect("write suite");
    let db = sandbox.path("fly.db");
    let run = || {
        let mut command = Command::new(fly_binary("fly-coordinator"));
        command
            .args(["run", "--local", "--workers", "2", "--db"])
            .arg(&db)
            .arg("--python")
            .arg(python())
            .args(["--", "-q", "-p", "no:cacheprovider"])
            .current_dir(&suite);
        clean_env(&mut command, None);
        let run = Proc::spawn("fly-coordinator run --local", &mut command).wait(HANG_GUARD);
        assert_eq!(run.code, Some(0), "{}", run.describe());
        run
    };
    run();
    let second = run();
    let halfway: Vec<(u32, u64)> = second
        .stderr
        .lines()
        .filter_map(|line| Some((progress_line(line)?.0, eta_of(line)?)))
        // Up to 90%: the last two tests are the long one and the short one that follows it.
        .filter(|(percent, _)| (50..=90).contains(percent))
        .collect();
    assert!(!halfway.is_empty(), "{}", second.describe());
    assert!(
        halfway.iter().all(|(_, eta)| *eta >= 2),
        "the 6 s test is still running: {halfway:?}\n{}",
        second.describe()
    );
}
