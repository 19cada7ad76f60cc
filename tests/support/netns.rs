//! Separate network hosts on one machine, for fault tests with real processes: a coordinator
//! host and agent hosts, each a Linux network namespace, wired to a bridge inside the
//! coordinator's namespace by a veth pair per agent. A test can cut one agent's link (the
//! packets just vanish, as in a partition) and restore it, and kill every process of a host.
//!
//! Nothing is added to the machine's own namespace: the bridge and the coordinator's ends of
//! the veth pairs live inside the coordinator's namespace, so deleting the namespaces (which
//! [`Network`]'s `Drop` does, even when the test panics) removes every link the test made.
//! Needs root and `ip` (iproute2); [`available`] says whether this machine has both.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use wait_timeout::ChildExt;

/// How long one `ip` command may take before the test gives up on it.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// The bridge inside the coordinator's namespace (names are per namespace, so a fixed one is
/// unique).
const BRIDGE: &str = "br0";

/// Networks made by this process so far: part of each namespace name, so that two tests in one
/// test binary never share one.
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Whether this machine can make network namespaces: root and a working `ip netns`. `Err`
/// says what is missing.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network namespaces need root (run the tests as root, as CI does)".into());
    }
    match ip_output(&["netns", "list"]) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("`ip netns` does not work here: {e}")),
    }
}

/// Decides whether a test that needs network namespaces runs: `true` when they are available.
/// Otherwise it fails the test with the reason when `CI` is set (CI runs as root and must run
/// these tests), and prints a skip notice and returns `false` elsewhere.
pub fn require(test: &str) -> bool {
    match available() {
        Ok(()) => true,
        Err(reason) => {
            let on_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
            assert!(
                !on_ci,
                "{test} needs network namespaces, and CI must run it: {reason}"
            );
            eprintln!("SKIPPED {test}: {reason}");
            false
        }
    }
}

/// One host: a namespace and its address.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name, for `ip netns exec`.
    pub namespace: String,
    pub address: Ipv4Addr,
    /// The coordinator-side end of this host's veth pair (none for the coordinator itself).
    link: Option<String>,
}

/// A coordinator host and agent hosts on one bridged /24, torn down when dropped.
pub struct Network {
    pub coordinator: Host,
    pub agents: Vec<Host>,
    /// Every namespace made so far, deleted on drop.
    namespaces: Vec<String>,
}

impl Network {
    /// Makes a coordinator host (10.77.0.1) and `agents` agent hosts (10.77.0.11, .12, ...),
    /// with loopback up in each. Namespaces are named `fly-<pid>-<n>-c` and `fly-<pid>-<n>-aK`.
    /// Panics (after tearing down what it made) when a step fails.
    pub fn new(agents: usize) -> Network {
        remove_stale_namespaces();
        let prefix = format!(
            "fly-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let mut network = Network {
            coordinator: Host {
                namespace: format!("{prefix}-c"),
                address: Ipv4Addr::new(10, 77, 0, 1),
                link: None,
            },
            agents: Vec::new(),
            namespaces: Vec::new(),
        };
        let coordinator = network.coordinator.namespace.clone();
        network.add_namespace(&coordinator);
        ip(&["-n", &coordinator, "link", "add", BRIDGE, "type", "bridge"]);
        ip(&[
            "-n",
            &coordinator,
            "addr",
            "add",
            "10.77.0.1/24",
            "dev",
            BRIDGE,
        ]);
        ip(&["-n", &coordinator, "link", "set", BRIDGE, "up"]);
        for k in 1..=agents {
            let namespace = format!("{prefix}-a{k}");
            network.add_namespace(&namespace);
            let link = format!("va{k}");
            let host_octet = u8::try_from(10 + k).expect("at most 245 agent hosts");
            let address = Ipv4Addr::new(10, 77, 0, host_octet);
            // Both ends are created straight in their namespaces: nothing touches the
            // machine's own namespace, even for a moment.
            ip(&[
                "link",
                "add",
                "name",
                "eth0",
                "netns",
                &namespace,
                "type",
                "veth",
                "peer",
                "name",
                &link,
                "netns",
                &coordinator,
            ]);
            ip(&["-n", &coordinator, "link", "set", &link, "master", BRIDGE]);
            ip(&["-n", &coordinator, "link", "set", &link, "up"]);
            ip(&[
                "-n",
                &namespace,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &namespace, "link", "set", "eth0", "up"]);
            network.agents.push(Host {
                namespace,
                address,
                link: Some(link),
            });
        }
        network
    }

    fn add_namespace(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// A command that runs `program` on `host` (`ip netns exec`, which execs the program: the
    /// child's pid is the program's).
    pub fn command(&self, host: &Host, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &host.namespace])
            .arg(program);
        command
    }

    /// Cuts `agent`'s link at the bridge: from then on its packets vanish in both directions
    /// and neither side is told, as in a network partition (a half-open connection).
    pub fn cut(&self, agent: &Host) {
        self.set_link(agent, "down");
    }

    /// Restores a link cut by [`Network::cut`].
    pub fn restore(&self, agent: &Host) {
        self.set_link(agent, "up");
    }

    fn set_link(&self, agent: &Host, state: &str) {
        let link = agent
            .link
            .as_deref()
            .unwrap_or_else(|| panic!("{} has no link to cut", agent.namespace));
        ip(&[
            "-n",
            &self.coordinator.namespace,
            "link",
            "set",
            link,
            state,
        ]);
    }

    /// SIGKILLs every process on `host`, as if the machine died.
    pub fn kill_host(&self, host: &Host) {
        kill_namespace(&host.namespace);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Agents first: their processes go before the coordinator's.
        for namespace in self.namespaces.iter().rev() {
            kill_namespace(namespace);
            if let Err(e) = ip_output(&["netns", "del", namespace]) {
                eprintln!("cannot delete network namespace {namespace}: {e}");
            }
        }
    }
}

/// SIGKILLs every process in `namespace` (ignoring ones that are already gone).
fn kill_namespace(namespace: &str) {
    let Ok(pids) = ip_output(&["netns", "pids", namespace]) else {
        return;
    };
    for pid in pids.split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>() {
            // SAFETY: kill(2) on a pid `ip netns pids` just listed in a namespace this test
            // made; a pid gone since is at worst ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Deletes namespaces left by earlier test processes that died without cleaning up (`fly-<pid>-`
/// whose pid no longer exists), so leaks never pile up on a machine.
fn remove_stale_namespaces() {
    let Ok(list) = ip_output(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("fly-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            kill_namespace(name);
            let _ = ip_output(&["netns", "del", name]);
        }
    }
}

/// Runs `ip ARGS`, failing the test with its stderr when it fails.
fn ip(args: &[&str]) {
    if let Err(e) = ip_output(args) {
        panic!("{e}");
    }
}

/// Runs `ip ARGS` and returns its stdout.
fn ip_output(args: &[&str]) -> Result<String, String> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    match child.wait_timeout(IP_TIMEOUT) {
        Ok(Some(_)) => {}
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`ip {}` did not finish", args.join(" ")));
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("`ip {}`: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
