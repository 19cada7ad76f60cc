//! Topology detection on fixture trees of real machine layouts (sysfs/procfs files as those
//! machines show them), on hand-built degraded trees, and on the machine running the tests.

use std::path::{Path, PathBuf};

use fly_common::topology::{detect, detect_linux, CoreKindSource, Topology, TopologyError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/topology")
        .join(name)
}

fn detect_fixture(name: &str) -> Topology {
    match detect_linux(&fixture(name)) {
        Ok(topology) => topology,
        Err(error) => panic!("fixture {name}: {error}"),
    }
}

/// The fields every fixture shares: detection reports the running binary's os and arch.
fn linux(topology: Topology) -> Topology {
    Topology {
        os: "linux".to_string(),
        arch: std::env::consts::ARCH.to_string(),
        ..topology
    }
}

const GIB: u64 = 1024 * 1024 * 1024;

#[test]
fn intel_hybrid_laptop_counts_only_p_cores_for_workers() {
    let topology = detect_fixture("intel_hybrid");
    assert_eq!(
        topology,
        linux(Topology {
            logical_cpus: 16,
            physical_cores: 12,
            performance_cores: 4,
            efficiency_cores: 8,
            threads_per_core: 2,
            affinity: (0..16).collect(),
            cpu_quota: None,
            memory_bytes: 15_992_632 * 1024,
            core_kind_source: CoreKindSource::IntelHybrid,
            os: String::new(),
            arch: String::new(),
        })
    );
    assert_eq!(topology.auto_workers(), 4);
}

#[test]
fn arm_big_little_counts_only_big_cores_for_workers() {
    let topology = detect_fixture("arm_biglittle");
    assert_eq!(
        topology,
        linux(Topology {
            logical_cpus: 8,
            physical_cores: 8,
            performance_cores: 4,
            efficiency_cores: 4,
            threads_per_core: 1,
            affinity: (0..8).collect(),
            cpu_quota: None,
            memory_bytes: 7_948_204 * 1024,
            core_kind_source: CoreKindSource::CpuCapacity,
            os: String::new(),
            arch: String::new(),
        })
    );
    assert_eq!(topology.auto_workers(), 4);
}

#[test]
fn smt_server_gets_one_worker_per_physical_core() {
    let topology = detect_fixture("smt_server");
    assert_eq!(
        topology,
        linux(Topology {
            logical_cpus: 32,
            physical_cores: 16,
            performance_cores: 16,
            efficiency_cores: 0,
            threads_per_core: 2,
            affinity: (0..32).collect(),
            cpu_quota: None,
            memory_bytes: 263_855_676 * 1024,
            core_kind_source: CoreKindSource::Uniform,
            os: String::new(),
            arch: String::new(),
        })
    );
    assert_eq!(topology.auto_workers(), 16);
}

#[test]
fn container_with_cgroup_v2_quota_is_capped_by_it() {
    let topology = detect_fixture("container_quota");
    assert_eq!(
        topology,
        linux(Topology {
            logical_cpus: 64,
            physical_cores: 32,
            performance_cores: 32,
            efficiency_cores: 0,
            threads_per_core: 2,
            affinity: (0..64).collect(),
            cpu_quota: Some(2.0),
            memory_bytes: 4 * GIB,
            core_kind_source: CoreKindSource::Uniform,
            os: String::new(),
            arch: String::new(),
        })
    );
    assert_eq!(topology.auto_workers(), 2);
}

#[test]
fn container_with_cgroup_v1_quota_rounds_down() {
    let topology = detect_fixture("container_quota_v1");
    assert_eq!(
        topology,
        linux(Topology {
            logical_cpus: 64,
            physical_cores: 32,
            performance_cores: 32,
            efficiency_cores: 0,
            threads_per_core: 2,
            affinity: (0..64).collect(),
            cpu_quota: Some(1.5),
            memory_bytes: 2 * GIB,
            core_kind_source: CoreKindSource::Uniform,
            os: String::new(),
            arch: String::new(),
        })
    );
    assert_eq!(topology.auto_workers(), 1);
}

#[test]
fn pinned_process_gets_one_worker_per_allowed_cpu() {
    let topology = detect_fixture("affinity_pinned");
    assert_eq!(
        topology,
        linux(Topology {
            logical_cpus: 8,
            physical_cores: 8,
            performance_cores: 2,
            efficiency_cores: 0,
            threads_per_core: 1,
            affinity: vec![2, 3],
            cpu_quota: None,
            memory_bytes: 32_768_000 * 1024,
            core_kind_source: CoreKindSource::Uniform,
            os: String::new(),
            arch: String::new(),
        })
    );
    assert_eq!(topology.auto_workers(), 2);
}

#[test]
fn proto_carries_every_field_and_auto_workers() {
    let topology = detect_fixture("container_quota");
    let proto = topology.to_proto();
    assert_eq!(
        proto,
        fly_common::proto::Topology {
            logical_cpus: 64,
            physical_cores: 32,
            performance_cores: 32,
            efficiency_cores: 0,
            threads_per_core: 2,
            affinity: (0..64).collect(),
            cpu_quota: 2.0,
            memory_bytes: 4 * GIB,
            core_kind_source: "uniform".to_string(),
            auto_workers: 2,
            os: "linux".to_string(),
            arch: std::env::consts::ARCH.to_string(),
        }
    );

    let unlimited = detect_fixture("intel_hybrid").to_proto();
    assert_eq!(unlimited.cpu_quota, 0.0, "0 means unlimited on the wire");
    assert_eq!(unlimited.core_kind_source, "intel-hybrid");
    assert_eq!(unlimited.auto_workers, 4);
}

#[test]
fn core_kind_source_serializes_as_its_wire_name() {
    for source in [
        CoreKindSource::IntelHybrid,
        CoreKindSource::CpuCapacity,
        CoreKindSource::MacosPerfLevel,
        CoreKindSource::Uniform,
    ] {
        let json = serde_json::to_string(&source).unwrap();
        assert_eq!(json, format!("\"{}\"", source.as_str()));
    }
}

#[test]
fn this_machine_is_detected() {
    let topology = detect();
    assert!(topology.logical_cpus >= 1, "{topology:?}");
    assert!(topology.physical_cores >= 1, "{topology:?}");
    assert!(
        topology.physical_cores <= topology.logical_cpus,
        "{topology:?}"
    );
    assert!(!topology.affinity.is_empty(), "{topology:?}");
    assert!(topology.memory_bytes > 0, "{topology:?}");
    assert!(topology.auto_workers() >= 1, "{topology:?}");
    assert!(
        topology.auto_workers() <= topology.logical_cpus,
        "{topology:?}"
    );
    assert_eq!(topology.os, std::env::consts::OS);
}

// ---- Hand-built trees for the edge cases ------------------------------------------------------

/// Writes `files` (path relative to the tree root, contents) into a fresh temporary tree.
fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (path, contents) in files {
        let path = root.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    root
}

#[test]
fn missing_files_degrade_to_one_core_per_cpu_and_no_limits() {
    let root = tree(&[("sys/devices/system/cpu/online", "0-3\n")]);
    let topology = detect_linux(root.path()).unwrap();
    assert_eq!(
        topology,
        linux(Topology {
            logical_cpus: 4,
            physical_cores: 4,
            performance_cores: 4,
            efficiency_cores: 0,
            threads_per_core: 1,
            affinity: vec![0, 1, 2, 3],
            cpu_quota: None,
            memory_bytes: 0,
            core_kind_source: CoreKindSource::Uniform,
            os: String::new(),
            arch: String::new(),
        })
    );
    assert_eq!(topology.auto_workers(), 4);
}

#[test]
fn without_online_list_the_cpu_directories_count() {
    let root = tree(&[
        ("sys/devices/system/cpu/cpu0/topology/core_id", "0\n"),
        ("sys/devices/system/cpu/cpu1/topology/core_id", "0\n"),
        (
            "sys/devices/system/cpu/cpu0/topology/physical_package_id",
            "0\n",
        ),
        (
            "sys/devices/system/cpu/cpu1/topology/physical_package_id",
            "0\n",
        ),
        (
            "sys/devices/system/cpu/cpufreq/policy0/scaling_driver",
            "acpi-cpufreq\n",
        ),
    ]);
    let topology = detect_linux(root.path()).unwrap();
    assert_eq!(topology.logical_cpus, 2);
    // No sibling lists: cores are told apart by package and core id, so these are one core.
    assert_eq!(topology.physical_cores, 1);
    assert_eq!(topology.threads_per_core, 2);
    assert_eq!(topology.auto_workers(), 1);
}

#[test]
fn a_tree_without_cpus_is_an_error() {
    let root = tree(&[("proc/meminfo", "MemTotal: 1024 kB\n")]);
    let error = detect_linux(root.path()).unwrap_err();
    assert!(matches!(error, TopologyError::NoCpus { .. }), "{error}");
}

#[test]
fn the_smallest_quota_among_ancestors_wins() {
    let root = tree(&[
        ("sys/devices/system/cpu/online", "0-7\n"),
        ("proc/self/cgroup", "0::/batch.slice/job.scope\n"),
        ("sys/fs/cgroup/batch.slice/cpu.max", "300000 100000\n"),
        (
            "sys/fs/cgroup/batch.slice/job.scope/cpu.max",
            "max 100000\n",
        ),
        ("sys/fs/cgroup/batch.slice/memory.max", "1073741824\n"),
        ("sys/fs/cgroup/batch.slice/job.scope/memory.max", "max\n"),
        ("proc/meminfo", "MemTotal:       8388608 kB\n"),
    ]);
    let topology = detect_linux(root.path()).unwrap();
    assert_eq!(topology.cpu_quota, Some(3.0));
    assert_eq!(topology.memory_bytes, GIB);
    assert_eq!(topology.auto_workers(), 3);
}

#[test]
fn cgroup_v1_quota_of_the_group_itself_is_found_under_the_mount() {
    let root = tree(&[
        ("sys/devices/system/cpu/online", "0-7\n"),
        (
            "proc/self/cgroup",
            "3:cpu,cpuacct:/ci/runner-7\n1:name=systemd:/ci/runner-7\n",
        ),
        ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n"),
        ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
        (
            "sys/fs/cgroup/cpu,cpuacct/ci/runner-7/cpu.cfs_quota_us",
            "250000\n",
        ),
        (
            "sys/fs/cgroup/cpu,cpuacct/ci/runner-7/cpu.cfs_period_us",
            "50000\n",
        ),
    ]);
    let topology = detect_linux(root.path()).unwrap();
    assert_eq!(topology.cpu_quota, Some(5.0));
    assert_eq!(topology.auto_workers(), 5);
}

#[test]
fn capacities_that_differ_slightly_are_all_performance_cores() {
    // Favoured cores of one design report slightly higher capacities than their peers.
    let mut files = vec![("sys/devices/system/cpu/online", "0-3\n")];
    let paths: Vec<String> = (0..4)
        .map(|cpu| format!("sys/devices/system/cpu/cpu{cpu}/cpu_capacity"))
        .collect();
    for (path, capacity) in paths.iter().zip(["1024\n", "1009\n", "993\n", "1024\n"]) {
        files.push((path, capacity));
    }
    let topology = detect_linux(tree(&files).path()).unwrap();
    assert_eq!(topology.core_kind_source, CoreKindSource::Uniform);
    assert_eq!(topology.performance_cores, 4);
    assert_eq!(topology.auto_workers(), 4);
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let cases = [
        ("sys/devices/system/cpu/online", "all of them\n"),
        ("proc/self/status", "Name:\tx\nCpus_allowed_list:\t0-zz\n"),
        ("sys/fs/cgroup/cpu.max", "lots 100000\n"),
        ("proc/meminfo", "MemTotal: much\n"),
        (
            "sys/devices/system/cpu/cpu1/topology/thread_siblings_list",
            "1-0\n",
        ),
        ("sys/devices/system/cpu/cpu0/cpu_capacity", "big\n"),
    ];
    for (bad_file, contents) in cases {
        let mut files = vec![
            ("sys/devices/system/cpu/online", "0-1\n"),
            ("proc/self/cgroup", "0::/\n"),
        ];
        files.retain(|(path, _)| *path != bad_file);
        files.push((bad_file, contents));
        let root = tree(&files);
        match detect_linux(root.path()) {
            Err(error @ TopologyError::Malformed { .. }) => {
                let message = error.to_string();
                assert!(message.contains(bad_file), "{message} names {bad_file}");
            }
            other => panic!("{bad_file} with {contents:?} gave {other:?}"),
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_process_pinned_to_efficiency_cores_uses_them() {
    // `taskset -c 8-10` on the hybrid laptop: three E-cores, no P-core.
    let root = tempfile::tempdir().unwrap();
    copy_tree(&fixture("intel_hybrid"), root.path());
    std::fs::write(
        root.path().join("proc/self/status"),
        "Name:\tfly-agent\nCpus_allowed:\t0700\nCpus_allowed_list:\t8-10\n",
    )
    .unwrap();
    let topology = detect_linux(root.path()).unwrap();
    assert_eq!(topology.performance_cores, 0);
    assert_eq!(topology.efficiency_cores, 3);
    assert_eq!(
        topology.threads_per_core, 2,
        "the SMT width of the machine's P-cores"
    );
    assert_eq!(topology.affinity, vec![8, 9, 10]);
    assert_eq!(topology.auto_workers(), 3);
}

#[test]
fn a_process_on_one_smt_thread_of_each_core_counts_each_core_once() {
    let root = tempfile::tempdir().unwrap();
    copy_tree(&fixture("smt_server"), root.path());
    std::fs::write(
        root.path().join("proc/self/status"),
        "Name:\tfly-agent\nCpus_allowed_list:\t0-3,16-19\n",
    )
    .unwrap();
    let topology = detect_linux(root.path()).unwrap();
    assert_eq!(topology.performance_cores, 4);
    assert_eq!(topology.auto_workers(), 4);
}
