//! Detects the machine's core topology: how many logical CPUs and physical cores it has, which
//! cores are performance or efficiency cores, which CPUs this process may run on, and what a
//! cgroup grants it. The agent advertises the result and derives `--workers auto` from it.
//!
//! Linux detection reads sysfs and procfs below a root directory, so the tests run the very
//! same code on fixture trees. Each file kind has its own small parser returning a plain reason
//! string; the reading helper attaches the file's path to that reason.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// sysfs directory with one `cpuN` directory per CPU.
const CPU_DIR: &str = "sys/devices/system/cpu";
/// Where cgroup v2 is mounted, and where cgroup v1 controllers are mounted below.
const CGROUP_DIR: &str = "sys/fs/cgroup";
/// Highest CPU number a list may name. Linux supports at most 8192 CPUs; the cap stops a
/// corrupt range like `0-4294967295` from allocating billions of entries.
const MAX_CPU_ID: u32 = 65_535;
/// A CPU whose `cpu_capacity` is at least this fraction of the highest counts as a performance
/// CPU. Newer kernels publish `cpu_capacity` on x86 too, where favoured cores of one design
/// differ by a few percent; a little core is typically below half of a big one.
const PERFORMANCE_CAPACITY_RATIO: f64 = 0.75;

/// How the performance/efficiency split was found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum CoreKindSource {
    /// `/sys/devices/cpu_core` and `/sys/devices/cpu_atom` (Intel Alder Lake and later).
    #[serde(rename = "intel-hybrid")]
    IntelHybrid,
    /// Per-CPU `cpu_capacity` (ARM big.LITTLE and other asymmetric designs).
    #[serde(rename = "cpu-capacity")]
    CpuCapacity,
    /// macOS `hw.perflevel0` / `hw.perflevel1` (Apple silicon).
    #[serde(rename = "macos-perflevel")]
    MacosPerfLevel,
    /// No efficiency cores found: every core counts as a performance core.
    #[serde(rename = "uniform")]
    Uniform,
}

impl CoreKindSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            CoreKindSource::IntelHybrid => "intel-hybrid",
            CoreKindSource::CpuCapacity => "cpu-capacity",
            CoreKindSource::MacosPerfLevel => "macos-perflevel",
            CoreKindSource::Uniform => "uniform",
        }
    }
}

/// What an agent knows about the hardware it runs on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Topology {
    /// Online logical CPUs of the whole machine.
    pub logical_cpus: u32,
    /// Physical cores of the whole machine.
    pub physical_cores: u32,
    /// Physical performance cores this process may use (at least one allowed logical CPU).
    pub performance_cores: u32,
    /// Physical efficiency cores this process may use.
    pub efficiency_cores: u32,
    /// SMT width of the performance cores (1 = no SMT).
    pub threads_per_core: u32,
    /// Logical CPUs this process may run on, sorted.
    pub affinity: Vec<u32>,
    /// CPUs granted by a cgroup quota; `None` when unlimited.
    pub cpu_quota: Option<f64>,
    /// Memory this process may use: physical memory, lowered by a cgroup limit. 0 if unknown.
    pub memory_bytes: u64,
    pub core_kind_source: CoreKindSource,
    /// `std::env::consts::OS` of the running binary.
    pub os: String,
    /// `std::env::consts::ARCH` of the running binary.
    pub arch: String,
}

impl Topology {
    /// `--workers auto`: the performance physical cores this process may use, capped by the
    /// affinity mask (number of allowed logical CPUs) and floor(cgroup quota), at least 1.
    ///
    /// A process pinned to efficiency cores only counts those instead: one worker per core it
    /// may use beats a single worker.
    pub fn auto_workers(&self) -> u32 {
        let cores = if self.performance_cores > 0 {
            self.performance_cores
        } else {
            self.efficiency_cores
        };
        let mut workers = cores.min(count(self.affinity.len()));
        if let Some(quota) = self.cpu_quota {
            // `as` saturates, and the quota is positive and finite by construction.
            workers = workers.min(quota.floor() as u32);
        }
        workers.max(1)
    }

    pub fn to_proto(&self) -> crate::proto::Topology {
        crate::proto::Topology {
            logical_cpus: self.logical_cpus,
            physical_cores: self.physical_cores,
            performance_cores: self.performance_cores,
            efficiency_cores: self.efficiency_cores,
            threads_per_core: self.threads_per_core,
            affinity: self.affinity.clone(),
            cpu_quota: self.cpu_quota.unwrap_or(0.0),
            memory_bytes: self.memory_bytes,
            core_kind_source: self.core_kind_source.as_str().to_string(),
            auto_workers: self.auto_workers(),
            os: self.os.clone(),
            arch: self.arch.clone(),
        }
    }
}

/// Why Linux detection failed. Absent files are not errors; they degrade the answer instead.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed {}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("no online CPUs found under {}", path.display())]
    NoCpus { path: PathBuf },
}

/// The real machine. On Linux: [`detect_linux`] on `/`, falling back to sysinfo counts for
/// anything unreadable; on macOS: `sysctl`; elsewhere sysinfo. Never panics.
pub fn detect() -> Topology {
    if cfg!(target_os = "linux") {
        detect_linux_or_fallback()
    } else if cfg!(target_os = "macos") {
        with_macos_sysctl(from_sysinfo(), sysctl_u64)
    } else {
        from_sysinfo()
    }
}

/// Linux detection from a root directory, so unit tests run it on fixture trees.
///
/// `os` and `arch` describe the running binary, not the tree. `memory_bytes` is 0 when
/// `proc/meminfo` is absent.
pub fn detect_linux(root: &Path) -> Result<Topology, TopologyError> {
    let cpu_dir = root.join(CPU_DIR);
    let online = online_cpus(&cpu_dir)?;
    let cores = physical_cores(&cpu_dir, &online)?;
    let (performance_cpus, core_kind_source) = performance_cpus(root, &online)?;
    let affinity = allowed_cpus(root, &online)?;
    let cgroups = read_parsed(&root.join("proc/self/cgroup"), parse_proc_cgroup)?;
    let cgroups = cgroups.unwrap_or_default();
    let cpu_quota = cgroup_cpu_quota(root, &cgroups)?;
    let memory_bytes = memory_bytes(root, &cgroups)?;

    let is_performance = |core: &&BTreeSet<u32>| !core.is_disjoint(&performance_cpus);
    let (performance, efficiency): (Vec<_>, Vec<_>) = cores.iter().partition(is_performance);
    let usable = |kind: &[&BTreeSet<u32>]| {
        count(
            kind.iter()
                .filter(|core| !core.is_disjoint(&affinity))
                .count(),
        )
    };
    let threads_per_core = performance.iter().map(|core| core.len()).max();

    Ok(Topology {
        logical_cpus: count(online.len()),
        physical_cores: count(cores.len()),
        performance_cores: usable(&performance),
        efficiency_cores: usable(&efficiency),
        threads_per_core: count(threads_per_core.unwrap_or(1)),
        affinity: affinity.into_iter().collect(),
        cpu_quota,
        memory_bytes,
        core_kind_source,
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
    })
}

fn detect_linux_or_fallback() -> Topology {
    match detect_linux(Path::new("/")) {
        Ok(mut topology) => {
            if topology.memory_bytes == 0 {
                topology.memory_bytes = from_sysinfo().memory_bytes;
            }
            topology
        }
        Err(error) => {
            tracing::warn!(%error, "topology detection fell back to sysinfo's counts");
            from_sysinfo()
        }
    }
}

// ---- Linux: CPUs and cores ----------------------------------------------------------------

/// The online CPUs from `online`; kernels or mounts without that file get every `cpuN`
/// directory instead.
fn online_cpus(cpu_dir: &Path) -> Result<BTreeSet<u32>, TopologyError> {
    let cpus = match read_parsed(&cpu_dir.join("online"), parse_cpu_list)? {
        Some(cpus) => cpus,
        None => cpu_directories(cpu_dir),
    };
    if cpus.is_empty() {
        return Err(TopologyError::NoCpus {
            path: cpu_dir.to_path_buf(),
        });
    }
    Ok(cpus)
}

fn cpu_directories(cpu_dir: &Path) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir(cpu_dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix("cpu")?
                .parse()
                .ok()
        })
        .collect()
}

/// Identifies the physical core a logical CPU belongs to.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CoreKey {
    /// Lowest online CPU among its SMT siblings; the CPU itself when nothing is known.
    FirstSibling(u32),
    /// `(physical_package_id, core_id)`, for kernels that list no siblings.
    Ids(i64, u32),
}

/// Groups the online CPUs into physical cores, each the set of its online SMT siblings.
fn physical_cores(
    cpu_dir: &Path,
    online: &BTreeSet<u32>,
) -> Result<Vec<BTreeSet<u32>>, TopologyError> {
    let mut cores: BTreeMap<CoreKey, BTreeSet<u32>> = BTreeMap::new();
    for &cpu in online {
        let key = core_key(&cpu_dir.join(format!("cpu{cpu}/topology")), cpu, online)?;
        cores.entry(key).or_default().insert(cpu);
    }
    Ok(cores.into_values().collect())
}

fn core_key(
    topology_dir: &Path,
    cpu: u32,
    online: &BTreeSet<u32>,
) -> Result<CoreKey, TopologyError> {
    // core_cpus_list is the newer name of thread_siblings_list (Linux 5.7+).
    for name in ["core_cpus_list", "thread_siblings_list"] {
        if let Some(siblings) = read_parsed(&topology_dir.join(name), parse_cpu_list)? {
            let first = siblings.intersection(online).next().copied();
            return Ok(CoreKey::FirstSibling(
                first.map_or(cpu, |first| first.min(cpu)),
            ));
        }
    }
    let package = read_parsed(&topology_dir.join("physical_package_id"), parse_number)?;
    let core = read_parsed(&topology_dir.join("core_id"), parse_number)?;
    Ok(match (package, core) {
        (Some(package), Some(core)) => CoreKey::Ids(package, core),
        _ => CoreKey::FirstSibling(cpu),
    })
}

/// The online CPUs that belong to performance cores, and how that was decided. A split that
/// finds no efficiency CPU among the online ones is reported as uniform.
fn performance_cpus(
    root: &Path,
    online: &BTreeSet<u32>,
) -> Result<(BTreeSet<u32>, CoreKindSource), TopologyError> {
    let split = match intel_hybrid_cpus(root)? {
        Some(cpus) => Some((cpus, CoreKindSource::IntelHybrid)),
        None => capacity_performance_cpus(&root.join(CPU_DIR), online)?
            .map(|cpus| (cpus, CoreKindSource::CpuCapacity)),
    };
    Ok(match split {
        Some((cpus, source)) if !online.is_subset(&cpus) => (cpus, source),
        _ => (online.clone(), CoreKindSource::Uniform),
    })
}

/// The P-core CPUs of an Intel hybrid CPU: its two PMUs each list their CPUs. Only one of them
/// present means the other core type is absent or disabled, so the machine is uniform.
fn intel_hybrid_cpus(root: &Path) -> Result<Option<BTreeSet<u32>>, TopologyError> {
    let p_cores = read_parsed(&root.join("sys/devices/cpu_core/cpus"), parse_cpu_list)?;
    let e_cores = read_parsed(&root.join("sys/devices/cpu_atom/cpus"), parse_cpu_list)?;
    Ok(match (p_cores, e_cores) {
        (Some(p_cores), Some(e_cores)) if !e_cores.is_empty() => Some(p_cores),
        _ => None,
    })
}

/// The CPUs whose `cpu_capacity` is near the highest; `None` unless every online CPU has one.
fn capacity_performance_cpus(
    cpu_dir: &Path,
    online: &BTreeSet<u32>,
) -> Result<Option<BTreeSet<u32>>, TopologyError> {
    let mut capacities = BTreeMap::new();
    for &cpu in online {
        let path = cpu_dir.join(format!("cpu{cpu}/cpu_capacity"));
        match read_parsed(&path, parse_number::<u32>)? {
            Some(capacity) => capacities.insert(cpu, capacity),
            None => return Ok(None),
        };
    }
    let Some(&highest) = capacities.values().max() else {
        return Ok(None);
    };
    let threshold = f64::from(highest) * PERFORMANCE_CAPACITY_RATIO;
    Ok(Some(
        capacities
            .into_iter()
            .filter(|&(_, capacity)| f64::from(capacity) >= threshold)
            .map(|(cpu, _)| cpu)
            .collect(),
    ))
}

/// The online CPUs this process may run on. Without a usable `Cpus_allowed_list`, all of them.
fn allowed_cpus(root: &Path, online: &BTreeSet<u32>) -> Result<BTreeSet<u32>, TopologyError> {
    let allowed = read_parsed(&root.join("proc/self/status"), parse_status_cpus_allowed)?;
    let usable: BTreeSet<u32> = match allowed.flatten() {
        Some(allowed) => allowed.intersection(online).copied().collect(),
        None => online.clone(),
    };
    // A running process always has an online CPU to run on; an empty intersection means the
    // two files disagree (CPU hot-plug between the reads), and the online set is the safer bet.
    Ok(if usable.is_empty() {
        online.clone()
    } else {
        usable
    })
}

// ---- Linux: cgroup limits -----------------------------------------------------------------

/// One line of `/proc/self/cgroup`.
#[derive(Debug, PartialEq)]
struct CgroupEntry {
    /// cgroup v2's unified hierarchy (`0::/path`).
    unified: bool,
    /// The v1 controllers of this hierarchy, e.g. `["cpu", "cpuacct"]`.
    controllers: Vec<String>,
    /// The group's path relative to the hierarchy's root.
    path: String,
}

/// Directories whose limits on one resource apply to this process: its group and every
/// ancestor, because a parent's limit caps all its children.
#[derive(Debug, Default)]
struct LimitDirs {
    v2: Vec<PathBuf>,
    v1: Vec<PathBuf>,
}

fn limit_dirs(root: &Path, cgroups: &[CgroupEntry], v1_controller: &str) -> LimitDirs {
    let mut dirs = LimitDirs::default();
    for entry in cgroups {
        if entry.unified {
            dirs.v2
                .extend(group_and_ancestors(&root.join(CGROUP_DIR), &entry.path));
        } else if let Some(mount) = v1_mount(root, &entry.controllers, v1_controller) {
            dirs.v1.extend(group_and_ancestors(&mount, &entry.path));
        }
    }
    dirs
}

/// Where a v1 hierarchy with `controllers` is mounted, if it carries `wanted`: distributions
/// mount `cpu,cpuacct` and link `cpu` to it; containers sometimes have only one of the two.
fn v1_mount(root: &Path, controllers: &[String], wanted: &str) -> Option<PathBuf> {
    if !controllers.iter().any(|controller| controller == wanted) {
        return None;
    }
    [controllers.join(","), wanted.to_string()]
        .into_iter()
        .map(|name| root.join(CGROUP_DIR).join(name))
        .find(|mount| mount.is_dir())
}

/// `base/group` and each of its ancestors up to `base` itself. Inside a container the group
/// path names the host's hierarchy, which is not mounted; walking up reaches the container's
/// own root at `base`. Only plain components are kept, so `..` never leaves `base`.
fn group_and_ancestors(base: &Path, group: &str) -> Vec<PathBuf> {
    let mut dir = base.to_path_buf();
    let mut dirs = vec![dir.clone()];
    for component in Path::new(group).components() {
        if let Component::Normal(name) = component {
            dir.push(name);
            dirs.push(dir.clone());
        }
    }
    dirs
}

/// The smallest CPU quota of any group this process is in.
fn cgroup_cpu_quota(root: &Path, cgroups: &[CgroupEntry]) -> Result<Option<f64>, TopologyError> {
    let dirs = limit_dirs(root, cgroups, "cpu");
    let mut quotas = Vec::new();
    for dir in &dirs.v2 {
        quotas.extend(read_parsed(&dir.join("cpu.max"), parse_cpu_max)?.flatten());
    }
    for dir in &dirs.v1 {
        let quota = read_parsed(&dir.join("cpu.cfs_quota_us"), parse_cfs_quota)?.flatten();
        let period = read_parsed(&dir.join("cpu.cfs_period_us"), parse_positive)?;
        if let (Some(quota), Some(period)) = (quota, period) {
            quotas.push(quota as f64 / period as f64);
        }
    }
    Ok(quotas.into_iter().reduce(f64::min))
}

/// `MemTotal`, lowered by the smallest cgroup memory limit. Limits only lower a known total, so
/// v1's "unlimited" (a huge number) needs no special case.
fn memory_bytes(root: &Path, cgroups: &[CgroupEntry]) -> Result<u64, TopologyError> {
    let Some(total) = read_parsed(&root.join("proc/meminfo"), parse_meminfo_total)? else {
        return Ok(0);
    };
    let dirs = limit_dirs(root, cgroups, "memory");
    let mut smallest = total;
    for dir in &dirs.v2 {
        if let Some(limit) = read_parsed(&dir.join("memory.max"), parse_memory_max)?.flatten() {
            smallest = smallest.min(limit);
        }
    }
    for dir in &dirs.v1 {
        let path = dir.join("memory.limit_in_bytes");
        if let Some(limit) = read_parsed(&path, parse_number::<u64>)? {
            smallest = smallest.min(limit);
        }
    }
    Ok(smallest)
}

// ---- Reading files ------------------------------------------------------------------------

/// Reads and parses a file that may legitimately be absent: `Ok(None)` when it is missing or
/// not readable by this user, an error naming the file when its content is malformed.
fn read_parsed<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, TopologyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(TopologyError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    parse(&text)
        .map(Some)
        .map_err(|reason| TopologyError::Malformed {
            path: path.to_path_buf(),
            reason,
        })
}

// ---- Parsers, one per file kind -----------------------------------------------------------

/// A kernel CPU list such as `0-3,8,10-11`; empty text is the empty list.
fn parse_cpu_list(text: &str) -> Result<BTreeSet<u32>, String> {
    let mut cpus = BTreeSet::new();
    let text = text.trim();
    if text.is_empty() {
        return Ok(cpus);
    }
    for item in text.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (parse_cpu_id(first)?, parse_cpu_id(last)?),
            None => (parse_cpu_id(item)?, parse_cpu_id(item)?),
        };
        if first > last {
            return Err(format!("CPU range {item:?} runs backwards"));
        }
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

fn parse_cpu_id(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(cpu) if cpu <= MAX_CPU_ID && text.bytes().all(|b| b.is_ascii_digit()) => Ok(cpu),
        _ => Err(format!("{text:?} is not a CPU number")),
    }
}

/// A single number, as in `core_id` or `cpu_capacity`.
fn parse_number<T: FromStr>(text: &str) -> Result<T, String> {
    let text = text.trim();
    text.parse()
        .map_err(|_| format!("{text:?} is not a valid number"))
}

fn parse_positive(text: &str) -> Result<u64, String> {
    match parse_number::<u64>(text)? {
        0 => Err("expected a positive number, found 0".to_string()),
        value => Ok(value),
    }
}

/// `/proc/self/status`: the `Cpus_allowed_list:` line, `None` if there is none.
fn parse_status_cpus_allowed(text: &str) -> Result<Option<BTreeSet<u32>>, String> {
    text.lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(|list| parse_cpu_list(list).map_err(|reason| format!("Cpus_allowed_list: {reason}")))
        .transpose()
}

/// `/proc/self/cgroup`: lines of `hierarchy-id:controllers:path`.
fn parse_proc_cgroup(text: &str) -> Result<Vec<CgroupEntry>, String> {
    let mut entries = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        // The path is last and may itself contain ':'.
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("line {line:?} is not `id:controllers:path`"));
        };
        let id: u32 = parse_number(id).map_err(|reason| format!("line {line:?}: {reason}"))?;
        entries.push(CgroupEntry {
            unified: id == 0 && controllers.is_empty(),
            controllers: controllers
                .split(',')
                .filter(|name| !name.is_empty())
                .map(str::to_string)
                .collect(),
            path: path.to_string(),
        });
    }
    Ok(entries)
}

/// cgroup v2 `cpu.max`: `$QUOTA $PERIOD` in microseconds, `max` as quota when unlimited.
/// Returns the granted CPUs.
fn parse_cpu_max(text: &str) -> Result<Option<f64>, String> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [quota, period] = fields[..] else {
        return Err(format!("expected `<quota|max> <period>`, found {text:?}"));
    };
    let period = parse_positive(period)?;
    if quota == "max" {
        return Ok(None);
    }
    Ok(Some(parse_positive(quota)? as f64 / period as f64))
}

/// cgroup v1 `cpu.cfs_quota_us`: microseconds per period, -1 when unlimited.
fn parse_cfs_quota(text: &str) -> Result<Option<u64>, String> {
    match parse_number::<i64>(text)? {
        -1 => Ok(None),
        quota if quota > 0 => Ok(Some(quota.unsigned_abs())),
        quota => Err(format!("expected -1 or a positive quota, found {quota}")),
    }
}

/// cgroup v2 `memory.max`: bytes, or `max` when unlimited.
fn parse_memory_max(text: &str) -> Result<Option<u64>, String> {
    if text.trim() == "max" {
        return Ok(None);
    }
    parse_number(text).map(Some)
}

/// `/proc/meminfo`: the `MemTotal:` line, which the kernel gives in kB (really KiB).
fn parse_meminfo_total(text: &str) -> Result<u64, String> {
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .ok_or("no MemTotal line")?;
    let kib = value
        .trim()
        .strip_suffix("kB")
        .ok_or_else(|| format!("MemTotal {:?} is not in kB", value.trim()))?;
    let kib: u64 = parse_number(kib)?;
    kib.checked_mul(1024)
        .ok_or_else(|| format!("MemTotal {kib} kB is too large"))
}

// ---- Other systems ------------------------------------------------------------------------

/// Counts from sysinfo, for systems without a Linux-style sysfs. Nothing is known about
/// affinity or quotas there, so the process is taken to own the whole machine.
fn from_sysinfo() -> Topology {
    let mut system = sysinfo::System::new();
    system.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    system.refresh_memory();
    let logical = match system.cpus().len() {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        cpus => cpus,
    };
    let physical = sysinfo::System::physical_core_count()
        .unwrap_or(logical)
        .clamp(1, logical);
    Topology {
        logical_cpus: count(logical),
        physical_cores: count(physical),
        performance_cores: count(physical),
        efficiency_cores: 0,
        threads_per_core: count((logical / physical).max(1)),
        affinity: (0..count(logical)).collect(),
        cpu_quota: None,
        memory_bytes: system.total_memory(),
        core_kind_source: CoreKindSource::Uniform,
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// Refines `base` with macOS's `sysctl` keys; keys it lacks keep `base`'s values. Apple silicon
/// reports performance cores as perflevel0 and efficiency cores as perflevel1; Intel Macs have
/// at most perflevel0 and are uniform.
fn with_macos_sysctl(base: Topology, sysctl: impl Fn(&str) -> Option<u64>) -> Topology {
    let cpus = |key: &str| {
        sysctl(key)
            .and_then(|value| u32::try_from(value).ok())
            .filter(|&value| value > 0)
    };
    let logical = cpus("hw.logicalcpu").unwrap_or(base.logical_cpus);
    let physical = cpus("hw.physicalcpu")
        .unwrap_or(base.physical_cores)
        .clamp(1, logical.max(1));
    let perf_levels = (
        cpus("hw.perflevel0.physicalcpu"),
        cpus("hw.perflevel1.physicalcpu"),
    );
    let (performance_cores, efficiency_cores, core_kind_source) = match perf_levels {
        (Some(performance), Some(efficiency)) => {
            (performance, efficiency, CoreKindSource::MacosPerfLevel)
        }
        _ => (physical, 0, CoreKindSource::Uniform),
    };
    Topology {
        logical_cpus: logical,
        physical_cores: physical,
        performance_cores,
        efficiency_cores,
        threads_per_core: (logical / physical).max(1),
        affinity: (0..logical).collect(),
        cpu_quota: None,
        memory_bytes: sysctl("hw.memsize").unwrap_or(base.memory_bytes),
        core_kind_source,
        ..base
    }
}

/// `sysctl -n <key>` as a number; `None` if the key is absent or the command fails.
fn sysctl_u64(key: &str) -> Option<u64> {
    let output = std::process::Command::new("/usr/sbin/sysctl")
        .args(["-n", key])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

/// A count for the wire, saturating instead of wrapping (no machine has 2^32 CPUs).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus(list: &[u32]) -> BTreeSet<u32> {
        list.iter().copied().collect()
    }

    #[test]
    fn cpu_list_accepts_kernel_syntax() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Ok(cpus(&[0, 1, 2, 3, 8, 10, 11]))
        );
        assert_eq!(parse_cpu_list("5"), Ok(cpus(&[5])));
        assert_eq!(parse_cpu_list("\n"), Ok(BTreeSet::new()));
    }

    #[test]
    fn cpu_list_rejects_garbage() {
        for garbage in [
            "zero",
            "0-",
            "-3",
            "3-1",
            "1,,2",
            "0-3;8",
            "1.5",
            "+1",
            "0-4294967295",
            "0 - 3",
        ] {
            let result = parse_cpu_list(garbage);
            assert!(result.is_err(), "{garbage:?} parsed as {result:?}");
        }
    }

    #[test]
    fn cpu_max_reads_quota_and_unlimited() {
        assert_eq!(parse_cpu_max("max 100000\n"), Ok(None));
        assert_eq!(parse_cpu_max("200000 100000\n"), Ok(Some(2.0)));
        assert_eq!(parse_cpu_max("50000 100000"), Ok(Some(0.5)));
        for garbage in ["", "max", "200000", "lots 100000", "200000 0", "1 2 3"] {
            assert!(parse_cpu_max(garbage).is_err(), "{garbage:?} accepted");
        }
    }

    #[test]
    fn cfs_quota_reads_unlimited_and_rejects_nonsense() {
        assert_eq!(parse_cfs_quota("-1\n"), Ok(None));
        assert_eq!(parse_cfs_quota("150000\n"), Ok(Some(150_000)));
        assert!(parse_cfs_quota("0").is_err());
        assert!(parse_cfs_quota("-5").is_err());
    }

    #[test]
    fn proc_cgroup_splits_v1_and_v2_lines() {
        let entries = parse_proc_cgroup("4:cpu,cpuacct:/docker/abc\n1:name=systemd:/a:b\n0::/\n");
        assert_eq!(
            entries,
            Ok(vec![
                CgroupEntry {
                    unified: false,
                    controllers: vec!["cpu".into(), "cpuacct".into()],
                    path: "/docker/abc".into(),
                },
                CgroupEntry {
                    unified: false,
                    controllers: vec!["name=systemd".into()],
                    path: "/a:b".into(),
                },
                CgroupEntry {
                    unified: true,
                    controllers: vec![],
                    path: "/".into(),
                },
            ])
        );
        assert!(parse_proc_cgroup("no colons here\n").is_err());
        assert!(parse_proc_cgroup("x::/\n").is_err());
    }

    #[test]
    fn meminfo_total_is_converted_from_kib() {
        let meminfo = "MemTotal:       16384 kB\nMemFree:        1024 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Ok(16384 * 1024));
        assert!(parse_meminfo_total("MemFree: 1 kB\n").is_err());
        assert!(parse_meminfo_total("MemTotal: lots kB\n").is_err());
    }

    #[test]
    fn ancestors_stay_inside_the_cgroup_mount() {
        let base = Path::new("cg");
        assert_eq!(
            group_and_ancestors(base, "/a/../b"),
            vec![
                PathBuf::from("cg"),
                PathBuf::from("cg/a"),
                PathBuf::from("cg/a/b")
            ]
        );
        assert_eq!(group_and_ancestors(base, "/"), vec![PathBuf::from("cg")]);
    }

    fn sysctl_table(table: &'static [(&'static str, u64)]) -> impl Fn(&str) -> Option<u64> {
        move |key| {
            table
                .iter()
                .find(|(name, _)| *name == key)
                .map(|&(_, value)| value)
        }
    }

    fn base() -> Topology {
        Topology {
            logical_cpus: 1,
            physical_cores: 1,
            performance_cores: 1,
            efficiency_cores: 0,
            threads_per_core: 1,
            affinity: vec![0],
            cpu_quota: None,
            memory_bytes: 7,
            core_kind_source: CoreKindSource::Uniform,
            os: "macos".into(),
            arch: "aarch64".into(),
        }
    }

    #[test]
    fn apple_silicon_splits_by_perflevel() {
        // An M2 Pro: 8 performance + 4 efficiency cores, no SMT, 32 GiB.
        let sysctl = sysctl_table(&[
            ("hw.perflevel0.physicalcpu", 8),
            ("hw.perflevel1.physicalcpu", 4),
            ("hw.physicalcpu", 12),
            ("hw.logicalcpu", 12),
            ("hw.memsize", 34_359_738_368),
        ]);
        let topology = with_macos_sysctl(base(), sysctl);
        assert_eq!(
            topology,
            Topology {
                logical_cpus: 12,
                physical_cores: 12,
                performance_cores: 8,
                efficiency_cores: 4,
                threads_per_core: 1,
                affinity: (0..12).collect(),
                cpu_quota: None,
                memory_bytes: 34_359_738_368,
                core_kind_source: CoreKindSource::MacosPerfLevel,
                os: "macos".into(),
                arch: "aarch64".into(),
            }
        );
        assert_eq!(topology.auto_workers(), 8);
    }

    #[test]
    fn intel_mac_without_perflevels_is_uniform() {
        let sysctl = sysctl_table(&[("hw.physicalcpu", 4), ("hw.logicalcpu", 8)]);
        let topology = with_macos_sysctl(base(), sysctl);
        assert_eq!(topology.core_kind_source, CoreKindSource::Uniform);
        assert_eq!(topology.performance_cores, 4);
        assert_eq!(topology.efficiency_cores, 0);
        assert_eq!(topology.threads_per_core, 2);
        assert_eq!(topology.memory_bytes, 7, "memory falls back to the base");
        assert_eq!(topology.auto_workers(), 4);
    }
}
