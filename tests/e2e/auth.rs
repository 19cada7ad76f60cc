//! The farm's token. An agent or a `run --connect` client without it, or with a wrong one, is
//! refused with a message that says so and a non-zero exit, and the coordinator's log shows
//! the refusal without ever showing a token; with the right token (from `FLY_TOKEN` or
//! `--token-file`) a run goes through and agrees with plain pytest. A coordinator without a
//! token refuses to listen anywhere but loopback, unless `--insecure`.

use fly_tests::auth;
use fly_tests::check::assert_run_matches_pytest;
use fly_tests::db::try_count;
use fly_tests::fly::Coordinator;
use fly_tests::paths::python;
use fly_tests::pytest::run_plain_pytest;
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

const TOKEN: &str = "e2e-farm-token-5f3a9c";
const WRONG: &str = "e2e-wrong-token-77b1d0";

#[test]
fn agents_and_clients_without_the_right_token_are_refused_and_the_refusal_is_logged() {
    let sandbox = Sandbox::new("auth-refused");
    let project = sandbox.copy_project("project");
    let db = sandbox.path("coordinator.db");
    let coordinator = Coordinator::serve_with(&sandbox.path(""), &db, &[], &[("FLY_TOKEN", TOKEN)]);

    for (case, args) in [
        ("no token", Vec::new()),
        ("wrong token", vec!["--token", WRONG]),
    ] {
        let agent = auth::agent(
            &format!("fly-agent ({case})"),
            &coordinator.url,
            &project,
            None,
            &args,
            &[],
        )
        .wait(HANG_GUARD);
        assert!(
            matches!(agent.code, Some(code) if code != 0),
            "an agent with {case} must exit non-zero at once, not retry\n{}",
            agent.describe()
        );
        assert!(
            agent.stderr.contains("refused this agent") && agent.stderr.contains(case),
            "the agent must say its token was refused ({case})\n{}",
            agent.describe()
        );

        let run =
            auth::run_connect(&project, &coordinator.url, &args, &[], &["."]).wait(HANG_GUARD);
        assert_eq!(
            run.code,
            Some(3),
            "a client with {case} exits 3\n{}",
            run.describe()
        );
        assert!(
            run.stderr.contains("refused the run") && run.stderr.contains(case),
            "the client must say its token was refused ({case})\n{}",
            run.describe()
        );
        for output in [&agent.stderr, &run.stderr] {
            assert!(!output.contains(TOKEN) && !output.contains(WRONG));
        }
    }

    // Each refusal is in the coordinator's log, with the peer and the reason.
    let log = poll_until(HANG_GUARD, || {
        let log = coordinator.process().stderr_so_far();
        let complete = log.matches("refused an agent from 127.0.0.1:").count() >= 2
            && log.matches("refused a client from 127.0.0.1:").count() >= 2;
        complete.then_some(log)
    })
    .unwrap_or_else(|| {
        panic!(
            "the coordinator's log does not show two refused agents and two refused clients\n{}",
            coordinator.process().stderr_so_far()
        )
    });
    assert!(
        log.contains("no token") && log.contains("wrong token"),
        "{log}"
    );
    assert!(
        !log.contains(TOKEN) && !log.contains(WRONG),
        "a token reached the coordinator's log\n{log}"
    );
    assert_eq!(
        try_count(&db, "agents"),
        Some(0),
        "a refused agent must not be recorded"
    );
    assert_eq!(
        try_count(&db, "runs"),
        Some(0),
        "a refused run must not be created"
    );
}

#[test]
fn with_the_right_token_from_the_environment_or_a_file_a_run_agrees_with_pytest() {
    let sandbox = Sandbox::new("auth-ok");
    let client_dir = sandbox.copy_project("client");
    let agent_dir = sandbox.copy_project("agent");
    let oracle_logs = sandbox.dir("pytest-fixture-logs");
    let oracle = run_plain_pytest(
        &python(),
        &client_dir,
        &["."],
        &sandbox.path("junit.xml"),
        &oracle_logs,
    );

    // As a mounted secret or `echo TOKEN > file` leaves it: with a trailing newline.
    let token_file = sandbox.path("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("writing the token file");
    let token_file = token_file.to_string_lossy().into_owned();
    let db = sandbox.path("coordinator.db");
    let coordinator =
        Coordinator::serve_with(&sandbox.path(""), &db, &["--token-file", &token_file], &[]);
    let fly_logs = sandbox.dir("fly-fixture-logs");
    let agent = auth::agent(
        "fly-agent (FLY_TOKEN)",
        &coordinator.url,
        &agent_dir,
        Some(&fly_logs),
        &[],
        &[("FLY_TOKEN", TOKEN)],
    );
    poll_until(HANG_GUARD, || {
        (try_count(&db, "agents")? >= 1).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent with the right token never joined\n--- coordinator ---\n{}\n\
             --- agent ---\n{}",
            coordinator.process().stderr_so_far(),
            agent.stderr_so_far()
        )
    });

    let run = auth::run_connect(
        &client_dir,
        &coordinator.url,
        &["--token-file", &token_file],
        &[],
        &["."],
    )
    .wait(HANG_GUARD);
    assert_run_matches_pytest(&run, &db, &fly_logs, &oracle, &oracle_logs);
    assert!(
        !coordinator.process().stderr_so_far().contains("refused"),
        "nothing was refused\n{}",
        coordinator.process().stderr_so_far()
    );
}

#[test]
fn without_a_token_a_coordinator_listens_only_on_loopback_unless_insecure() {
    let sandbox = Sandbox::new("auth-listen");
    let project = sandbox.copy_project("project");
    let db = sandbox.path("never.db");
    let db_arg = db.to_string_lossy().into_owned();

    for args in [
        vec!["serve", "--listen", "0.0.0.0:0", "--db", &db_arg],
        vec!["run", "--listen", "0.0.0.0:0", "--db", &db_arg, "--", "."],
    ] {
        let refused = auth::fly(
            "fly-coordinator (0.0.0.0, no token)",
            "fly-coordinator",
            &args,
            &[],
            &project,
            None,
        )
        .wait(HANG_GUARD);
        assert!(
            matches!(refused.code, Some(code) if code != 0),
            "{}",
            refused.describe()
        );
        assert!(
            refused
                .stderr
                .contains("refusing to listen on 0.0.0.0:0 without a token")
                && refused.stderr.contains("--token")
                && refused.stderr.contains("--insecure"),
            "the refusal must name --token and --insecure\n{}",
            refused.describe()
        );
        assert!(
            !db.exists(),
            "a refused coordinator must not open its database"
        );
    }

    let mut insecure = auth::fly(
        "fly-coordinator serve --insecure",
        "fly-coordinator",
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--insecure",
            "--db",
            &db_arg,
        ],
        &[],
        &project,
        None,
    );
    let url = insecure.wait_for_stdout_line(HANG_GUARD, |line| {
        line.strip_prefix("fly-coordinator listening on ")
            .map(str::to_string)
    });
    assert!(url.starts_with("http://0.0.0.0:"), "{url}");
    assert!(
        insecure
            .stderr_so_far()
            .contains("without a token (--insecure)"),
        "--insecure must be warned about\n{}",
        insecure.stderr_so_far()
    );
    insecure.stop();
}
