//! Where things are: the workspace, the fixture project, fly's binaries and the Python that
//! runs the tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use wait_timeout::ChildExt;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The pytest project every end-to-end test copies and runs.
pub fn fixture_project() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("project")
}

/// A fly binary (`fly-coordinator`, `fly-agent`) from the cargo target dir this test was built
/// into. The test executable is `target/<profile>/deps/<test>-<hash>`; binaries sit in
/// `target/<profile>/`. Other packages' binaries are not built by `cargo test -p fly-tests`.
pub fn fly_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace` (or `cargo test --workspace`) first",
        path.display()
    );
    path
}

/// The Python the tests hand to fly and to the plain-pytest oracle: `FLY_TEST_PYTHON`, else the
/// workspace's `.venv`, else `python3`. Fails with the setup command when it cannot import
/// pytest, since every test needs it.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(find_python).clone()
}

fn find_python() -> PathBuf {
    let venv = workspace_root().join(".venv").join("bin").join("python");
    let python = match std::env::var_os("FLY_TEST_PYTHON") {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ if venv.is_file() => venv,
        _ => PathBuf::from("python3"),
    };
    let imports_pytest = Command::new(&python)
        .args(["-c", "import pytest"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .and_then(|mut child| {
            let status = child.wait_timeout(Duration::from_secs(60)).ok().flatten();
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            status
        })
        .is_some_and(|status| status.success());
    assert!(
        imports_pytest,
        "{} cannot `import pytest`. From the workspace root run:\n    \
         python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt\n\
         or set FLY_TEST_PYTHON to a Python that has pytest",
        python.display()
    );
    python
}
