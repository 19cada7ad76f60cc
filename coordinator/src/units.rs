//! Units of work: which tests must run together on one worker, and what each is expected to
//! cost, from the run's collection, the `--dist` mode and the project's duration history.
//!
//! A unit is handed out whole and its tests run in collection order, so tests that share an
//! expensive module or class fixture can pay for it once. Costs are in reference seconds (see
//! `History`); tests without history are estimated from their file's median, then the run's.

use std::collections::HashMap;
use std::str::FromStr;

use crate::collection::Collection;
use crate::store::History;

/// `--dist`: pytest-xdist's distribution modes, plus `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dist {
    /// Each test alone, except modules and classes whose shared fixtures cost more than
    /// splitting them would save.
    Auto,
    /// Each test alone.
    Load,
    /// A file's tests together.
    LoadFile,
    /// A module's test functions together, a class's test methods together.
    LoadScope,
    /// Tests marked `xdist_group(name)` together by name; the rest alone.
    LoadGroup,
}

impl FromStr for Dist {
    type Err = String;

    fn from_str(s: &str) -> Result<Dist, String> {
        match s {
            "" | "auto" => Ok(Dist::Auto),
            "load" => Ok(Dist::Load),
            "loadfile" => Ok(Dist::LoadFile),
            "loadscope" => Ok(Dist::LoadScope),
            "loadgroup" => Ok(Dist::LoadGroup),
            other => Err(format!(
                "unknown --dist {other:?}: expected auto, load, loadfile, loadscope or loadgroup"
            )),
        }
    }
}

/// Tests that go to one worker together, in collection order.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub tests: Vec<u32>,
    /// Expected time in reference seconds, shared fixture setup included.
    pub cost: f64,
}

/// Per-test cost estimates and what they are based on.
#[derive(Debug, Clone)]
pub struct Estimates {
    /// Expected duration of each test, by index, in reference seconds.
    pub per_test: Vec<f64>,
    /// Whether `per_test[i]` comes from the test's own history.
    pub known: Vec<bool>,
}

/// The part of a nodeid that names the test, without its parameters: `f.py::C::t[x::y]` ->
/// `f.py::C::t`.
fn without_params(nodeid: &str) -> &str {
    match nodeid.find('[') {
        Some(i) => &nodeid[..i],
        None => nodeid,
    }
}

/// The file a test lives in: `pkg/test_a.py`.
pub fn file_of(nodeid: &str) -> &str {
    let base = without_params(nodeid);
    match base.find("::") {
        Some(i) => &base[..i],
        None => base,
    }
}

/// pytest-xdist's scope of a test: its class for a test method, its module for a function.
pub fn scope_of(nodeid: &str) -> &str {
    let base = without_params(nodeid);
    match base.rfind("::") {
        Some(i) if base[..i].contains("::") => &base[..i],
        _ => file_of(nodeid),
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Estimates every test: its own history, else its file's median, else the run's median,
/// else `default`.
pub fn estimate(tests: &Collection, history: &History, default: f64) -> Estimates {
    let mut per_test = vec![f64::NAN; tests.len()];
    let mut known = vec![false; tests.len()];
    let mut by_file: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut all = Vec::new();
    for (i, nodeid) in tests.nodeids().enumerate() {
        if let Some(d) = history.tests.get(nodeid) {
            if d.is_finite() && *d >= 0.0 {
                per_test[i] = *d;
                known[i] = true;
                by_file.entry(file_of(nodeid)).or_default().push(*d);
                all.push(*d);
            }
        }
    }
    let run_median = median(&mut all).unwrap_or(default);
    let file_medians: HashMap<&str, f64> = by_file
        .into_iter()
        .filter_map(|(file, mut values)| median(&mut values).map(|m| (file, m)))
        .collect();
    for (i, nodeid) in tests.nodeids().enumerate() {
        if !known[i] {
            per_test[i] = file_medians
                .get(file_of(nodeid))
                .copied()
                .unwrap_or(run_median);
        }
    }
    Estimates { per_test, known }
}

/// Groups the run's tests into units for `dist`.
pub fn build(
    tests: &Collection,
    estimates: &Estimates,
    history: &History,
    dist: Dist,
) -> Vec<Unit> {
    let single = |i: usize| Unit {
        tests: vec![i as u32],
        cost: estimates.per_test[i],
    };
    // `key(index, nodeid)`: what the test's unit is named by, if it shares one.
    let grouped = |key: &dyn Fn(usize, &str) -> Option<String>| -> Vec<Unit> {
        let mut units: Vec<Unit> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, nodeid) in tests.nodeids().enumerate() {
            match key(i, nodeid) {
                Some(k) => {
                    let slot = *index.entry(k).or_insert_with(|| {
                        units.push(Unit {
                            tests: Vec::new(),
                            cost: 0.0,
                        });
                        units.len() - 1
                    });
                    units[slot].tests.push(i as u32);
                    units[slot].cost += estimates.per_test[i];
                }
                None => units.push(single(i)),
            }
        }
        units
    };
    match dist {
        Dist::Load => (0..tests.len()).map(single).collect(),
        Dist::LoadFile => grouped(&|_, nodeid| Some(file_of(nodeid).to_string())),
        Dist::LoadScope => grouped(&|_, nodeid| Some(scope_of(nodeid).to_string())),
        Dist::LoadGroup => grouped(&|i, _| {
            let group = tests.group(i);
            (!group.is_empty()).then(|| format!("group:{group}"))
        }),
        Dist::Auto => {
            // Keep a scope together when its fixture setup costs at least half of what its tests
            // take: splitting it over k workers pays the setup k times to save less than that.
            let mut per_scope: HashMap<&str, Vec<f64>> = HashMap::new();
            for (i, nodeid) in tests.nodeids().enumerate() {
                per_scope
                    .entry(scope_of(nodeid))
                    .or_default()
                    .push(estimates.per_test[i]);
            }
            // History charges the fixture to whichever test paid it: the scope's first test
            // when the scope ran on one worker, but one test per worker when an earlier run
            // split it. A test whose estimate is the fixture plus a typical test of its scope
            // paid it; counting those whole would make a split scope look expensive to keep
            // together, and so split it again run after run.
            let own_time = |fixture: f64, estimates: &[f64]| -> f64 {
                let mut sorted = estimates.to_vec();
                sorted.sort_by(f64::total_cmp);
                let typical = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
                estimates
                    .iter()
                    .map(|e| {
                        if *e >= fixture + typical * 0.5 {
                            (e - fixture).max(0.0)
                        } else {
                            *e
                        }
                    })
                    .sum()
            };
            let together = |scope: &str| {
                history.scopes.get(scope).is_some_and(|fixture| {
                    let estimates = per_scope.get(scope).map(Vec::as_slice).unwrap_or(&[]);
                    *fixture > 0.0 && *fixture >= 0.5 * own_time(*fixture, estimates)
                })
            };
            grouped(&|_, nodeid| {
                let scope = scope_of(nodeid);
                together(scope).then(|| scope.to_string())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fly_common::proto::CollectedTest;

    fn listed(ids: &[&str]) -> Vec<CollectedTest> {
        ids.iter()
            .map(|id| CollectedTest {
                nodeid: id.to_string(),
                file: file_of(id).to_string(),
                line: 1,
                group: String::new(),
            })
            .collect()
    }

    fn collected(ids: &[&str]) -> Collection {
        Collection::from(listed(ids).as_slice())
    }

    fn history(tests: &[(&str, f64)], scopes: &[(&str, f64)]) -> History {
        History {
            tests: tests.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            scopes: scopes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn scopes_follow_xdist() {
        assert_eq!(scope_of("a/t.py::test_x"), "a/t.py");
        assert_eq!(scope_of("a/t.py::TestC::test_x"), "a/t.py::TestC");
        assert_eq!(scope_of("a/t.py::test_p[a::b]"), "a/t.py");
        assert_eq!(file_of("a/t.py::TestC::test_x[1]"), "a/t.py");
    }

    #[test]
    fn unknown_tests_take_their_files_median_then_the_runs() {
        let tests = collected(&["a.py::t1", "a.py::t2", "a.py::new", "b.py::t1", "c.py::new"]);
        let h = history(
            &[("a.py::t1", 1.0), ("a.py::t2", 3.0), ("b.py::t1", 10.0)],
            &[],
        );
        let e = estimate(&tests, &h, 0.5);
        assert_eq!(e.per_test, vec![1.0, 3.0, 2.0, 10.0, 3.0]);
        assert_eq!(e.known, vec![true, true, false, true, false]);
        let none = estimate(&tests, &History::default(), 0.5);
        assert!(none.per_test.iter().all(|d| *d == 0.5));
    }

    #[test]
    fn dist_modes_group_like_xdist() {
        let ids = [
            "a.py::t1",
            "a.py::C::t2",
            "a.py::C::t3",
            "b.py::t4",
            "a.py::t5",
        ];
        let tests = collected(&ids);
        let e = estimate(&tests, &History::default(), 1.0);
        let h = History::default();
        let groups = |d| {
            build(&tests, &e, &h, d)
                .into_iter()
                .map(|u| u.tests)
                .collect::<Vec<_>>()
        };
        assert_eq!(groups(Dist::Load).len(), 5);
        assert_eq!(groups(Dist::LoadFile), vec![vec![0, 1, 2, 4], vec![3]]);
        assert_eq!(
            groups(Dist::LoadScope),
            vec![vec![0, 4], vec![1, 2], vec![3]]
        );
        let mut marked = listed(&ids);
        marked[0].group = "db".into();
        marked[3].group = "db".into();
        let marked = Collection::from(marked.as_slice());
        let units: Vec<Vec<u32>> = build(&marked, &e, &h, Dist::LoadGroup)
            .into_iter()
            .map(|u| u.tests)
            .collect();
        assert_eq!(units, vec![vec![0, 3], vec![1], vec![2], vec![4]]);
    }

    #[test]
    fn auto_keeps_a_module_together_only_when_its_fixture_outweighs_its_tests() {
        let tests = collected(&["fix.py::t1", "fix.py::t2", "slow.py::t1", "slow.py::t2"]);
        let h = history(
            &[
                ("fix.py::t1", 0.32),
                ("fix.py::t2", 0.02),
                ("slow.py::t1", 2.0),
                ("slow.py::t2", 2.0),
            ],
            &[("fix.py", 0.3), ("slow.py", 0.3)],
        );
        let e = estimate(&tests, &h, 0.1);
        let units = build(&tests, &e, &h, Dist::Auto);
        let groups: Vec<Vec<u32>> = units.iter().map(|u| u.tests.clone()).collect();
        assert_eq!(groups, vec![vec![0, 1], vec![2], vec![3]]);
    }

    #[test]
    fn a_module_split_last_time_is_still_kept_together() {
        // Last run spread the module over three workers: three tests paid its 0.3 s fixture.
        let ids: Vec<String> = (0..10).map(|i| format!("fix.py::t{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let tests = collected(&refs);
        let durations: Vec<(&str, f64)> = refs
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, if i % 4 == 0 { 0.32 } else { 0.02 }))
            .collect();
        let h = history(&durations, &[("fix.py", 0.3)]);
        let e = estimate(&tests, &h, 0.1);
        let units = build(&tests, &e, &h, Dist::Auto);
        assert_eq!(
            units.len(),
            1,
            "{:?}",
            units.iter().map(|u| &u.tests).collect::<Vec<_>>()
        );
    }
}
