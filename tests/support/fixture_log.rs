//! The fixture project's bookkeeping logs (see `fixtures/project/conftest.py`), and the checks
//! that a worker honoured pytest's `nextitem` contract: module fixtures set up once per run of
//! consecutive tests of their module and torn down before a test of another module starts, one
//! session per worker process.

use std::collections::BTreeMap;
use std::path::Path;

/// One line of a worker's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A test began (logged for every test, even one a skip mark stops before its fixtures).
    Start(String),
    /// A test's function fixtures were set up: the test got past its module and session setup.
    Test(String),
    /// The session fixture was set up, in a process with this `PYTEST_XDIST_WORKER` ("-" when
    /// unset).
    SessionSetup(String),
    SessionTeardown,
    ModuleSetup(String),
    ModuleTeardown(String),
}

/// Everything one process logged, in order.
#[derive(Debug, Clone)]
pub struct ProcessLog {
    pub pid: u32,
    pub events: Vec<Event>,
}

/// The module part of a node id (`test_a.py::TestB::test_c[x::y]` -> `test_a.py`).
pub fn module_of(nodeid: &str) -> &str {
    nodeid.split("::").next().unwrap_or(nodeid)
}

fn parse_line(line: &str) -> Result<(u32, Event), String> {
    let mut parts = line.splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let pid: u32 = parts
        .next()
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| format!("no pid in log line {line:?}"))?;
    let rest = parts.next().map(str::to_string);
    let need = |rest: Option<String>| rest.ok_or_else(|| format!("truncated log line {line:?}"));
    let event = match kind {
        "start" => Event::Start(need(rest)?),
        "test" => Event::Test(need(rest)?),
        "session-setup" => Event::SessionSetup(need(rest)?),
        "session-teardown" => Event::SessionTeardown,
        "module-setup" => Event::ModuleSetup(need(rest)?),
        "module-teardown" => Event::ModuleTeardown(need(rest)?),
        _ => return Err(format!("unknown log line {line:?}")),
    };
    Ok((pid, event))
}

/// Reads every process's log from `dir`.
pub fn read_logs(dir: &Path) -> Result<Vec<ProcessLog>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut by_pid: BTreeMap<u32, Vec<Event>> = BTreeMap::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .path();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for line in text.lines().filter(|line| !line.is_empty()) {
            let (pid, event) = parse_line(line).map_err(|e| format!("{}: {e}", path.display()))?;
            by_pid.entry(pid).or_default().push(event);
        }
    }
    Ok(by_pid
        .into_iter()
        .map(|(pid, events)| ProcessLog { pid, events })
        .collect())
}

/// Checks one process's log against pytest's fixture contract. Returns every violation found.
pub fn check_process(log: &ProcessLog) -> Vec<String> {
    let pid = log.pid;
    let mut problems = Vec::new();
    let mut open_module: Option<&str> = None;
    // The module most recently torn down, while no test of another module has started since:
    // setting it up again now would mean it was torn down between two of its own tests.
    let mut just_torn_down: Option<&str> = None;
    let mut session_setups = 0;
    let mut session_open = false;
    let mut session_teardowns = 0;
    for event in &log.events {
        match event {
            Event::SessionSetup(_) => {
                session_setups += 1;
                if session_setups > 1 {
                    problems.push(format!(
                        "pid {pid}: the session fixture was set up {session_setups} times"
                    ));
                }
                session_open = true;
            }
            Event::SessionTeardown => {
                if !session_open {
                    problems.push(format!(
                        "pid {pid}: session fixture torn down while not set up"
                    ));
                }
                session_open = false;
                session_teardowns += 1;
            }
            Event::ModuleSetup(module) => {
                if let Some(open) = open_module {
                    problems.push(format!(
                        "pid {pid}: module fixture of {module} set up while {open}'s is still set up"
                    ));
                }
                if just_torn_down == Some(module.as_str()) {
                    problems.push(format!(
                        "pid {pid}: module fixture of {module} torn down and set up again with no \
                         test of another module in between"
                    ));
                }
                open_module = Some(module);
            }
            Event::ModuleTeardown(module) => {
                if open_module != Some(module.as_str()) {
                    problems.push(format!(
                        "pid {pid}: module fixture of {module} torn down while {open_module:?} is set up"
                    ));
                }
                open_module = None;
                just_torn_down = Some(module);
            }
            Event::Start(nodeid) => {
                let module = module_of(nodeid);
                if let Some(open) = open_module.filter(|open| *open != module) {
                    problems.push(format!(
                        "pid {pid}: {nodeid} started while the module fixture of {open} was still \
                         set up (it should have been torn down after the previous test)"
                    ));
                }
                if just_torn_down.is_some_and(|torn| torn != module) {
                    just_torn_down = None;
                }
            }
            Event::Test(nodeid) => {
                let module = module_of(nodeid);
                if open_module != Some(module) {
                    problems.push(format!(
                        "pid {pid}: {nodeid} ran with module fixture {open_module:?} set up, not {module}'s"
                    ));
                }
                if !session_open {
                    problems.push(format!(
                        "pid {pid}: {nodeid} ran without the session fixture"
                    ));
                }
            }
        }
    }
    if let Some(open) = open_module {
        problems.push(format!(
            "pid {pid}: the module fixture of {open} was never torn down"
        ));
    }
    if session_setups > 0 && (session_open || session_teardowns != 1) {
        problems.push(format!(
            "pid {pid}: the session fixture was torn down {session_teardowns} times, ending {}",
            if session_open { "set up" } else { "torn down" }
        ));
    }
    problems
}

/// Checks every process's log; fails the test listing every violation.
pub fn assert_fixture_contract(label: &str, logs: &[ProcessLog]) {
    let problems: Vec<String> = logs.iter().flat_map(check_process).collect();
    assert!(
        problems.is_empty(),
        "{label}: fixture setup/teardown broke pytest's nextitem contract:\n{}",
        problems.join("\n")
    );
}

/// How often each node id appears as `Start` (which = false) or `Test` (which = true) over all
/// processes.
pub fn tally(logs: &[ProcessLog], tests: bool) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for event in logs.iter().flat_map(|log| &log.events) {
        let nodeid = match (event, tests) {
            (Event::Start(nodeid), false) | (Event::Test(nodeid), true) => nodeid,
            _ => continue,
        };
        *out.entry(nodeid.clone()).or_default() += 1;
    }
    out
}

/// The `PYTEST_XDIST_WORKER` each process reported when its session fixture was set up.
pub fn worker_names(logs: &[ProcessLog]) -> BTreeMap<u32, Vec<String>> {
    logs.iter()
        .map(|log| {
            let names = log
                .events
                .iter()
                .filter_map(|event| match event {
                    Event::SessionSetup(worker) => Some(worker.clone()),
                    _ => None,
                })
                .collect();
            (log.pid, names)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[&str]) -> ProcessLog {
        let events = lines
            .iter()
            .map(|line| parse_line(line).expect("a valid line").1)
            .collect();
        ProcessLog { pid: 1, events }
    }

    #[test]
    fn a_worker_following_nextitem_passes() {
        let ok = log(&[
            "start 1 a.py::t1",
            "session-setup 1 gw0",
            "module-setup 1 a.py",
            "test 1 a.py::t1",
            "start 1 a.py::t2 [with space]",
            "test 1 a.py::t2 [with space]",
            "module-teardown 1 a.py",
            // A skip mark stops b.py's test before its fixtures; a.py is set up again after it.
            "start 1 b.py::skipped",
            "start 1 a.py::t3",
            "module-setup 1 a.py",
            "test 1 a.py::t3",
            "module-teardown 1 a.py",
            "session-teardown 1",
        ]);
        assert_eq!(check_process(&ok), Vec::<String>::new());
    }

    #[test]
    fn a_module_fixture_set_up_twice_in_a_row_is_caught() {
        let twice = log(&[
            "start 1 a.py::t1",
            "session-setup 1 gw0",
            "module-setup 1 a.py",
            "test 1 a.py::t1",
            "module-teardown 1 a.py",
            "start 1 a.py::t2",
            "module-setup 1 a.py",
            "test 1 a.py::t2",
            "module-teardown 1 a.py",
            "session-teardown 1",
        ]);
        assert_eq!(check_process(&twice).len(), 1);
    }

    #[test]
    fn a_module_fixture_left_set_up_is_caught() {
        let leaked = log(&[
            "start 1 a.py::t1",
            "session-setup 1 gw0",
            "module-setup 1 a.py",
            "test 1 a.py::t1",
            "start 1 b.py::t1",
            "module-setup 1 b.py",
            "test 1 b.py::t1",
        ]);
        let problems = check_process(&leaked);
        assert!(problems.len() >= 3, "{problems:?}");
    }
}
