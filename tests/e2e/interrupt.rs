//! Runs that cannot go on as planned: Ctrl-C of `run` (once: the run is cancelled and what
//! finished is kept; twice: it stops at once), a coordinator killed mid-run and restarted
//! followed by `run --resume`, and a database that cannot be written for a while (locked by
//! another process, or a full disk). Nothing recorded is lost, and no pytest process is left
//! behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use fly_tests::db::{try_count, FlyDb};
use fly_tests::fly::{self, clean_env, Coordinator};
use fly_tests::paths::{fly_binary, python};
use fly_tests::process::{Finished, Proc};
use fly_tests::pytest::{parse_summary_line, run_plain_pytest_only, Counts};
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

/// What the store logs when a batch cannot be committed.
const STORE_RETRY_LOG: &str = "writing to the store failed; keeping the writes and retrying";

/// Tests of the interrupted suite: [`QUICK`] quick ones, then slow ones of 30 s that are
/// running or waiting when the run is interrupted after the first results.
const SLEEPERS: usize = 8;
const QUICK: usize = 2;

/// A suite of [`SLEEPERS`] tests. Each starts a Python child that would outlive it by far, and
/// leaves a mark in `marks/` with its worker's pid, the worker's process group and the child's
/// pid, so the test can tell whether anything was left behind; a test that ran to its end also
/// leaves one in `done/`.
fn write_sleepers(project: &Path) -> PathBuf {
    let marks = project.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::create_dir_all(project.join("done")).unwrap();
    std::fs::write(project.join("pytest.ini"), "[pytest]\n").unwrap();
    std::fs::write(
        project.join("test_sleepers.py"),
        format!(
            "import os\nimport subprocess\nimport sys\nimport time\n\nimport pytest\n\n\
             HERE = os.path.dirname(os.path.abspath(__file__))\n\
             CHILDREN = []\n\n\n\
             @pytest.mark.parametrize('n', range({SLEEPERS}))\n\
             def test_sleeps(n):\n\
             \x20   child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n\
             \x20   CHILDREN.append(child)\n\
             \x20   with open(os.path.join(HERE, 'marks', str(n)), 'w') as f:\n\
             \x20       f.write('%d %d %d' % (os.getpid(), os.getpgid(0), child.pid))\n\
             \x20   time.sleep(0.2 if n < {QUICK} else 30)\n\
             \x20   open(os.path.join(HERE, 'done', str(n)), 'w').close()\n"
        ),
    )
    .unwrap();
    marks
}

/// The tests of the sleepers suite that ran to their end.
fn done_sleepers(project: &Path) -> BTreeSet<String> {
    std::fs::read_dir(project.join("done"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            format!(
                "test_sleepers.py::test_sleeps[{}]",
                e.file_name().to_string_lossy()
            )
        })
        .collect()
}

/// The pids and process groups the sleepers' marks name.
fn marked_processes(marks: &Path) -> (BTreeSet<i32>, BTreeSet<i32>) {
    let mut pids = BTreeSet::new();
    let mut groups = BTreeSet::new();
    for entry in std::fs::read_dir(marks).unwrap().filter_map(|e| e.ok()) {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let numbers: Vec<i32> = text
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [worker, group, child] = numbers[..] {
            pids.insert(worker);
            pids.insert(child);
            groups.insert(group);
        }
    }
    (pids, groups)
}

/// Live (not zombie) processes that are one of `pids` or belong to one of `groups`, described.
fn survivors(pids: &BTreeSet<i32>, groups: &BTreeSet<i32>) -> Vec<String> {
    let mut live = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return live;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(state), Some(group)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let group: i32 = group.parse().unwrap_or(0);
        if *state != "Z" && (pids.contains(&pid) || groups.contains(&group)) {
            live.push(format!("{} (group {group})", stat[..=close].trim()));
        }
    }
    live
}

/// Asserts that every process the sleepers' marks name is gone, with their process groups.
fn assert_nothing_left_behind(marks: &Path) {
    let (pids, groups) = marked_processes(marks);
    assert!(
        !pids.is_empty(),
        "no test left a mark in {}",
        marks.display()
    );
    // Killed processes are gone at once; the poll only absorbs the kernel's reaping.
    let left = poll_until(HANG_GUARD, || {
        let left = survivors(&pids, &groups);
        left.is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "processes of the run are still alive: {:?}",
        survivors(&pids, &groups)
    );
}

fn sigint(process: &Proc) {
    process.signal(libc::SIGINT);
}

/// Waits until the database at `db` holds at least `n` results.
fn wait_for_results(db: &Path, n: i64, process: &Proc) {
    poll_until(HANG_GUARD, || {
        (try_count(db, "results")? >= n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{} never recorded {n} results\n--- stderr ---\n{}",
            process.name(),
            process.stderr_so_far()
        )
    });
}

/// The counts of the summary line that ends `run`'s stdout (framed in `=` or, under `-q`,
/// bare).
fn summary_counts(run: &Finished) -> Counts {
    let line = run.last_stdout_line().trim();
    let framed = if line.starts_with('=') {
        line.to_string()
    } else {
        format!("= {line} =")
    };
    parse_summary_line(&framed)
        .unwrap_or_else(|| panic!("no summary line at the end\n{}", run.describe()))
}

#[test]
fn ctrl_c_cancels_a_local_run_keeps_what_finished_and_leaves_no_process_behind() {
    let sandbox = Sandbox::new("interrupt");
    let project = sandbox.dir("project");
    let marks = write_sleepers(&project);
    let db = sandbox.path("fly.db");
    let run = fly::run_local(&project, &db, None, &["-q"]);
    wait_for_results(&db, 1, &run);
    sigint(&run);
    let run = run.wait(HANG_GUARD);

    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(
        run.stderr
            .contains("interrupted: cancelling the run (press Ctrl-C again to stop now)"),
        "{}",
        run.describe()
    );
    assert!(run.stdout.contains("interrupted"), "{}", run.describe());

    let fly_db = FlyDb::open_or_panic(&db);
    let run_id = fly_db.run_id();
    let row = fly_db.run(&run_id);
    assert_eq!(row.text("status"), "interrupted", "{row:?}");
    assert_eq!(row.int("exit_code"), Some(2), "{row:?}");
    assert_eq!(fly_db.run_tests(&run_id).len(), SLEEPERS);
    // What finished before the interrupt is recorded; the slow tests that were running were
    // stopped, not waited for, and nothing is recorded of them or of those never started.
    let results = fly_db.results(&run_id);
    let recorded: BTreeSet<String> = results.iter().map(|r| r.text("nodeid")).collect();
    let quick: BTreeSet<String> = (0..QUICK)
        .map(|n| format!("test_sleepers.py::test_sleeps[{n}]"))
        .collect();
    assert!(
        !recorded.is_empty() && recorded.is_subset(&quick),
        "{recorded:?}\n{}",
        run.describe()
    );
    assert!(
        done_sleepers(&project).is_subset(&quick),
        "{:?}",
        done_sleepers(&project)
    );
    for result in &results {
        assert_eq!(result.text("outcome"), "passed", "{result:?}");
    }
    // The summary counts exactly what finished, and says how much is left.
    let counts = summary_counts(&run);
    assert_eq!(
        counts,
        Counts::from([("passed".to_string(), results.len() as u32)]),
        "{}",
        run.describe()
    );
    let left = SLEEPERS - results.len();
    assert!(
        run.stdout
            .contains(&format!("{left} of {SLEEPERS} tests have no result")),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains(&format!("--resume {run_id}")),
        "{}",
        run.describe()
    );
    assert_nothing_left_behind(&marks);
}

#[test]
fn a_second_ctrl_c_stops_a_local_run_at_once_and_leaves_no_process_behind() {
    let sandbox = Sandbox::new("interrupt-twice");
    let project = sandbox.dir("project");
    let marks = write_sleepers(&project);
    let db = sandbox.path("fly.db");
    let run = fly::run_local(&project, &db, None, &["-q"]);
    wait_for_results(&db, 1, &run);
    sigint(&run);
    sigint(&run);
    let run = run.wait(HANG_GUARD);

    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.stderr.contains("interrupted"), "{}", run.describe());
    assert_nothing_left_behind(&marks);
}

/// A suite with every kind of verdict and six slow tests: quick ones finish first, the slow
/// ones sleep `RESUME_SLEEP` seconds (0 for plain pytest, so the oracle is quick).
fn write_mixed_suite(dir: &Path) {
    std::fs::write(dir.join("pytest.ini"), "[pytest]\n").unwrap();
    std::fs::write(
        dir.join("test_mixed.py"),
        "import os\nimport time\n\nimport pytest\n\n\
         SLEEP = float(os.environ.get('RESUME_SLEEP', '0'))\n\n\n\
         def test_passes():\n    pass\n\n\n\
         def test_fails():\n    assert 1 == 2\n\n\n\
         def test_skipped():\n    pytest.skip('not here')\n\n\n\
         @pytest.mark.xfail(reason='known')\n\
         def test_xfails():\n    assert False\n\n\n\
         @pytest.mark.parametrize('n', range(6))\n\
         def test_slow(n):\n    time.sleep(SLEEP)\n    assert n != 4\n",
    )
    .unwrap();
}

/// `fly-coordinator run --connect URL --resume RUN_ID` in `project`.
fn run_resume(project: &Path, url: &str, run_id: &str) -> Proc {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--connect", url, "--resume", run_id])
        .current_dir(project);
    clean_env(&mut command, None);
    Proc::spawn("fly-coordinator run --resume", &mut command)
}

#[test]
fn a_run_outlives_its_coordinator_and_resume_runs_only_the_tests_without_a_result() {
    let sandbox = Sandbox::new("resume");
    let dirs = [
        sandbox.dir("client"),
        sandbox.dir("agent-a"),
        sandbox.dir("agent-b"),
        sandbox.dir("oracle"),
    ];
    for dir in &dirs {
        write_mixed_suite(dir);
    }
    let [client_dir, dir_a, dir_b, oracle_dir] = dirs;
    let oracle = run_plain_pytest_only(&python(), &oracle_dir, &["-q"]);
    let oracle_counts = summary_counts(&oracle);
    let total = 10;

    let db = sandbox.path("coordinator.db");
    let first = Coordinator::serve(&sandbox.path(""), &db);
    let agent_a = fly::agent(
        "fly-agent a",
        &first,
        &dir_a,
        None,
        &[("RESUME_SLEEP", Path::new("2"))],
    );
    poll_until(HANG_GUARD, || {
        (try_count(&db, "agents")? >= 1).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the coordinator never recorded agent a\n{}",
            agent_a.stderr_so_far()
        )
    });
    let interrupted = fly::run_connect(&client_dir, &first.url, &["-q"]);
    wait_for_results(&db, 2, &interrupted);
    first.process().signal(libc::SIGKILL);
    let interrupted = interrupted.wait(HANG_GUARD);
    assert_ne!(interrupted.code, Some(0), "{}", interrupted.describe());
    drop(agent_a);
    drop(first);

    let fly_db = FlyDb::open_or_panic(&db);
    let old_id = fly_db.run_id();
    // Nobody was left to say how the run ended.
    assert_eq!(fly_db.run(&old_id).text("status"), "running");
    let old_results: BTreeSet<String> = fly_db
        .results(&old_id)
        .iter()
        .map(|r| r.text("nodeid"))
        .collect();
    let collection: BTreeSet<String> = fly_db
        .run_tests(&old_id)
        .iter()
        .map(|t| t.text("nodeid"))
        .collect();
    assert_eq!(collection.len(), total);
    assert!(
        !old_results.is_empty() && old_results.len() < total,
        "the coordinator was killed too late to test anything: {old_results:?}"
    );
    let missing: BTreeSet<String> = collection.difference(&old_results).cloned().collect();

    // The restarted coordinator keeps the history and says what became of the run.
    let second = Coordinator::serve(&sandbox.path(""), &db);
    let old_run = fly_db.run(&old_id);
    assert_eq!(old_run.text("status"), "interrupted", "{old_run:?}");
    assert_eq!(
        old_run.text("message"),
        "the coordinator stopped while this run was in progress"
    );
    assert_eq!(fly_db.results(&old_id).len(), old_results.len());
    let _agent_b = fly::agent(
        "fly-agent b",
        &second,
        &dir_b,
        None,
        &[("RESUME_SLEEP", Path::new("0.2"))],
    );

    let resumed = run_resume(&client_dir, &second.url, &old_id).wait(HANG_GUARD);
    assert_eq!(resumed.code, oracle.code, "{}", resumed.describe());
    assert!(
        resumed.stderr.contains(&format!(
            "resuming run {old_id}: {} of {total} tests still to run",
            missing.len()
        )),
        "{}",
        resumed.describe()
    );
    // The combined run is the whole suite, as plain pytest counts it; the failure that ran
    // before the restart is shown again.
    assert_eq!(
        summary_counts(&resumed),
        oracle_counts,
        "{}",
        resumed.describe()
    );
    assert!(
        resumed.stdout.contains("FAILED test_mixed.py::test_fails"),
        "{}",
        resumed.describe()
    );

    // Only the tests without a result ran again.
    let new_id = fly_db.run_id();
    assert_ne!(new_id, old_id);
    let new_run = fly_db.run(&new_id);
    assert_eq!(new_run.text("resumed_from"), old_id, "{new_run:?}");
    let ran_again: BTreeSet<String> = fly_db
        .reports(&new_id)
        .iter()
        .map(|r| r.text("nodeid"))
        .collect();
    assert_eq!(ran_again, missing);
    assert_eq!(fly_db.results(&new_id).len(), missing.len());

    // The combined run is complete: resuming it again runs nothing and gives its verdict.
    let complete = run_resume(&client_dir, &second.url, &new_id).wait(HANG_GUARD);
    assert_eq!(complete.code, oracle.code, "{}", complete.describe());
    assert!(
        complete.stdout.contains("nothing to resume"),
        "{}",
        complete.describe()
    );
    assert_eq!(
        summary_counts(&complete),
        oracle_counts,
        "{}",
        complete.describe()
    );
    // The first run was carried on with already; a run that does not exist cannot be resumed.
    let again = run_resume(&client_dir, &second.url, &old_id).wait(HANG_GUARD);
    assert_eq!(again.code, Some(4), "{}", again.describe());
    assert!(
        again.stderr.contains(&format!("--resume {new_id}")),
        "{}",
        again.describe()
    );
    let unknown = run_resume(&client_dir, &second.url, "no-such-run").wait(HANG_GUARD);
    assert_eq!(unknown.code, Some(4), "{}", unknown.describe());
    assert!(
        unknown.stderr.contains("no such run"),
        "{}",
        unknown.describe()
    );
    assert_eq!(try_count(&db, "runs"), Some(2));
}

/// A suite of four tests of half a second.
fn write_short_suite(project: &Path) {
    std::fs::write(project.join("pytest.ini"), "[pytest]\n").unwrap();
    std::fs::write(
        project.join("test_short.py"),
        "import time\n\nimport pytest\n\n\n\
         @pytest.mark.parametrize('n', range(4))\n\
         def test_short(n):\n    time.sleep(0.5)\n",
    )
    .unwrap();
}

/// Asserts that the run at `db` passed with all four tests of the short suite recorded.
fn assert_short_run_recorded(db: &Path, run: &Finished) {
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let fly_db = FlyDb::open_or_panic(db);
    let run_id = fly_db.run_id();
    assert_eq!(fly_db.run(&run_id).text("status"), "passed");
    assert_eq!(fly_db.results(&run_id).len(), 4);
    assert_eq!(fly_db.reports(&run_id).len(), 12);
}

#[test]
fn a_database_locked_by_another_process_holds_results_back_and_loses_none() {
    let sandbox = Sandbox::new("locked-db");
    let project = sandbox.dir("project");
    write_short_suite(&project);
    let db = sandbox.path("fly.db");
    let run = fly::run_local(&project, &db, None, &["-q"]);
    poll_until(HANG_GUARD, || (try_count(&db, "runs")? >= 1).then_some(()))
        .unwrap_or_else(|| panic!("the run was never recorded\n{}", run.stderr_so_far()));

    let locker = rusqlite::Connection::open(&db).expect("a second connection");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("lock the database");
    // The coordinator says so loudly (after SQLite's own 5 s wait for the lock)...
    poll_until(HANG_GUARD, || {
        run.stderr_so_far().contains(STORE_RETRY_LOG).then_some(())
    })
    .unwrap_or_else(|| panic!("no complaint about the lock\n{}", run.stderr_so_far()));
    // ...and once the lock is gone, everything it kept lands.
    locker.execute_batch("COMMIT").expect("unlock the database");
    drop(locker);
    let run = run.wait(HANG_GUARD);
    assert_short_run_recorded(&db, &run);
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as mount(8) takes it) at `path`; `None` where this process
    /// may not mount (not root, or in a container without the capability).
    fn mount(path: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| SmallDisk {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a process that still has a file open there must not keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_holds_results_back_and_loses_none() {
    let sandbox = Sandbox::new("full-disk");
    let project = sandbox.dir("project");
    write_short_suite(&project);
    let Some(disk) = SmallDisk::mount(&sandbox.path("disk"), "8m") else {
        eprintln!("skipped: this process cannot mount a small tmpfs to fill (needs root)");
        return;
    };
    let db = disk.path.join("fly.db");
    let run = fly::run_local(&project, &db, None, &["-q"]);
    poll_until(HANG_GUARD, || (try_count(&db, "runs")? >= 1).then_some(()))
        .unwrap_or_else(|| panic!("the run was never recorded\n{}", run.stderr_so_far()));

    // Fill every byte left, then give it back once the coordinator has noticed.
    let filler = disk.path.join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler file");
    let block = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut file, &block).is_ok() {}
    let _ = std::io::Write::write_all(&mut file, &[0u8; 512]);
    let _ = file.sync_all();
    poll_until(HANG_GUARD, || {
        run.stderr_so_far().contains(STORE_RETRY_LOG).then_some(())
    })
    .unwrap_or_else(|| panic!("no complaint about the full disk\n{}", run.stderr_so_far()));
    drop(file);
    std::fs::remove_file(&filler).expect("free the disk");
    let run = run.wait(HANG_GUARD);
    assert_short_run_recorded(&db, &run);
    drop(disk);
}
