//! Progress while a run goes on: a live bar (finished/collected, counts by outcome in colour,
//! tests running, ETA) when the client writes to a terminal, plain lines without control
//! characters every few seconds and every tenth of the run when it does not (CI logs), and a
//! `FAILED nodeid` line as each failing test arrives. All of it goes to stderr, so stdout
//! holds pytest's report alone.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use console::Style as Paint;
use fly_common::proto::{RunStatus, TestResult};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A plain progress line at least this often, so a CI log shows the run is alive.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

/// How often the client should call [`Progress::tick`]: the bar's ETA and the plain lines'
/// interval move with time, not only with results.
pub const TICK: Duration = Duration::from_secs(1);

/// Tests by final outcome, as the bar counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    pub xfailed: u32,
    pub xpassed: u32,
    pub error: u32,
}

impl Tally {
    fn add(&mut self, outcome: &str) {
        match outcome {
            "passed" => self.passed += 1,
            "failed" => self.failed += 1,
            "skipped" => self.skipped += 1,
            "xfailed" => self.xfailed += 1,
            "xpassed" => self.xpassed += 1,
            _ => self.error += 1,
        }
    }
}

/// Where a run stands, as both displays print it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub done: u32,
    pub total: u32,
    pub tally: Tally,
    pub running: u32,
    /// Seconds left, when there is an estimate.
    pub eta: Option<f64>,
}

/// The plain progress line for logs: `[ 40%] 400/1000 tests, 2 failed, 3 running, ETA 12s`
/// (errors named only when there are some, the ETA only once it can be estimated). The
/// percentage is rounded down, as pytest's `[ 40%]`.
pub fn plain_line(s: &Snapshot) -> String {
    let percent = (u64::from(s.done) * 100)
        .checked_div(u64::from(s.total))
        .unwrap_or(0);
    let mut line = format!(
        "[{percent:>3}%] {}/{} tests, {} failed",
        s.done, s.total, s.tally.failed
    );
    if s.tally.error > 0 {
        let noun = if s.tally.error == 1 {
            "error"
        } else {
            "errors"
        };
        line.push_str(&format!(", {} {noun}", s.tally.error));
    }
    line.push_str(&format!(", {} running", s.running));
    if let Some(eta) = s.eta {
        line.push_str(&format!(", ETA {}", format_eta(eta)));
    }
    line
}

/// The bar's message: the tests running and the ETA, then the counts by outcome in pytest's
/// order and colours (those not zero). A narrow terminal cuts the end of the line, so the
/// counts come last.
pub fn bar_message(s: &Snapshot, color: bool) -> String {
    let t = &s.tally;
    let paint = |text: String, paint: Paint| {
        if color {
            paint.force_styling(true).apply_to(text).to_string()
        } else {
            text
        }
    };
    let mut head = format!("{} running", s.running);
    if let Some(eta) = s.eta {
        head.push_str(&format!(", ETA {}", format_eta(eta)));
    }
    let mut parts = Vec::new();
    for (n, noun, style) in [
        (t.failed, "failed", Paint::new().red().bold()),
        (t.passed, "passed", Paint::new().green()),
        (t.skipped, "skipped", Paint::new().yellow()),
        (t.xfailed, "xfailed", Paint::new().yellow()),
        (t.xpassed, "xpassed", Paint::new().yellow()),
        (
            t.error,
            if t.error == 1 { "error" } else { "errors" },
            Paint::new().red().bold(),
        ),
    ] {
        if n > 0 {
            parts.push(paint(format!("{n} {noun}"), style));
        }
    }
    if parts.is_empty() {
        head
    } else {
        format!("{head} | {}", parts.join(", "))
    }
}

/// A short duration for an ETA: `12s`, `3m05s`, `2h07m`.
pub fn format_eta(seconds: f64) -> String {
    let whole = if seconds.is_finite() && seconds > 0.0 {
        seconds.ceil() as u64
    } else {
        0
    };
    match whole {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The time left if the rest goes at the pace so far: `elapsed` for `done` of `total` tests.
/// `None` before the first result.
pub fn estimate_eta(elapsed: Duration, done: u32, total: u32) -> Option<f64> {
    if done == 0 {
        return None;
    }
    let left = total.saturating_sub(done);
    Some(elapsed.as_secs_f64() * f64::from(left) / f64::from(done))
}

enum Display {
    /// Nothing is drawn until the run has a collection.
    Waiting {
        live: bool,
    },
    Bar(ProgressBar),
    Lines {
        last_at: Instant,
        /// Tenths of the run already announced.
        last_tenth: u64,
    },
}

/// The progress display of one run.
pub struct Progress {
    display: Display,
    color: bool,
    total: u32,
    done: u32,
    tally: Tally,
    workers: u32,
    /// When the run had its collection: the pace is measured from there.
    started: Option<Instant>,
    /// The coordinator's own estimate, if it sent one, and when.
    coordinator_eta: Option<(f64, Instant)>,
    failing: bool,
}

impl Progress {
    /// A live bar when stdout and stderr are both terminals (and `TERM` is not `dumb`), plain
    /// lines otherwise. `color` colours the bar (plain lines never are).
    pub fn detect(color: bool) -> Progress {
        let live = std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal()
            && std::env::var("TERM").as_deref() != Ok("dumb");
        Progress::new(live, color)
    }

    pub fn new(live: bool, color: bool) -> Progress {
        Progress {
            display: Display::Waiting { live },
            color,
            total: 0,
            done: 0,
            tally: Tally::default(),
            workers: 0,
            started: None,
            coordinator_eta: None,
            failing: false,
        }
    }

    /// Whether progress is being shown (the run has its collection).
    pub fn is_active(&self) -> bool {
        !matches!(self.display, Display::Waiting { .. })
    }

    /// Takes in a status: the collection size, the workers, the coordinator's ETA.
    pub fn status(&mut self, status: &RunStatus, now: Instant) {
        if status.workers > 0 {
            self.workers = status.workers;
        }
        if status.eta_seconds > 0.0 && status.eta_seconds.is_finite() {
            self.coordinator_eta = Some((status.eta_seconds, now));
        }
        if status.collected > 0 && self.total == 0 {
            self.total = status.collected;
            self.started = Some(now);
            self.start(now);
        }
        self.redraw(now);
    }

    fn start(&mut self, now: Instant) {
        let Display::Waiting { live } = self.display else {
            return;
        };
        self.display = if live {
            // indicatif colours its template through `console`, which decides for itself;
            // the choice made for this run (NO_COLOR, --color) wins.
            console::set_colors_enabled_stderr(self.color);
            let bar = ProgressBar::with_draw_target(
                Some(u64::from(self.total)),
                ProgressDrawTarget::stderr(),
            );
            bar.set_style(self.bar_style());
            Display::Bar(bar)
        } else {
            Display::Lines {
                last_at: now,
                last_tenth: 0,
            }
        };
    }

    fn bar_style(&self) -> ProgressStyle {
        let template = match (self.color, self.failing) {
            (false, _) => "{bar:25} {pos}/{len} {wide_msg}",
            (true, false) => "{bar:25.green} {pos}/{len} {wide_msg}",
            (true, true) => "{bar:25.red} {pos}/{len} {wide_msg}",
        };
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }

    /// Takes in a test's result: counts it and, when it failed, prints its `FAILED nodeid`
    /// line at once.
    pub fn result(&mut self, result: &TestResult, now: Instant) {
        self.done += 1;
        self.tally.add(&result.outcome);
        let word = match result.outcome.as_str() {
            "failed" => Some("FAILED"),
            "error" => Some("ERROR"),
            _ => None,
        };
        if let Some(word) = word {
            let live = matches!(self.display, Display::Bar(_));
            let word = if live && self.color {
                Paint::new()
                    .red()
                    .force_styling(true)
                    .apply_to(word)
                    .to_string()
            } else {
                word.to_string()
            };
            self.note(&format!("{word} {}", result.nodeid));
            if !self.failing {
                self.failing = true;
                if let Display::Bar(bar) = &self.display {
                    bar.set_style(self.bar_style());
                }
            }
        }
        if let Display::Lines { last_tenth, .. } = &self.display {
            // A line for every tenth of the run, whatever the time.
            let tenth = (u64::from(self.done) * 10)
                .checked_div(u64::from(self.total))
                .unwrap_or(0);
            if tenth > *last_tenth {
                self.print_line(now, tenth);
            }
        }
        self.redraw(now);
    }

    /// Moves with time: the bar's ETA, and a plain line when [`PLAIN_INTERVAL`] has passed.
    pub fn tick(&mut self, now: Instant) {
        if let Display::Lines {
            last_at,
            last_tenth,
        } = self.display
        {
            if now.duration_since(last_at) >= PLAIN_INTERVAL && self.done < self.total {
                self.print_line(now, last_tenth);
            }
        }
        self.redraw(now);
    }

    fn print_line(&mut self, now: Instant, tenth: u64) {
        let line = plain_line(&self.snapshot(now));
        eprintln!("{line}");
        self.display = Display::Lines {
            last_at: now,
            last_tenth: tenth,
        };
    }

    /// Prints a line of its own (a notice, a failing test) without breaking the bar.
    pub fn note(&self, line: &str) {
        match &self.display {
            Display::Bar(bar) => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    /// Where the run stands now.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let eta = match self.coordinator_eta {
            Some((eta, at)) => Some((eta - now.duration_since(at).as_secs_f64()).max(0.0)),
            None => self
                .started
                .and_then(|start| estimate_eta(now.duration_since(start), self.done, self.total)),
        };
        Snapshot {
            done: self.done,
            total: self.total,
            tally: self.tally,
            // The client hears of tests when they finish, not when they start: every worker
            // is taken to be busy while tests remain (true but for the run's first and last
            // moments).
            running: self.workers.min(self.total.saturating_sub(self.done)),
            eta,
        }
    }

    fn redraw(&self, now: Instant) {
        if let Display::Bar(bar) = &self.display {
            bar.set_position(u64::from(self.done));
            bar.set_message(bar_message(&self.snapshot(now), self.color));
        }
    }

    /// Ends the display: the bar is cleared, so the report that follows starts clean.
    pub fn finish(&mut self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(done: u32, total: u32, failed: u32, running: u32, eta: Option<f64>) -> Snapshot {
        Snapshot {
            done,
            total,
            tally: Tally {
                failed,
                passed: done - failed,
                ..Default::default()
            },
            running,
            eta,
        }
    }

    #[test]
    fn plain_lines_read_like_the_brief() {
        assert_eq!(
            plain_line(&snapshot(400, 1000, 2, 3, Some(12.0))),
            "[ 40%] 400/1000 tests, 2 failed, 3 running, ETA 12s"
        );
        assert_eq!(
            plain_line(&snapshot(0, 55, 0, 2, None)),
            "[  0%] 0/55 tests, 0 failed, 2 running"
        );
        assert_eq!(
            plain_line(&snapshot(55, 55, 4, 0, Some(0.0))),
            "[100%] 55/55 tests, 4 failed, 0 running, ETA 0s"
        );
        let mut with_errors = snapshot(9, 10, 1, 1, None);
        with_errors.tally.error = 2;
        assert_eq!(
            plain_line(&with_errors),
            "[ 90%] 9/10 tests, 1 failed, 2 errors, 1 running"
        );
        // pytest rounds its percentage down.
        assert!(plain_line(&snapshot(999, 1000, 0, 1, None)).starts_with("[ 99%]"));
        assert!(!plain_line(&snapshot(1, 3, 1, 1, Some(3.0))).contains('\x1b'));
    }

    #[test]
    fn bar_messages_count_by_outcome() {
        let mut s = snapshot(10, 20, 1, 2, Some(75.0));
        s.tally.skipped = 3;
        s.tally.passed = 6;
        assert_eq!(
            bar_message(&s, false),
            "2 running, ETA 1m15s | 1 failed, 6 passed, 3 skipped"
        );
        let coloured = bar_message(&s, true);
        assert!(coloured.contains("\x1b[31m") || coloured.contains("\x1b[1m"));
        assert_eq!(console::strip_ansi_codes(&coloured), bar_message(&s, false));
    }

    #[test]
    fn etas_follow_the_pace_so_far() {
        assert_eq!(estimate_eta(Duration::from_secs(10), 0, 100), None);
        assert_eq!(estimate_eta(Duration::from_secs(10), 25, 100), Some(30.0));
        assert_eq!(estimate_eta(Duration::from_secs(10), 100, 100), Some(0.0));
        assert_eq!(format_eta(0.2), "1s");
        assert_eq!(format_eta(59.0), "59s");
        assert_eq!(format_eta(185.0), "3m05s");
        assert_eq!(format_eta(7620.0), "2h07m");
        assert_eq!(format_eta(f64::NAN), "0s");
    }

    #[test]
    fn plain_display_counts_results_and_estimates_running_tests() {
        let start = Instant::now();
        let mut progress = Progress::new(false, false);
        assert!(!progress.is_active());
        progress.status(
            &RunStatus {
                collected: 4,
                workers: 2,
                ..Default::default()
            },
            start,
        );
        assert!(progress.is_active());
        let result = |outcome: &str| TestResult {
            nodeid: "t.py::x".into(),
            outcome: outcome.into(),
            ..Default::default()
        };
        progress.result(&result("passed"), start + Duration::from_secs(1));
        progress.result(&result("failed"), start + Duration::from_secs(2));
        progress.result(&result("passed"), start + Duration::from_secs(3));
        let s = progress.snapshot(start + Duration::from_secs(3));
        assert_eq!(
            (s.done, s.total, s.tally.failed, s.tally.passed),
            (3, 4, 1, 2)
        );
        // One test left, so one worker busy; three tests took 3 s, so one more takes 1 s.
        assert_eq!(s.running, 1);
        assert_eq!(s.eta, Some(1.0));
        // The coordinator's estimate, when it sends one, wins and counts down.
        progress.status(
            &RunStatus {
                eta_seconds: 10.0,
                ..Default::default()
            },
            start + Duration::from_secs(3),
        );
        let s = progress.snapshot(start + Duration::from_secs(5));
        assert_eq!(s.eta, Some(8.0));
    }
}
