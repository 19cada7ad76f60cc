//! `--durations`: pytest's `slowest N durations` section, built from the phase timings of the
//! results a run streams to its client.

use fly_common::outcome::Phase;
use fly_common::proto::TestResult;

use super::sep;

/// pytest's default for `--durations-min` (without `-vv`).
const DEFAULT_MIN_SECONDS: f64 = 0.005;

/// One phase's timing.
#[derive(Debug, Clone)]
struct Timing {
    seconds: f64,
    phase: Phase,
    nodeid: String,
    /// Arrival order: equal durations keep it, as pytest's stable sort keeps report order.
    seq: u64,
}

/// The slowest phases of a run, as `pytest --durations N` lists them.
#[derive(Debug, Clone)]
pub struct Durations {
    /// How many to list; `None` for all (`--durations 0`).
    limit: Option<usize>,
    min_seconds: f64,
    /// The minimum was given, so pytest's "Use -vv" hint is not printed.
    min_given: bool,
    timings: Vec<Timing>,
    seq: u64,
}

impl Durations {
    /// `count` as `--durations` takes it (0: all), `min_seconds` as `--durations-min` (pytest's
    /// default when `None`: 0.005, or 0 from verbosity 2 on).
    pub fn new(count: usize, min_seconds: Option<f64>, verbosity: i32) -> Durations {
        Durations {
            limit: (count > 0).then_some(count),
            min_seconds: min_seconds.unwrap_or(if verbosity >= 2 {
                0.0
            } else {
                DEFAULT_MIN_SECONDS
            }),
            min_given: min_seconds.is_some(),
            timings: Vec::new(),
            seq: 0,
        }
    }

    /// Records the phases of one test's result.
    pub fn add(&mut self, result: &TestResult) {
        for phase in &result.phases {
            let Some(which) = Phase::from_proto(phase.phase) else {
                continue;
            };
            self.timings.push(Timing {
                seconds: if phase.duration.is_finite() {
                    phase.duration
                } else {
                    0.0
                },
                phase: which,
                nodeid: result.nodeid.clone(),
                seq: self.seq,
            });
            self.seq += 1;
        }
        // Only the slowest `limit` can be listed: a big run keeps no more than a few times that.
        if let Some(limit) = self.limit {
            if self.timings.len() > limit.saturating_mul(4).max(1024) {
                self.sort();
                self.timings.truncate(limit);
            }
        }
    }

    fn sort(&mut self) {
        self.timings.sort_by(|a, b| {
            b.seconds
                .total_cmp(&a.seconds)
                .then_with(|| a.seq.cmp(&b.seq))
        });
    }

    /// The section as pytest prints it: nothing when no phase was timed, else the header and
    /// one `0.52s call     path::test` line per phase, slowest first, and a note for those
    /// under the minimum.
    pub fn render(&self, width: usize) -> String {
        if self.timings.is_empty() {
            return String::new();
        }
        let mut timings = self.clone();
        timings.sort();
        let listed = match self.limit {
            Some(limit) => &timings.timings[..limit.min(timings.timings.len())],
            None => &timings.timings[..],
        };
        let title = match self.limit {
            Some(limit) => format!("slowest {limit} durations"),
            None => "slowest durations".to_string(),
        };
        let mut out = sep('=', &title, width);
        out.push('\n');
        for (i, timing) in listed.iter().enumerate() {
            if timing.seconds < self.min_seconds {
                let mut note = format!(
                    "({} durations < {}s hidden.",
                    listed.len() - i,
                    self.min_seconds
                );
                if !self.min_given {
                    note.push_str("  Use -vv to show these durations.");
                }
                note.push(')');
                out.push('\n');
                out.push_str(&note);
                out.push('\n');
                break;
            }
            out.push_str(&format!(
                "{:02.2}s {:<8} {}\n",
                timing.seconds,
                timing.phase.as_str(),
                timing.nodeid
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::PhaseResult;

    fn result(nodeid: &str, setup: f64, call: f64, teardown: f64) -> TestResult {
        let phase = |which: Phase, duration: f64| PhaseResult {
            phase: which.to_proto() as i32,
            outcome: "passed".into(),
            duration,
            ..Default::default()
        };
        TestResult {
            nodeid: nodeid.into(),
            phases: vec![
                phase(Phase::Setup, setup),
                phase(Phase::Call, call),
                phase(Phase::Teardown, teardown),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn lists_the_slowest_phases_like_pytest() {
        let mut durations = Durations::new(3, None, 0);
        durations.add(&result("t.py::test_a", 0.001, 0.52, 0.0));
        durations.add(&result("t.py::test_b", 1.25, 0.003, 12.5));
        let text = durations.render(80);
        assert_eq!(
            text,
            format!(
                "{}\n12.50s teardown t.py::test_b\n1.25s setup    t.py::test_b\n\
                 0.52s call     t.py::test_a\n",
                sep('=', "slowest 3 durations", 80)
            )
        );
    }

    #[test]
    fn short_phases_are_hidden_with_pytest_note() {
        let mut durations = Durations::new(5, None, 0);
        durations.add(&result("t.py::test_a", 0.001, 0.01, 0.002));
        durations.add(&result("t.py::test_b", 0.0, 0.004, 0.0));
        let text = durations.render(80);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "0.01s call     t.py::test_a",
                "",
                "(4 durations < 0.005s hidden.  Use -vv to show these durations.)"
            ]
        );

        // A minimum given explicitly: no -vv hint.
        let mut durations = Durations::new(2, Some(0.5), 0);
        durations.add(&result("t.py::test_a", 0.0, 0.01, 0.0));
        assert!(durations
            .render(80)
            .ends_with("\n(2 durations < 0.5s hidden.)\n"));

        // -vv shows everything.
        let mut durations = Durations::new(5, None, 2);
        durations.add(&result("t.py::test_a", 0.0, 0.001, 0.0));
        assert_eq!(durations.render(80).lines().count(), 4);
    }

    #[test]
    fn zero_means_all_and_order_is_stable() {
        let mut durations = Durations::new(0, Some(0.0), 0);
        for i in 0..2000 {
            durations.add(&result(&format!("t.py::test_{i}"), 0.0, 0.0, 0.0));
        }
        durations.add(&result("t.py::slow", 0.0, 3.0, 0.0));
        let text = durations.render(80);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], sep('=', "slowest durations", 80));
        assert_eq!(lines.len(), 1 + 2001 * 3);
        assert_eq!(lines[1], "3.00s call     t.py::slow");
        // Ties keep arrival order.
        assert_eq!(lines[2], "0.00s setup    t.py::test_0");
        assert_eq!(lines[3], "0.00s call     t.py::test_0");
    }

    #[test]
    fn a_big_run_keeps_only_the_slowest() {
        let mut durations = Durations::new(2, Some(0.0), 0);
        for i in 0..5000 {
            durations.add(&result(
                &format!("t.py::test_{i}"),
                0.0,
                i as f64 / 1000.0,
                0.0,
            ));
        }
        assert!(durations.timings.len() <= 4 * 1024);
        let text = durations.render(80);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "5.00s call     t.py::test_4999",
                "5.00s call     t.py::test_4998"
            ]
        );
    }

    #[test]
    fn nothing_timed_prints_nothing() {
        assert_eq!(Durations::new(5, None, 0).render(80), "");
    }
}
