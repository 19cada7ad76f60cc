//! Faults between hosts, with real processes on separate network hosts (Linux network
//! namespaces joined by veth pairs): a coordinator, three agents and a `run --connect` client.
//! Mid-run one agent's host dies (every process SIGKILLed) and another agent's link is cut for
//! longer than `--agent-timeout`, then restored. The coordinator must notice the half-open
//! connection, put both agents' tests back in the queue, take the cut agent back when it
//! registers afresh, and end with every test's outcome equal to plain pytest's, each counted
//! once, and the abandoned attempts recorded as superseded.
//!
//! No timing assumption: agents hold their workers inside a test (a hook added to the project's
//! conftest) until the test lets them go, so the faults always hit tests in flight, and the
//! fixture project's gate keeps the run open until the cut agent is back.
//!
//! Needs root and `ip`; without them the test fails on CI and is skipped elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fly_tests::check::assert_output_matches;
use fly_tests::db::{FlyDb, Row};
use fly_tests::fly::clean_env;
use fly_tests::gate::Gate;
use fly_tests::netns::{self, Host, Network};
use fly_tests::paths::{fly_binary, python};
use fly_tests::process::Proc;
use fly_tests::pytest::{junit_key, run_plain_pytest, JunitVerdict};
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

const TOKEN: &str = "e2e-netns-token-3b8e61";

/// Seconds of silence after which the coordinator drops an agent.
const AGENT_TIMEOUT: &str = "4";

/// Appended to each copy's conftest: with `FLY_NETNS_HOLD` set (only on the agents), every
/// test's call phase first leaves a marker in that directory (`held-<pid>`, holding the test's
/// node id) and then waits there until a file named `open` appears. Under plain pytest the variable is unset and nothing changes.
const HOLD_HOOK: &str = r#"

# --- added by fly's tests/e2e/netns.rs ---
import time as _netns_time


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    hold = os.environ.get("FLY_NETNS_HOLD")
    if not hold:
        return
    with open(os.path.join(hold, f"held-{os.getpid()}"), "w", encoding="utf-8") as marker:
        marker.write(item.nodeid)
    # Only a guard against a leaked worker: the end-to-end test always opens the hold.
    deadline = _netns_time.monotonic() + 600
    while not os.path.exists(os.path.join(hold, "open")):
        assert _netns_time.monotonic() < deadline, "the hold was never opened"
        _netns_time.sleep(0.05)
"#;

/// A copy of the fixture project with the hold hook.
fn project_copy(sandbox: &Sandbox, name: &str) -> PathBuf {
    let dir = sandbox.copy_project(name);
    let conftest = dir.join("conftest.py");
    let mut text = fs::read_to_string(&conftest)
        .unwrap_or_else(|e| panic!("reading {}: {e}", conftest.display()));
    text.push_str(HOLD_HOOK);
    fs::write(&conftest, text).unwrap_or_else(|e| panic!("writing {}: {e}", conftest.display()));
    dir
}

/// One agent host's process and where its workers wait.
struct Agent {
    host: Host,
    workdir: PathBuf,
    hold: PathBuf,
    process: Proc,
}

impl Agent {
    /// The node ids of the tests its workers are held in (or were, once released).
    fn held(&self) -> BTreeSet<String> {
        let Ok(entries) = fs::read_dir(&self.hold) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("held-"))
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .filter(|nodeid| !nodeid.is_empty())
            .collect()
    }

    fn release(&self) {
        let open = self.hold.join("open");
        fs::write(&open, b"open").unwrap_or_else(|e| panic!("writing {}: {e}", open.display()));
    }
}

/// Everything the processes have said so far, for failure messages.
fn logs(coordinator: &Proc, agents: &[Agent], client: Option<&Proc>) -> String {
    let mut out = format!(
        "--- coordinator stderr ---\n{}",
        fly_tests::process::tail(&coordinator.stderr_so_far(), 8000)
    );
    for agent in agents {
        out.push_str(&format!(
            "\n--- {} stderr ---\n{}",
            agent.process.name(),
            fly_tests::process::tail(&agent.process.stderr_so_far(), 4000)
        ));
    }
    if let Some(client) = client {
        out.push_str(&format!(
            "\n--- client stdout ---\n{}\n--- client stderr ---\n{}",
            fly_tests::process::tail(&client.stdout_so_far(), 4000),
            fly_tests::process::tail(&client.stderr_so_far(), 4000)
        ));
    }
    out
}

/// The agents table row of the agent serving `workdir`, if it registered.
fn agent_row(db: &Path, workdir: &Path) -> Option<Row> {
    let db = FlyDb::open(db).ok()?;
    let rows = db
        .query(
            "agents",
            "SELECT * FROM agents WHERE workdir = ?1",
            &[&workdir.to_string_lossy().into_owned()],
        )
        .ok()?;
    rows.into_iter().next()
}

#[test]
fn a_dead_host_and_a_partitioned_agent_leave_every_outcome_equal_to_plain_pytest() {
    if !netns::require(
        "netns::a_dead_host_and_a_partitioned_agent_leave_every_outcome_equal_to_plain_pytest",
    ) {
        return;
    }
    let sandbox = Sandbox::new("netns");
    let oracle_dir = project_copy(&sandbox, "oracle");
    let oracle = run_plain_pytest(
        &python(),
        &oracle_dir,
        &["."],
        &sandbox.path("junit.xml"),
        &sandbox.dir("pytest-fixture-logs"),
    );
    let client_dir = project_copy(&sandbox, "client");
    let gate = Gate::new(sandbox.path("gate"));

    // Declared before the processes, so it is dropped after them: the processes get their
    // SIGTERM first, then whatever is left on the hosts is killed and the namespaces go.
    let network = Network::new(3);
    let db = sandbox.path("coordinator.db");
    let mut command = network.command(&network.coordinator, &fly_binary("fly-coordinator"));
    command
        .args([
            "serve",
            "--listen",
            "10.77.0.1:0",
            "--agent-timeout",
            AGENT_TIMEOUT,
        ])
        .arg("--db")
        .arg(&db)
        .current_dir(sandbox.path(""));
    clean_env(&mut command, None);
    command.env("FLY_TOKEN", TOKEN);
    let mut coordinator = Proc::spawn("fly-coordinator serve", &mut command);
    let url = coordinator.wait_for_stdout_line(HANG_GUARD, |line| {
        line.strip_prefix("fly-coordinator listening on ")
            .map(|url| url.trim().to_string())
    });
    assert!(
        url.starts_with("http://10.77.0.1:"),
        "coordinator URL {url}"
    );

    let mut agents: Vec<Agent> = Vec::new();
    for (k, host) in network.agents.iter().enumerate() {
        let workdir = project_copy(&sandbox, &format!("agent-{}", k + 1));
        let hold = sandbox.dir(&format!("hold-{}", k + 1));
        let mut command: Command = network.command(host, &fly_binary("fly-agent"));
        command
            .args(["--connect", &url, "--workers", "2", "--workdir"])
            .arg(&workdir)
            .arg("--python")
            .arg(python())
            .current_dir(&workdir);
        clean_env(&mut command, None);
        command.env("FLY_TOKEN", TOKEN).env("FLY_NETNS_HOLD", &hold);
        if k == 2 {
            // Only the agent that never fails keeps the run open (see below).
            command.env("FLY_GATE_FILE", gate.path());
        }
        // Its own process group, to be killed as one.
        command.process_group(0);
        let process = Proc::spawn(&format!("fly-agent {}", k + 1), &mut command);
        agents.push(Agent {
            host: host.clone(),
            workdir,
            hold,
            process,
        });
    }
    let ids: Vec<String> = agents
        .iter()
        .map(|agent| {
            poll_until(HANG_GUARD, || {
                agent_row(&db, &agent.workdir).map(|row| row.text("id"))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} never registered\n{}",
                    agent.process.name(),
                    logs(&coordinator, &agents, None)
                )
            })
        })
        .collect();

    let mut command = network.command(&network.coordinator, &fly_binary("fly-coordinator"));
    command
        .args(["run", "--connect", &url, "--", "."])
        .current_dir(&client_dir);
    clean_env(&mut command, None);
    command.env("FLY_TOKEN", TOKEN);
    let client = Proc::spawn("fly-coordinator run --connect", &mut command);

    // Every agent has a worker held inside a test (its start reached the agent, which told the
    // coordinator): the faults below hit tests in flight.
    for agent in &agents {
        poll_until(HANG_GUARD, || (!agent.held().is_empty()).then_some(())).unwrap_or_else(|| {
            panic!(
                "{} never started a test\n{}",
                agent.process.name(),
                logs(&coordinator, &agents, Some(&client))
            )
        });
    }
    // While held, nothing finishes on agents 1 and 2: these are their tests in flight.
    let in_flight: Vec<BTreeSet<String>> = agents[..2].iter().map(Agent::held).collect();
    // Agent 3 works on from here; it alone holds the fixture project's gate test.
    agents[2].release();

    // Agent 1's host dies: the agent's process group first, then everything else on it.
    let agent1_pid = libc::pid_t::try_from(agents[0].process.pid()).expect("a pid");
    // SAFETY: kill(2) on the process group of a child this test spawned and has not reaped.
    unsafe {
        libc::kill(-agent1_pid, libc::SIGKILL);
    }
    network.kill_host(&agents[0].host);

    // Agent 2's link goes dark. Nothing tells the coordinator: it must notice the silence.
    network.cut(&agents[1].host);
    let reason = poll_until(HANG_GUARD, || {
        let row = agent_row(&db, &agents[1].workdir)?;
        (!row.text("disconnected_at").is_empty()).then(|| row.text("disconnect_reason"))
    })
    .unwrap_or_else(|| {
        panic!(
            "the coordinator never noticed that agent 2's link was cut\n{}",
            logs(&coordinator, &agents, Some(&client))
        )
    });
    let left_lines: Vec<String> = coordinator
        .stderr_so_far()
        .lines()
        .filter(|line| line.contains("agent left") && line.contains(&ids[1]))
        .map(str::to_string)
        .collect();
    assert!(
        !left_lines.is_empty(),
        "the coordinator's log should say that agent 2 left (reason recorded: {reason:?})\n{}",
        logs(&coordinator, &agents, Some(&client))
    );
    // The agent 1 host is gone for good; its departure was noticed too.
    poll_until(HANG_GUARD, || {
        let row = agent_row(&db, &agents[0].workdir)?;
        (!row.text("disconnected_at").is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the coordinator never noticed that agent 1 died\n{}",
            logs(&coordinator, &agents, Some(&client))
        )
    });

    // Agent 2 comes back: it must register afresh and be offered the run, which its gate-held
    // test keeps open on agent 3 (or which waits for agent 2 itself to run that test).
    agents[1].release();
    network.restore(&agents[1].host);
    poll_until(HANG_GUARD, || {
        let row = agent_row(&db, &agents[1].workdir)?;
        row.text("disconnected_at").is_empty().then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "agent 2 never registered again after its link came back\n{}",
            logs(&coordinator, &agents, Some(&client))
        )
    });
    poll_until(HANG_GUARD, || {
        let starts = agents[1]
            .process
            .stderr_so_far()
            .matches("starting run")
            .count();
        (starts >= 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "agent 2 was not offered the run again after registering afresh\n{}",
            logs(&coordinator, &agents, Some(&client))
        )
    });
    gate.open();

    let run = client.wait(HANG_GUARD);
    let context = format!("{}\n{}", run.describe(), logs(&coordinator, &agents, None));
    assert_output_matches(&run, &oracle);

    // Every test has one result with plain pytest's verdict; the summary counted each once.
    let fly_db = FlyDb::open_or_panic(&db);
    let run_id = fly_db.run_id();
    let collection: Vec<String> = fly_db
        .run_tests(&run_id)
        .iter()
        .map(|row| row.text("nodeid"))
        .collect();
    assert_eq!(
        collection, oracle.collection,
        "the run's collection\n{context}"
    );
    let results = fly_db.results(&run_id);
    let by_index: BTreeMap<i64, &Row> = results
        .iter()
        .map(|row| (row.int("test_index").unwrap_or(-1), row))
        .collect();
    assert_eq!(
        (results.len(), by_index.len()),
        (collection.len(), collection.len()),
        "results should hold exactly one row per collected test\n{context}"
    );
    let mut wrong = Vec::new();
    for (index, nodeid) in collection.iter().enumerate() {
        let Some(row) = i64::try_from(index).ok().and_then(|i| by_index.get(&i)) else {
            wrong.push(format!("{nodeid}: no result"));
            continue;
        };
        let outcome = row.text("outcome");
        let expected = oracle.verdicts.get(&junit_key(nodeid));
        if JunitVerdict::from_outcome(&outcome).as_ref() != expected {
            wrong.push(format!(
                "{nodeid}: fly says {outcome:?}, plain pytest {expected:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "outcomes differ from plain pytest's:\n{}\n{context}",
        wrong.join("\n")
    );
    let outcomes = |counts: &BTreeMap<String, u32>| -> BTreeMap<String, u32> {
        counts
            .iter()
            .filter(|(category, _)| category.as_str() != "warnings")
            .map(|(category, n)| (category.clone(), *n))
            .collect()
    };
    assert_eq!(
        outcomes(&recorded_counts(&fly_db, &run_id)),
        outcomes(&oracle.counts),
        "the run's recorded counts should be plain pytest's: each test counted once\n{context}"
    );

    // Reports: the attempt that counts has its phases once; every other attempt (the dead
    // host's, the cut agent's) is marked superseded.
    let reports = fly_db.reports(&run_id);
    let mut wrong = Vec::new();
    for (index, nodeid) in collection.iter().enumerate() {
        let index = i64::try_from(index).unwrap_or(-1);
        let Some(result) = by_index.get(&index) else {
            continue;
        };
        let lease = result.int("lease");
        let mine: Vec<&Row> = reports
            .iter()
            .filter(|r| r.int("test_index") == Some(index))
            .collect();
        let counting: Vec<&&Row> = mine
            .iter()
            .filter(|r| r.int("superseded") == Some(0))
            .collect();
        if counting.iter().any(|r| r.int("lease") != lease) {
            wrong.push(format!(
                "{nodeid}: a report of another lease than the result's ({lease:?}) counts"
            ));
        }
        let phases: Vec<String> = counting.iter().map(|r| r.text("phase")).collect();
        let count = |p: &str| phases.iter().filter(|x| *x == p).count();
        let setup_passed = counting
            .iter()
            .any(|r| r.text("phase") == "setup" && r.text("outcome") == "passed");
        if count("setup") != 1
            || count("teardown") != 1
            || count("call") != usize::from(setup_passed)
        {
            wrong.push(format!("{nodeid}: counting phases {phases:?}"));
        }
    }
    // Reports of any other attempt than the result's are superseded: those of abandoned
    // leases that reached the coordinator before the fault, and any that came late.
    for report in &reports {
        let index = report.int("test_index").unwrap_or(-1);
        let counts = by_index
            .get(&index)
            .is_some_and(|result| result.int("lease") == report.int("lease"));
        if !counts && report.int("superseded") != Some(1) {
            wrong.push(format!(
                "a report of an attempt that does not count is not superseded: {report:?}"
            ));
        }
    }
    // The tests in flight on the dead host and behind the cut link were run again elsewhere
    // (or by agent 2 after it came back); the dead host has no result.
    let result_of = |nodeid: &str| {
        collection
            .iter()
            .position(|id| id == nodeid)
            .and_then(|i| i64::try_from(i).ok())
            .and_then(|i| by_index.get(&i))
    };
    for (k, nodeids) in in_flight.iter().enumerate() {
        for nodeid in nodeids {
            let Some(result) = result_of(nodeid) else {
                wrong.push(format!("agent {}'s test {nodeid} has no result", k + 1));
                continue;
            };
            if result.int("attempts").unwrap_or(0) < 2 {
                wrong.push(format!(
                    "agent {}'s test {nodeid} was in flight at the fault, so it needs a second \
                     attempt: {result:?}",
                    k + 1
                ));
            }
        }
    }
    for row in results.iter().filter(|r| r.text("agent_id") == ids[0]) {
        if in_flight[0].contains(&row.text("nodeid")) {
            wrong.push(format!(
                "a result from the dead host's abandoned attempt: {row:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}\n{context}", wrong.join("\n"));
}

/// The run's counts as recorded in `runs.counts`.
fn recorded_counts(db: &FlyDb, run_id: &str) -> BTreeMap<String, u32> {
    let run = db.run(run_id);
    serde_json::from_str(&run.text("counts"))
        .unwrap_or_else(|e| panic!("runs.counts is not a JSON object of counts ({e}): {run:?}"))
}
