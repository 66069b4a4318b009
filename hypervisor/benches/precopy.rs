//! `make bench` for pre-copy live migration: shrink and QEMU side by side, on the same running
//! guest and over the same links (two network namespaces joined by a veth pair, shaped to
//! 100 Mbit/s with `tc tbf` or left unshaped).
//!
//! For each workload the project's guest boots in namespace A, on shrink-vmm and then on stock
//! QEMU (`-M microvm -kernel images/out/shrink-guest`, booted by PVH, the same command line),
//! runs for the same time, and migrates live to a VMM of its kind in namespace B. QEMU runs
//! twice: plain pre-copy, and multifd (2 channels) with zstd compression.
//!
//! Usage: `cargo bench -p hypervisor --bench precopy -- OUT.json`

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use migrate::client::ApiClient;
use serde_json::{json, Value};
use shrink_testutil::netns::{self, Netns};
use shrink_testutil::qemu::{self, Qemu, QemuError};

use shrink_testutil::util::{bench_output, repo_root as repo, utc_now};

fn bin(name: &str) -> PathBuf {
    shrink_testutil::process::workspace_bin(name)
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &Netns, program: &Path, args: &[&str], log: &Path) -> Proc {
    Proc(
        ns.command(program.to_str().unwrap())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn wait_path(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_text(p: &Path, needle: &str) {
    shrink_testutil::util::wait_text(p, needle, Duration::from_secs(60));
}

fn api(sock: &Path, cmd: &str, args: Value) -> Value {
    ApiClient::connect(sock).unwrap().execute(cmd, args).unwrap().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// One shrink migration; returns query-migrate at the end.
fn shrink_run(dir: &Path, a: &Netns, b: &Netns, cmdline: &str, fill: Duration, dst_ip: &str) -> Value {
    let vmm = bin("shrink-vmm");
    let guest = repo().join("images/out/shrink-guest");
    let uri = format!("tcp:{dst_ip}:7100");
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    // TLS between the two, as deployed.
    let key = shrink_testutil::util::cluster_key().to_str().unwrap();
    let _ = std::fs::remove_file(&src_sock);
    let _ = std::fs::remove_file(&dst_sock);
    let _dst = spawn_in(
        b,
        &vmm,
        &["--incoming", &uri, "--api", dst_sock.to_str().unwrap(), "--serial", "/dev/null", "--cluster-key", key],
        &dir.join("dst.log"),
    );
    let serial = dir.join("src.serial");
    let _src = spawn_in(
        a,
        &vmm,
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--mem",
            "256M",
            "--cmdline",
            cmdline,
            "--api",
            src_sock.to_str().unwrap(),
            "--serial",
            serial.to_str().unwrap(),
            "--cluster-key",
            key,
        ],
        &dir.join("src.log"),
    );
    wait_path(&src_sock);
    wait_text(&serial, "shrink-guest ready");
    std::thread::sleep(fill);
    wait_path(&dst_sock);
    api(&src_sock, "migrate", json!({"uri": uri, "max_iterations": 60}));
    let mut client = ApiClient::connect(&src_sock).unwrap();
    let mut last = json!({});
    loop {
        std::thread::sleep(Duration::from_millis(50));
        match client.execute("query-migrate", json!({})) {
            Ok(Ok(v)) => {
                if matches!(v["status"].as_str(), Some("completed" | "failed")) {
                    return v;
                }
                last = v;
            }
            _ => return last,
        }
    }
}

/// A QEMU in namespace `ns` with `args` after the common ones, QMP on `<dir>/<tag>.qmp`.
fn qemu_in(dir: &Path, ns: &Netns, tag: &str, args: &[String]) -> Qemu {
    let bin = qemu::binary().expect("qemu-system-x86_64 (make deps)");
    Qemu::spawn(tag, ns.command(bin.to_str().unwrap()), dir, "256M", args).unwrap_or_else(|e| panic!("{e}"))
}

/// One live QEMU migration of the guest with `cmdline`, booted in `a` and run for `fill`, to a
/// QEMU in `b` over the same link; with `zstd`, multifd (2 channels) with zstd compression.
fn qemu_run(dir: &Path, a: &Netns, b: &Netns, cmdline: &str, fill: Duration, dst_ip: &str, zstd: bool) -> Value {
    let uri = format!("tcp:{dst_ip}:7200");
    let guest = repo().join("images/out/shrink-guest");
    let serial = dir.join("qsrc.serial");
    let _ = std::fs::remove_file(&serial);
    let mut dst_args = qemu::guest_args(&guest, cmdline, &dir.join("qdst.serial"), None, None);
    dst_args.extend(["-incoming".into(), "defer".into()]);
    let mut dst = qemu_in(dir, b, "qdst", &dst_args);
    let mut q = qemu_in(dir, a, "qsrc", &qemu::guest_args(&guest, cmdline, &serial, None, None));
    let ok = |r: Result<Value, QemuError>| r.unwrap_or_else(|e| panic!("{e}"));
    for end in [&mut q, &mut dst] {
        if zstd {
            qemu::enable_multifd_zstd(end).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    ok(dst.cmd("migrate-incoming", json!({"uri": uri})));
    wait_text(&serial, "shrink-guest ready");
    std::thread::sleep(fill);
    // No artificial cap (QEMU's default is 128 MiB/s): the link decides, as for shrink.
    ok(q.cmd("migrate-set-parameters", json!({"max-bandwidth": 10_000_000_000u64, "downtime-limit": 300})));
    ok(q.cmd("migrate", json!({"uri": uri})));
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let r = ok(q.cmd("query-migrate", json!({})));
        let st = r["status"].as_str().unwrap_or("").to_owned();
        if st == "completed" || st == "failed" || start.elapsed() > Duration::from_secs(300) {
            return r;
        }
    }
}

fn summary(system: &str, v: &Value) -> Value {
    json!({
        "system": system,
        "status": v["status"],
        "total_time_ms": v["total-time"],
        "downtime_ms": v["downtime"],
        "transferred_bytes": v["ram"]["transferred"],
        "iterations": v["ram"]["dirty-sync-count"],
        "normal_pages": v["ram"]["normal"],
        "duplicate_pages": v["ram"]["duplicate"],
        "mbps": v["ram"]["mbps"],
    })
}

fn main() {
    let out = bench_output("bench/results/precopy.json");
    netns::available().unwrap();
    let has_qemu = qemu::binary().is_some();
    let dir = std::env::temp_dir().join(format!("shrink-bench-precopy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let workloads = [
        ("idle", "workload=idle", Duration::from_secs(1)),
        // Dirties 4 MB/s (a third of the 100 Mbit/s link) over a 48 MB working set.
        ("mem", "workload=mem mem=48M rate=4M", Duration::from_secs(4)),
    ];
    let mut results = Vec::new();
    for (link, rate) in [("100mbit", Some("100mbit")), ("unshaped", None)] {
        for (wname, cmdline, fill) in workloads {
            let t = netns::unique_tag();
            let a = Netns::new(&format!("pba{t}")).unwrap();
            let b = Netns::new(&format!("pbb{t}")).unwrap();
            netns::link(&a, "10.98.0.1/24", &b, "10.98.0.2/24", rate).unwrap();
            eprintln!("precopy bench: shrink, {wname}, {link} ...");
            let s = shrink_run(&dir, &a, &b, cmdline, fill, "10.98.0.2");
            let mut row =
                json!({"link": link, "workload": wname, "guest_memory": "256 MiB", "shrink": summary("shrink", &s)});
            if has_qemu {
                for (key, zstd) in [("qemu", false), ("qemu_zstd", true)] {
                    eprintln!("precopy bench: {key}, {wname}, {link} ...");
                    let q = qemu_run(&dir, &a, &b, cmdline, fill, "10.98.0.2", zstd);
                    row[key] = summary(key, &q);
                    let ratio = |k: &str| {
                        let (x, y) = (row["shrink"][k].as_f64().unwrap_or(0.0), row[key][k].as_f64().unwrap_or(0.0));
                        if y > 0.0 {
                            json!(x / y)
                        } else {
                            Value::Null
                        }
                    };
                    // (QEMU counts multifd pages before compression: its bytes for qemu_zstd are
                    // the uncompressed ones, and only its time and downtime compare.)
                    row[format!("shrink_over_{key}")] = json!({"total_time": ratio("total_time_ms"),
                        "downtime": ratio("downtime_ms"), "transferred": if zstd { Value::Null } else { ratio("transferred_bytes") }});
                }
            }
            eprintln!("{}", row);
            results.push(row);
        }
    }
    let date = utc_now();
    let doc = json!({
        "benchmark": "precopy",
        "date": date,
        "host": shrink_testutil::util::host_info(),
        "command": "cargo bench -p hypervisor --bench precopy -- bench/results/precopy.json",
        "note": "QEMU migrates the same guest live (PVH boot of images/out/shrink-guest on -M microvm, the same command line and run time); qemu_zstd: multifd, 2 channels, zstd, whose transferred bytes QEMU counts before compression; QEMU's times and downtimes are its own query-migrate figures, which end at the source's last write (before the data has crossed the link and the destination runs), shrink's at the destination's verdict: for the small idle moves QEMU's look shorter than the link allows",
        "runs": results,
    });
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&doc).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
