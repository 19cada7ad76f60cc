//! Starting fly's processes the way a user would: `fly-coordinator serve`, `fly-agent`, and
//! `fly-coordinator run` (served or `--local`), each as a real child process on loopback.

use std::path::Path;
use std::process::Command;

use crate::paths::{fly_binary, python};
use crate::process::Proc;
use crate::HANG_GUARD;

/// The environment every fly process of a test starts from: fixture bookkeeping on (into
/// `log_dir`) or off, and nothing from the developer's shell that would change pytest's
/// behaviour or fly's credentials.
pub fn clean_env(command: &mut Command, log_dir: Option<&Path>) {
    for credential in ["FLY_TOKEN", "FLY_CA", "FLY_TLS_CERT", "FLY_TLS_KEY"] {
        command.env_remove(credential);
    }
    command
        .env_remove("FLY_GATE_FILE")
        .env_remove("PYTEST_ADDOPTS")
        .env_remove("PYTEST_XDIST_WORKER")
        .env("PYTHONIOENCODING", "utf-8");
    match log_dir {
        Some(dir) => command.env("FLY_FIXTURE_LOG_DIR", dir),
        None => command.env_remove("FLY_FIXTURE_LOG_DIR"),
    };
}

/// A running `fly-coordinator serve` on an ephemeral loopback port.
pub struct Coordinator {
    /// `http://127.0.0.1:PORT`, as the coordinator announced it.
    pub url: String,
    process: Proc,
}

impl Coordinator {
    /// Starts a coordinator with its database at `db` (in `cwd`), and waits for its first
    /// stdout line: `fly-coordinator listening on http://127.0.0.1:PORT`.
    pub fn serve(cwd: &Path, db: &Path) -> Coordinator {
        Coordinator::serve_with(cwd, db, &[], &[])
    }

    /// [`Coordinator::serve`] with extra `serve` arguments and environment (a token, TLS
    /// files); the URL is `https://` when it serves TLS.
    pub fn serve_with(cwd: &Path, db: &Path, args: &[&str], env: &[(&str, &str)]) -> Coordinator {
        let mut command = Command::new(fly_binary("fly-coordinator"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .args(args)
            .current_dir(cwd);
        clean_env(&mut command, None);
        command.envs(env.iter().copied());
        let mut process = Proc::spawn("fly-coordinator serve", &mut command);
        let url = process.wait_for_stdout_line(HANG_GUARD, |line| {
            let url = line
                .strip_prefix("fly-coordinator listening on ")?
                .trim()
                .to_string();
            (url.starts_with("http://127.0.0.1:") || url.starts_with("https://127.0.0.1:"))
                .then_some(url)
        });
        Coordinator { url, process }
    }

    pub fn process(&self) -> &Proc {
        &self.process
    }
}

/// Starts `fly-agent` with two workers serving `coordinator`, running pytest in `workdir`.
/// `extra_env` adds variables its pytest workers will see (they inherit the agent's
/// environment).
pub fn agent(
    name: &str,
    coordinator: &Coordinator,
    workdir: &Path,
    log_dir: Option<&Path>,
    extra_env: &[(&str, &Path)],
) -> Proc {
    agent_at(name, &coordinator.url, workdir, log_dir, extra_env)
}

/// Starts `fly-agent` with two workers serving the coordinator at `url`.
pub fn agent_at(
    name: &str,
    url: &str,
    workdir: &Path,
    log_dir: Option<&Path>,
    extra_env: &[(&str, &Path)],
) -> Proc {
    let mut command = Command::new(fly_binary("fly-agent"));
    command
        .args(["--connect", url, "--workers", "2", "--workdir"])
        .arg(workdir)
        .arg("--python")
        .arg(python())
        .current_dir(workdir);
    clean_env(&mut command, log_dir);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    Proc::spawn(name, &mut command)
}

/// Starts `fly-coordinator run --local --workers 2` in `project` with `pytest_args`.
pub fn run_local(project: &Path, db: &Path, log_dir: Option<&Path>, pytest_args: &[&str]) -> Proc {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--local", "--workers", "2", "--db"])
        .arg(db)
        .arg("--python")
        .arg(python())
        .arg("--")
        .args(pytest_args)
        .current_dir(project);
    clean_env(&mut command, log_dir);
    Proc::spawn("fly-coordinator run --local", &mut command)
}

/// Starts `fly-coordinator run --connect URL` in `project` with `pytest_args`.
pub fn run_connect(project: &Path, url: &str, pytest_args: &[&str]) -> Proc {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--connect", url, "--"])
        .args(pytest_args)
        .current_dir(project);
    clean_env(&mut command, None);
    Proc::spawn("fly-coordinator run --connect", &mut command)
}

/// Starts `fly-coordinator run --listen 127.0.0.1:0 --local --workers 1` in `project`: a
/// coordinator for this one run, with one local worker, that remote agents can join. Its
/// address is announced on stderr (`fly-coordinator listening on http://127.0.0.1:PORT`).
pub fn run_listen_local(
    project: &Path,
    db: &Path,
    log_dir: Option<&Path>,
    extra_env: &[(&str, &Path)],
    pytest_args: &[&str],
) -> Proc {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--local",
            "--workers",
            "1",
            "--db",
        ])
        .arg(db)
        .arg("--python")
        .arg(python())
        .arg("--")
        .args(pytest_args)
        .current_dir(project);
    clean_env(&mut command, log_dir);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    Proc::spawn("fly-coordinator run --listen --local", &mut command)
}
