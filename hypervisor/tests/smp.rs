//! Several vCPUs (`--cpus N`): the guest finds them in the MP table and starts them with INIT
//! and start-up IPIs, `workload=mem` dirties memory from every one, and every vCPU's state
//! travels in snapshots and live migrations.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use shrink_testutil::ports::free_port;

const BOOT: Duration = Duration::from_secs(30);

fn boot_cpus(dir: &std::path::Path, tag: &str, cpus: u8, mem: &str, cmdline: &str) -> VmProcess {
    let g = guest();
    let n = cpus.to_string();
    VmProcess::spawn(
        dir,
        tag,
        &["--kernel", g.to_str().unwrap(), "--mem", mem, "--cpus", &n, "--cmdline", cmdline, "--name", tag],
    )
}

/// Each application processor's last report on the console, `(heartbeat, pages dirtied)`,
/// index 1 first (complete lines only).
fn ap_reports(serial: &str, cpus: u8) -> Vec<(u64, u64)> {
    let mut last = vec![(0, 0); usize::from(cpus.saturating_sub(1))];
    for line in serial.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let Some(rest) = line.strip_prefix("vcpu ") else { continue };
        let w: Vec<&str> = rest.split_whitespace().collect();
        if let [i, "heartbeat", b, "dirtied", d] = w[..] {
            let (Ok(i), Ok(b), Ok(d)) = (i.trim_end_matches(':').parse::<usize>(), b.parse(), d.parse()) else {
                continue;
            };
            if (1..usize::from(cpus)).contains(&i) {
                last[i - 1] = (b, d);
            }
        }
    }
    last
}

/// Waits until every AP has reported a heartbeat above `beats` and more dirtied pages than
/// `dirtied` (same index).
fn wait_aps_past(vm: &VmProcess, cpus: u8, since: &[(u64, u64)], what: &str) {
    let start = std::time::Instant::now();
    loop {
        let now = ap_reports(&vm.serial_text(), cpus);
        if now.iter().zip(since).all(|(n, s)| n.0 > s.0 && n.1 > s.1) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "every vCPU to go on ({what}): {now:?} since {since:?}\n{}",
            vm.serial_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn one_two_and_four_vcpus_boot_and_every_one_runs_the_workload() {
    let dir = TempDir::new("smp-boot").unwrap();
    for n in [1u8, 2, 4] {
        let vm = boot_cpus(dir.path(), &format!("cpus{n}"), n, "128M", "workload=mem mem=16M rate=2M");
        vm.wait_for(&format!("cpus: {n}\n"), BOOT);
        vm.wait_for("heartbeat 2\n", BOOT);
        let status = vm.exec("status", json!({}));
        let vcpus = status["vcpus"].as_array().unwrap();
        assert_eq!(vcpus.len(), usize::from(n), "{status}");
        for (i, v) in vcpus.iter().enumerate() {
            assert_eq!(v["id"], i, "{status}");
        }
        if n == 1 {
            assert!(!vm.serial_text().contains("vcpu 1:"), "{}", vm.serial_text());
        } else {
            vm.wait_for(&format!("workload mem: shared by {n} vcpus"), BOOT);
            // Each AP counts its own heartbeat and dirties its own pages: it runs.
            wait_aps_past(&vm, n, &vec![(0, 0); usize::from(n - 1)], "after boot");
        }
    }
}

#[test]
fn out_of_range_cpu_counts_are_refused_by_name() {
    let g = guest();
    for bad in ["0", "33", "two"] {
        let (code, err) = run_vmm(&["--kernel", g.to_str().unwrap(), "--cpus", bad], Duration::from_secs(10));
        assert_eq!(code, Some(1), "{bad}: {err}");
        assert!(err.contains(&format!("--cpus {bad}: a VM has 1 to 32 vCPUs")), "{bad}: {err}");
    }
}

#[test]
fn a_snapshot_of_four_vcpus_restores_every_one() {
    let dir = TempDir::new("smp-snap").unwrap();
    let snap = dir.path().join("snap");
    let mut vm = boot_cpus(dir.path(), "src", 4, "128M", "workload=mem mem=16M rate=2M");
    vm.wait_for("heartbeat 2\n", BOOT);
    wait_aps_past(&vm, 4, &[(0, 0); 3], "before the snapshot");
    vm.exec("pause", json!({}));
    let before = vm.exec("memory-digest", json!({}));
    vm.exec("snapshot", json!({"path": snap.to_str().unwrap()}));
    let at_snapshot = ap_reports(&vm.serial_text(), 4);
    vm.exec("quit", json!({}));
    assert!(vm.wait_exit(Duration::from_secs(5)).unwrap().success());

    let restored = VmProcess::spawn(dir.path(), "dst", &["--restore", snap.to_str().unwrap(), "--paused"]);
    assert_eq!(restored.exec("memory-digest", json!({})), before);
    assert_eq!(restored.exec("status", json!({}))["vcpus"].as_array().unwrap().len(), 4);
    restored.exec("resume", json!({}));
    // Every AP goes on from its own count: its registers, LAPIC timer and MP state came back.
    wait_aps_past(&restored, 4, &at_snapshot, "after the restore");
}

#[test]
fn a_live_migration_under_mem_on_every_vcpu_carries_them_all() {
    let dir = TempDir::new("smp-mig").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = VmProcess::spawn(dir.path(), "dst", &["--incoming", &uri]);
    let mut src = boot_cpus(dir.path(), "src", 4, "256M", "workload=mem mem=32M rate=4M");
    src.wait_for("heartbeat 2\n", BOOT);
    wait_aps_past(&src, 4, &[(0, 0); 3], "before the migration");
    src.exec("migrate", json!({"uri": uri, "verify": true}));
    let info = wait_migration(&src, Duration::from_secs(90));
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["ram"]["dirty-sync-count"].as_u64().unwrap() >= 1, "{info}");
    assert!(src.wait_exit(Duration::from_secs(5)).expect("source still running").success());
    let at_switch = ap_reports(&src.serial_text(), 4);
    let incoming = dst.exec("query-migrate", json!({}));
    assert_eq!(incoming["incoming"]["memory_sha256"], info["memory-sha256"], "{incoming}");
    assert_eq!(dst.exec("status", json!({}))["vcpus"].as_array().unwrap().len(), 4);
    wait_aps_past(&dst, 4, &at_switch, "at the destination");
}

#[test]
fn auto_converge_throttles_every_vcpu() {
    // Four vCPUs dirty a 4 MB set at 32 MB/s in all (8 MB/s each) against an 8 MB/s cap: only a
    // throttle on all four brings the dirty rate under the link (one throttled vCPU would leave
    // 24 MB/s).
    let dir = TempDir::new("smp-converge").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let _dst = VmProcess::spawn(dir.path(), "dst", &["--incoming", &uri]);
    let src = boot_cpus(dir.path(), "src", 4, "64M", "workload=mem mem=4M rate=32M");
    src.wait_for("heartbeat 1\n", BOOT);
    wait_aps_past(&src, 4, &[(0, 0); 3], "before the migration");
    src.exec("migrate", json!({"uri": uri, "max_bandwidth": 8_000_000, "max_iterations": 60, "auto_converge": true}));
    let info = wait_migration(&src, Duration::from_secs(180));
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["cpu-throttle-percentage"].as_u64().unwrap_or(0) > 0, "{info}");
}
