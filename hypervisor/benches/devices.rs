//! `make bench` for the devices: UDP echo round trips and UDP throughput through virtio-net and
//! a tap on a bridge, and preload throughput from a qcow2 overlay through virtio-blk.
//!
//! Usage: `cargo bench -p hypervisor --bench devices -- OUT.json`

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use shrink_testutil::netns::{self, Netns};
use shrink_testutil::util::{bench_output, repo_root as repo, utc_now};

fn wait_text(p: &Path, needle: &str) -> String {
    shrink_testutil::util::wait_text(p, needle, Duration::from_secs(120))
}

struct Vm(std::process::Child);
impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(ns: &Netns, dir: &Path, name: &str, mac: &str, cmdline: &str, disk: bool) -> (Vm, PathBuf) {
    let serial = dir.join(format!("{name}.serial"));
    let mut c = ns.command(shrink_testutil::process::workspace_bin("shrink-vmm").to_str().unwrap());
    c.args([
        "--kernel",
        repo().join("images/out/shrink-guest").to_str().unwrap(),
        "--mem",
        "512M",
        "--cmdline",
        cmdline,
    ]);
    c.args(["--net", &format!("tap={name},mac={mac},bridge=br0"), "--serial", serial.to_str().unwrap()]);
    if disk {
        c.args(["--image", repo().join("images/out/base.qcow2").to_str().unwrap()]);
        c.arg("--disk").arg(dir.join(format!("{name}.qcow2")));
    }
    let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    (Vm(child), serial)
}

fn main() {
    let out = bench_output("bench/results/devices.json");
    netns::available().unwrap();
    let dir = std::env::temp_dir().join(format!("shrink-bench-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = Netns::new(&format!("bd{}", netns::unique_tag())).unwrap();
    netns::bridge(&ns, "br0").unwrap();
    ns.exec(&["ip", "addr", "add", "10.1.0.1/16", "dev", "br0"]).unwrap();

    eprintln!("devices bench: preload and UDP echo ...");
    let (_vm, serial) = boot(&ns, &dir, "bdev1", "52:54:00:00:08:02", "ip=10.1.0.2/16 preload=256M", true);
    let text = wait_text(&serial, "shrink-guest ready");
    let preload = text.lines().find(|l| l.starts_with("preload:")).unwrap_or("").to_owned();
    let mbps: f64 =
        preload.split('(').nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let rtt: Value = ns.udp_rtt("10.1.0.2:7", 2000, 500).unwrap_or(Value::Null);

    eprintln!("devices bench: UDP throughput ...");
    let (_vm2, serial2) =
        boot(&ns, &dir, "bdev2", "52:54:00:00:08:03", "ip=10.1.0.3/16 udpsend=10.1.0.1:9000,1472,0", false);
    wait_text(&serial2, "shrink-guest ready");
    let rx = ns
        .exec(&[
            "python3",
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.1.0.1',9000))\ns.settimeout(2)\nn=b=0\nt0=time.time()\nwhile time.time()-t0<5:\n  try:\n    d=s.recv(65536)\n  except socket.timeout:\n    break\n  n+=1\n  b+=len(d)\nprint(n,b,time.time()-t0)",
        ])
        .unwrap();
    let f: Vec<f64> = rx.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let (pkts, bytes, secs) = (f[0], f[1], f[2]);

    let date = utc_now();
    let doc = json!({
        "benchmark": "devices",
        "date": date,
        "command": "cargo bench -p hypervisor --bench devices -- bench/results/devices.json",
        "udp_echo_rtt_us": {"p50": rtt["p50_us"], "p99": rtt["p99_us"], "min": rtt["min_us"], "received": rtt["received"], "sent": rtt["sent"]},
        "udp_guest_to_host": {"payload_mbit_per_s": bytes * 8.0 / secs / 1e6, "packets_per_s": pkts / secs, "payload_bytes": 1472},
        "preload_from_qcow2_overlay": {"line": preload, "mb_per_s": mbps, "note": "page cache of the host may be warm"},
    });
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&doc).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
