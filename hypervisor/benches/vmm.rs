//! `make bench` for the VMM: boot-to-ready time, VMM memory beyond guest memory, dirty-log
//! fetch time of a 1 GiB guest, snapshot write and restore throughput.
//!
//! Usage: `cargo bench -p hypervisor --bench vmm -- OUT.json`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypervisor::config::{SerialOutput, VmConfig};
use hypervisor::devices::serial::SharedBuffer;
use hypervisor::loader::KernelConfig;
use hypervisor::vmm::Vmm;
use serde_json::json;

use shrink_testutil::util::{bench_output, repo_root as repo, utc_now};

fn guest() -> PathBuf {
    let g = repo().join("images/out/shrink-guest");
    assert!(g.exists(), "run `make images` first");
    g
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn vmm_bin() -> PathBuf {
    shrink_testutil::process::workspace_bin("shrink-vmm")
}

/// Spawns shrink-vmm and times the first "shrink-guest ready" on its serial file.
fn boot_to_ready(dir: &Path, i: usize) -> f64 {
    let serial = dir.join(format!("boot{i}.serial"));
    let start = Instant::now();
    let mut child = Command::new(vmm_bin())
        .args(["--kernel", guest().to_str().unwrap(), "--mem", "256M", "--serial"])
        .arg(&serial)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t = loop {
        if std::fs::read_to_string(&serial).unwrap_or_default().contains("shrink-guest ready") {
            break start.elapsed().as_secs_f64() * 1e3;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "guest did not boot");
        std::thread::sleep(Duration::from_micros(500));
    };
    let _ = child.kill();
    let _ = child.wait();
    t
}

/// RSS of the process minus the RSS of its guest-memory mapping (the mapping of `mem` bytes).
fn vmm_overhead_kib(pid: u32, mem: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut r = first.split('-');
            let a = u64::from_str_radix(r.next().unwrap(), 16).unwrap_or(0);
            let b = u64::from_str_radix(r.next().unwrap_or("0"), 16).unwrap_or(0);
            in_guest = b - a == mem;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    (total - guest, guest)
}

fn boot_in_process(cmdline: &str, mem: u64) -> (Vmm, SharedBuffer) {
    let buf = SharedBuffer::default();
    let cfg = VmConfig {
        name: "bench".into(),
        mem_size: mem,
        vcpus: 1,
        kernel: KernelConfig { kernel: guest(), initrd: None, cmdline: cmdline.into() },
        serial: SerialOutput::Buffer(buf.clone()),
        start_paused: false,
        net: Vec::new(),
        disk: None,
    };
    (Vmm::boot(&cfg).unwrap(), buf)
}

fn wait_text(buf: &SharedBuffer, needle: &str, secs: u64) {
    let start = Instant::now();
    while !buf.text().contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(secs), "no {needle:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() {
    let out = bench_output("bench/results/vmm.json");
    let dir = std::env::temp_dir().join(format!("shrink-bench-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    eprintln!("vmm bench: boot to ready ...");
    let boots: Vec<f64> = (0..7).map(|i| boot_to_ready(&dir, i)).collect();

    eprintln!("vmm bench: memory overhead ...");
    let mem = 256u64 << 20;
    let serial = dir.join("rss.serial");
    let mut child = Command::new(vmm_bin())
        .args([
            "--kernel",
            guest().to_str().unwrap(),
            "--mem",
            "256M",
            "--cmdline",
            "workload=mem mem=64M rate=64M",
            "--serial",
        ])
        .arg(&serial)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let (overhead_kib, guest_kib) = vmm_overhead_kib(child.id(), mem);
    let _ = child.kill();
    let _ = child.wait();

    eprintln!("vmm bench: idle CPU cost ...");
    let mut child = Command::new(vmm_bin())
        .args(["--kernel", guest().to_str().unwrap(), "--mem", "128M", "--serial"])
        .arg(dir.join("idle.serial"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let (t0, c0) = (Instant::now(), ticks(child.id()));
    std::thread::sleep(Duration::from_secs(10));
    let idle_cpu_percent = (ticks(child.id()) - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
    let _ = child.kill();
    let _ = child.wait();

    eprintln!("vmm bench: dirty log of a 1 GiB guest ...");
    let (mut vmm, buf) = boot_in_process("workload=mem mem=256M rate=64M", 1 << 30);
    wait_text(&buf, "shrink-guest ready", 30);
    vmm.start_dirty_log().unwrap();
    let mut dirty_ms = Vec::new();
    let mut dirty_pages = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let log = vmm.dirty_log().unwrap();
        dirty_ms.push(t.elapsed().as_secs_f64() * 1e3);
        dirty_pages.push(log.count() as f64);
    }

    eprintln!("vmm bench: snapshot and restore ...");
    // Let the working set fill with random data first.
    std::thread::sleep(Duration::from_secs(3));
    let snap = dir.join("snap");
    let stats = vmm.snapshot(&snap).unwrap();
    vmm.shutdown();
    drop(vmm);
    let t = Instant::now();
    let restored = Vmm::restore(&snap, None, &SerialOutput::Sink, true).unwrap();
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(restored);

    let mb = stats.memory_bytes as f64 / 1e6;
    let result = json!({
        "benchmark": "vmm",
        "date": utc_now(),
        "host": shrink_testutil::util::host_info(),
        "boot_to_ready_ms": {"median": median(boots.clone()), "runs": boots},
        "idle_vm_cpu_percent_of_one_core": idle_cpu_percent,
        "vmm_rss_beyond_guest_memory_kib": overhead_kib,
        "guest_memory_rss_kib": guest_kib,
        "dirty_log_1gib": {
            "fetch_and_clear_ms_median": median(dirty_ms.clone()),
            "fetch_and_clear_ms_max": dirty_ms.iter().cloned().fold(0.0, f64::max),
            "dirty_pages_per_100ms_median": median(dirty_pages),
        },
        "snapshot": {
            "guest_memory_bytes": stats.mem_size,
            "nonzero_bytes_written": stats.memory_bytes,
            "write_ms": stats.time_ms,
            "write_mb_per_s": mb / (stats.time_ms / 1e3),
            "restore_ms": restore_ms,
            "restore_mb_per_s": mb / (restore_ms / 1e3),
        },
    });
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
