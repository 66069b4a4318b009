//! The project's guest on stock QEMU (`-M microvm -kernel shrink-guest`, booted by PVH), the
//! machine the benchmarks' QEMU baselines run it on: it boots, beats, runs its workloads, finds
//! QEMU's virtio-mmio NIC and disk from the command line, answers ping and UDP echo on a tap,
//! and prints what it prints under shrink-vmm.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shrink_testutil::fs::TempDir;
use shrink_testutil::netns::{self, Netns};
use shrink_testutil::process::{workspace_bin, Bg};
use shrink_testutil::qemu::{self, Qemu};
use shrink_testutil::util::{heartbeats, image, wait_text, wait_until};

/// Everything the guest can be asked to run, at small sizes.
const CMDLINE: &str = "ip=10.1.0.2/16 gw=10.1.0.254 preload=1M private=1M workload=mem,io mem=4M rate=1M \
                       iorate=256K ioarea=1M disktest=write:1000";

/// A LAN: a namespace with a bridge addressed 10.1.0.1/16 and a tap `tap0` on it.
fn lan() -> Netns {
    netns::available().unwrap();
    let ns = Netns::new(&format!("qg{}", netns::unique_tag())).unwrap();
    netns::bridge(&ns, "br0").unwrap();
    ns.exec(&["ip", "addr", "add", "10.1.0.1/16", "dev", "br0"]).unwrap();
    ns.exec(&["ip", "tuntap", "add", "tap0", "mode", "tap"]).unwrap();
    ns.exec(&["ip", "link", "set", "tap0", "master", "br0", "up"]).unwrap();
    ns
}

fn overlay(path: &Path) {
    let base = image("base.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .args([&base, path])
        .status()
        .unwrap()
        .success();
    assert!(ok, "qemu-img create {}", path.display());
}

/// A serial console with every number masked (addresses, sizes, counts and rates differ
/// between the two machines), up to and including the first heartbeat, less the lines that
/// name machine-specific things: the command line (each VMM appends its own
/// `virtio_mmio.device=` list) and the timer's calibration. Only the lines' order may differ.
fn shape(serial: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in serial.lines() {
        if line.starts_with("cmdline:") || line.starts_with("timer:") {
            continue;
        }
        let mut masked = String::new();
        let mut in_number = false;
        for c in line.chars() {
            // Hex digits after "0x" and plain digits alike become one `#`.
            let digit = c.is_ascii_digit() || (in_number && (c.is_ascii_hexdigit() || c == 'x'));
            if digit && !in_number {
                masked.push('#');
            }
            if !digit {
                masked.push(c);
            }
            in_number = digit;
        }
        out.push(masked);
        if line.starts_with("heartbeat ") {
            break;
        }
    }
    out
}

#[test]
fn the_guest_boots_on_qemu_answers_udp_echo_on_a_tap_and_prints_what_it_prints_on_shrink_vmm() {
    let bin = qemu::binary().expect("qemu-system-x86_64 (make deps installs it)");
    let ns = lan();
    let dir = TempDir::new("qemu-guest").unwrap();
    let guest = image("shrink-guest");
    let disk = dir.path().join("qemu.qcow2");
    overlay(&disk);
    let serial = dir.path().join("qemu.serial");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]).arg(&bin);
    let args = qemu::guest_args(&guest, CMDLINE, &serial, Some(("tap0", "52:54:00:00:0a:02")), Some(&disk));
    let mut q = Qemu::spawn("guest", cmd, dir.path(), "256M", &args).unwrap_or_else(|e| panic!("{e}"));

    let text = wait_text(&serial, "heartbeat 2\n", Duration::from_secs(60));
    for line in ["net: mac=52:54:00:00:0a:02 ip=10.1.0.2/16", "workload mem: base=", "shrink-guest ready"] {
        assert!(text.contains(line), "no '{line}' on QEMU's serial console:\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("disk: ") && l.ends_with(" bytes")), "no disk found:\n{text}");
    assert_eq!(q.cmd("query-status", serde_json::json!({})).unwrap()["status"], "running");

    ns.exec(&["ping", "-c", "3", "-W", "2", "10.1.0.2"]).expect("ping the guest on QEMU");
    let r = ns.udp_rtt("10.1.0.2:7", 200, 1000).unwrap();
    assert_eq!(r["received"], 200, "every UDP echo came back: {r}");

    // It keeps beating, once a second (the LAPIC timer QEMU's KVM gives it ticks at 100 Hz).
    let before = *heartbeats(&std::fs::read_to_string(&serial).unwrap()).last().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = *heartbeats(&std::fs::read_to_string(&serial).unwrap()).last().unwrap();
    assert!((2..=4).contains(&(after - before)), "heartbeats {before} then {after} 3 s later");

    // The same guest, command line and devices under shrink-vmm print the same lines.
    let vmm_dir = dir.path().join("vmm");
    std::fs::create_dir_all(&vmm_dir).unwrap();
    let vmm_serial = vmm_dir.join("serial");
    let mut vmm = Command::new("ip");
    vmm.args(["netns", "exec", ns.name()]).arg(workspace_bin("shrink-vmm")).args([
        "--kernel",
        guest.to_str().unwrap(),
        "--mem",
        "256M",
        "--cmdline",
        &CMDLINE.replace("10.1.0.2/", "10.1.0.3/"),
        "--net",
        "tap=vmmtap0,mac=52:54:00:00:0a:03,bridge=br0",
        "--image",
        image("base.qcow2").to_str().unwrap(),
        "--disk",
        vmm_dir.join("disk.qcow2").to_str().unwrap(),
        "--serial",
        vmm_serial.to_str().unwrap(),
        "--api",
        vmm_dir.join("api.sock").to_str().unwrap(),
    ]);
    let _vmm = Bg::spawn(vmm, &vmm_dir.join("vmm.log"));
    let vmm_text = wait_text(&vmm_serial, "heartbeat 1\n", Duration::from_secs(60));
    // (Sorted: the two VMMs list their virtio-mmio transports in different orders, and the
    // guest reports its devices in the order it finds them.)
    let (mut on_qemu, mut on_vmm) = (shape(&text), shape(&vmm_text));
    on_qemu.sort();
    on_vmm.sort();
    assert_eq!(on_qemu, on_vmm, "QEMU's console:\n{text}\nshrink-vmm's:\n{vmm_text}");
    wait_until("the shrink-vmm guest answering", Duration::from_secs(10), || {
        ns.exec(&["ping", "-c", "1", "-W", "1", "10.1.0.3"]).ok()
    });
    drop(q);
}
