//! The coordinator under test as a child process: started with `serve` on a free loopback
//! port, watched through `/proc` (resident memory, CPU time per thread) and stopped gracefully
//! so its database is closed before the harness reads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// What `fly-coordinator serve` prints once it listens.
const LISTENING: &str = "fly-coordinator listening on ";
/// How long the coordinator may take to open its database and listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop may take before the process is killed. The store finishes what is
/// queued first, and the last thing queued is the run's duration history: a million new rows,
/// which on a loaded 2-core machine took more than 20 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Coordinator {
    child: Child,
    pid: u32,
    url: String,
    log: PathBuf,
}

/// One look at the process through `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Resident memory now, bytes.
    pub rss: u64,
    /// Peak resident memory so far, bytes (the kernel's high-water mark).
    pub hwm: u64,
    /// User + system CPU time of the whole process so far.
    pub cpu: Duration,
}

impl Coordinator {
    /// Starts `binary serve` on a free loopback port with its database at `db`, its log
    /// (stderr) going to `log`, and waits until it listens.
    pub async fn start(binary: &Path, db: &Path, log: &Path) -> Result<Coordinator> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the coordinator log {}", log.display()))?;
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the coordinator {}", binary.display()))?;
        let pid = child
            .id()
            .context("the coordinator exited as soon as it started")?;
        let stdout = child
            .stdout
            .take()
            .context("the coordinator's stdout was not captured")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix(LISTENING) {
                    return Ok(Some(url.trim().to_string()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let url = match url {
            Ok(Ok(Some(url))) => url,
            Ok(Ok(None)) => bail!(
                "the coordinator exited before listening; its log:\n{}",
                tail(log, 20)
            ),
            Ok(Err(err)) => return Err(err).context("reading the coordinator's stdout"),
            Err(_) => bail!(
                "the coordinator did not listen within {} s; its log:\n{}",
                START_TIMEOUT.as_secs(),
                tail(log, 20)
            ),
        };
        // Keep draining stdout so the coordinator never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Coordinator {
            child,
            pid,
            url,
            log: log.to_path_buf(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines of the coordinator's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Memory and CPU of the process now; `None` once it is gone.
    pub fn sample(&self) -> Option<Sample> {
        sample_pid(self.pid)
    }

    /// CPU time so far per thread name (threads of one name summed: all tokio workers are one
    /// line).
    pub fn threads(&self) -> BTreeMap<String, Duration> {
        let mut by_name = BTreeMap::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return by_name;
        };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            if let Some((name, cpu)) = stat_cpu(&stat) {
                *by_name.entry(name).or_insert(Duration::ZERO) += cpu;
            }
        }
        by_name
    }

    /// Asks the coordinator to stop (SIGTERM: it flushes and closes its database), and kills
    /// it if it has not stopped in time.
    pub async fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid).context("the coordinator's pid")?;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet (so it cannot
        // have been reused), with a plain signal number.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                let status = status.context("waiting for the coordinator to stop")?;
                if !status.success() {
                    bail!(
                        "the coordinator stopped with {status}; its log:\n{}",
                        self.log_tail(20)
                    );
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "the coordinator did not stop within {} s of SIGTERM and was killed",
                    STOP_TIMEOUT.as_secs()
                )
            }
        }
    }
}

/// Memory and CPU of process `pid` now; `None` once it is gone.
pub fn sample_pid(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(Sample {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        cpu: stat_cpu(&stat).map(|(_, cpu)| cpu).unwrap_or_default(),
    })
}

/// The thread (or process) name and user + system CPU time from a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Option<(String, Duration)> {
    // The name is in parentheses and may itself contain spaces or parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, ticks(utime + stime)))
}

fn ticks(n: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Duration::from_secs_f64(n as f64 / hz as f64)
}

/// CPU time (user + system) this process has used so far.
pub fn own_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we pass; on failure we read the zeroed value.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_a_thread_name_with_spaces_and_parentheses() {
        let line = "4242 (tokio (rt) 1) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 100";
        let (name, cpu) = stat_cpu(line).expect("parsed");
        assert_eq!(name, "tokio (rt) 1");
        assert_eq!(cpu, ticks(300));
    }

    #[test]
    fn this_process_is_sampled() {
        let sample = sample_pid(std::process::id()).expect("our own /proc entry");
        assert!(sample.rss > 0 && sample.hwm >= sample.rss);
    }
}
