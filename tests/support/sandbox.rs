//! A private temporary directory per test, holding copies of the fixture project, databases
//! and logs, so tests running in parallel never share a file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::paths::fixture_project;

/// A test's temporary directory, removed when dropped.
pub struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    pub fn new(label: &str) -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fly-e2e-{label}-"))
            .tempdir()
            .expect("a temporary directory");
        Sandbox { dir }
    }

    /// A path inside the sandbox (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An empty directory inside the sandbox.
    pub fn dir(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// A fresh copy of the fixture project named `name`.
    pub fn copy_project(&self, name: &str) -> PathBuf {
        let target = self.path(name);
        copy_tree(&fixture_project(), &target).unwrap_or_else(|e| {
            panic!(
                "copying {} to {}: {e}",
                fixture_project().display(),
                target.display()
            )
        });
        target
    }
}

/// Copies a directory tree, leaving out Python's and pytest's caches (a stray cache from a
/// manual run of the fixture project must not leak into a test).
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "__pycache__" || name == ".pytest_cache" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
