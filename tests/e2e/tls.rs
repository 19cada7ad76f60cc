//! TLS end to end, with a CA and a server certificate made at test time: a coordinator serving
//! `--tls-cert`/`--tls-key` (and a token) takes an agent trusting the CA through `FLY_CA` and a
//! `run --connect https://localhost:PORT --ca ca.pem` whose run agrees with plain pytest; a
//! client trusting another CA fails with a message that names the certificate.

use fly_tests::auth::{self, make_certs};
use fly_tests::check::assert_run_matches_pytest;
use fly_tests::db::try_count;
use fly_tests::fly::Coordinator;
use fly_tests::paths::python;
use fly_tests::pytest::run_plain_pytest;
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

const TOKEN: &str = "e2e-tls-token-0c41e2";

#[test]
fn tls_with_generated_certificates_runs_end_to_end_and_the_wrong_ca_fails_clearly() {
    let sandbox = Sandbox::new("tls");
    let client_dir = sandbox.copy_project("client");
    let agent_dir = sandbox.copy_project("agent");
    let farm = make_certs(&sandbox.path("pki-farm"), "farm");
    let other = make_certs(&sandbox.path("pki-other"), "other");
    let oracle_logs = sandbox.dir("pytest-fixture-logs");
    let oracle = run_plain_pytest(
        &python(),
        &client_dir,
        &["."],
        &sandbox.path("junit.xml"),
        &oracle_logs,
    );

    let db = sandbox.path("coordinator.db");
    let cert = farm.cert.to_string_lossy().into_owned();
    let key = farm.key.to_string_lossy().into_owned();
    let coordinator = Coordinator::serve_with(
        &sandbox.path(""),
        &db,
        &["--tls-cert", &cert, "--tls-key", &key],
        &[("FLY_TOKEN", TOKEN)],
    );
    let port = coordinator
        .url
        .strip_prefix("https://127.0.0.1:")
        .unwrap_or_else(|| {
            panic!(
                "a TLS coordinator announces an https:// URL: {}",
                coordinator.url
            )
        });
    // The certificate names both; the client uses the name, the agent the address.
    let by_name = format!("https://localhost:{port}");
    let by_address = coordinator.url.clone();

    let wrong_ca = other.ca.to_string_lossy().into_owned();
    let refused = auth::run_connect(
        &client_dir,
        &by_name,
        &["--ca", &wrong_ca],
        &[("FLY_TOKEN", TOKEN)],
        &["."],
    )
    .wait(HANG_GUARD);
    assert_eq!(refused.code, Some(3), "{}", refused.describe());
    assert!(
        refused.stderr.contains("TLS handshake failed")
            && refused.stderr.contains("certificate")
            && refused.stderr.contains("--ca"),
        "a client trusting the wrong CA must say the certificate was refused\n{}",
        refused.describe()
    );

    let fly_logs = sandbox.dir("fly-fixture-logs");
    let ca = farm.ca.to_string_lossy().into_owned();
    let agent = auth::agent(
        "fly-agent (TLS)",
        &by_address,
        &agent_dir,
        Some(&fly_logs),
        &[],
        &[("FLY_TOKEN", TOKEN), ("FLY_CA", &ca)],
    );
    poll_until(HANG_GUARD, || {
        (try_count(&db, "agents")? >= 1).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent never joined over TLS\n--- coordinator ---\n{}\n--- agent ---\n{}",
            coordinator.process().stderr_so_far(),
            agent.stderr_so_far()
        )
    });

    let run = auth::run_connect(
        &client_dir,
        &by_name,
        &["--ca", &ca],
        &[("FLY_TOKEN", TOKEN)],
        &["."],
    )
    .wait(HANG_GUARD);
    assert_run_matches_pytest(&run, &db, &fly_logs, &oracle, &oracle_logs);
}
