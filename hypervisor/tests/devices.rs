//! virtio-net on taps and virtio-blk on qcow2 overlays, with the project's guest: ping and UDP
//! from a namespace on the same bridge, guests probing each other, disk persistence, snapshot
//! and restore with live devices, preload sharing, and bad input.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use shrink_testutil::netns::{self, Netns};
use shrink_testutil::util::wait_until;

const BOOT: Duration = Duration::from_secs(30);

/// A LAN: a namespace with a bridge addressed 10.1.0.1/16.
fn lan(tag: &str) -> Netns {
    netns::available().unwrap();
    let ns = Netns::new(&format!("{tag}{}", netns::unique_tag())).unwrap();
    netns::bridge(&ns, "br0").unwrap();
    ns.exec(&["ip", "addr", "add", "10.1.0.1/16", "dev", "br0"]).unwrap();
    ns
}

fn boot_on(ns: &Netns, dir: &Path, tag: &str, mac: &str, ip: &str, extra: &str, disk: Option<&Path>) -> VmProcess {
    let g = guest();
    let net = format!("tap={tag},mac={mac},bridge=br0");
    let cmdline = format!("ip={ip}/16 gw=10.1.0.254 {extra}");
    let mut args =
        vec!["--kernel", g.to_str().unwrap(), "--mem", "256M", "--cmdline", &cmdline, "--net", &net, "--name", tag];
    let base = image("base.qcow2");
    if let Some(d) = disk {
        args.extend(["--image", base.to_str().unwrap(), "--disk", d.to_str().unwrap()]);
    }
    VmProcess::spawn_in(Some(ns.name()), dir, tag, &args, &[])
}

/// UDP round trips to `to` from inside `ns`: the JSON report of `vnet-probe udp-rtt` (the
/// workspace's build, which `Netns::udp_rtt` asserts is there).
fn udp_rtt(ns: &Netns, to: &str, count: u32) -> serde_json::Value {
    ns.udp_rtt(to, count, 1000).unwrap()
}

#[test]
fn a_guest_on_a_bridge_answers_ping_and_udp_echo() {
    let ns = lan("dvp");
    let dir = TempDir::new("dev-ping").unwrap();
    let vm = boot_on(&ns, dir.path(), "vmp", "52:54:00:00:01:02", "10.1.0.2", "", None);
    vm.wait_for("shrink-guest ready", BOOT);
    ns.exec(&["ping", "-c", "3", "-W", "2", "10.1.0.2"]).expect("ping the guest");
    let r = udp_rtt(&ns, "10.1.0.2:7", 200);
    assert_eq!(r["received"], 200, "every echo came back: {r}");
    let status = vm.exec("status", json!({}));
    assert_eq!(status["devices"][0]["name"], "net0");
    assert_eq!(status["devices"][0]["needs_reset"], false);
}

/// The MAC address of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> String {
    ns.exec(&["cat", &format!("/sys/class/net/{dev}/address")]).unwrap().trim().to_owned()
}

/// A host whose own address is on the VM bridge (a common layout): the bridge's MAC, which the
/// LAN's ARP caches know the host by, is its NIC's, and stays so while VM taps come and go.
#[test]
fn taps_never_change_the_bridge_mac() {
    let ns = lan("dvm");
    // The host's NIC, a port of the bridge, with an address many random tap addresses are below.
    ns.exec(&["ip", "link", "add", "nic0", "type", "veth", "peer", "name", "nic0p"]).unwrap();
    ns.exec(&["ip", "link", "set", "nic0", "address", "5a:00:00:00:00:10", "master", "br0", "up"]).unwrap();
    ns.exec(&["ip", "link", "set", "nic0p", "up"]).unwrap();
    let bridge_mac = mac_of(&ns, "br0");
    assert_eq!(bridge_mac, "5a:00:00:00:00:10", "a bridge of one port has that port's address");
    let dir = TempDir::new("dev-mac").unwrap();
    for (i, guest_mac) in ["52:54:00:00:07:02", "02:00:00:00:07:03", "00:16:3e:00:07:04"].iter().enumerate() {
        let tag = format!("vmm{i}");
        let vm = boot_on(&ns, dir.path(), &tag, guest_mac, &format!("10.1.0.{}", 20 + i), "", None);
        vm.wait_for("shrink-guest ready", BOOT);
        assert_eq!(mac_of(&ns, &tag), format!("fe{}", &guest_mac[2..]), "the tap's host side: fe + the guest's");
        assert_eq!(mac_of(&ns, "br0"), bridge_mac, "a tap was added");
        drop(vm);
        wait_until("the tap to be gone", Duration::from_secs(10), || {
            ns.exec(&["ip", "link", "show", &tag]).is_err().then_some(())
        });
        assert_eq!(mac_of(&ns, "br0"), bridge_mac, "a tap was removed");
    }
}

#[test]
fn two_guests_on_one_bridge_probe_each_other_without_loss() {
    let ns = lan("dv2");
    let dir = TempDir::new("dev-probe").unwrap();
    let a = boot_on(&ns, dir.path(), "vma", "52:54:00:00:02:02", "10.1.0.2", "probe=10.1.0.3:7,10", None);
    let b = boot_on(&ns, dir.path(), "vmb", "52:54:00:00:02:03", "10.1.0.3", "probe=10.1.0.2:7,10", None);
    a.wait_for("shrink-guest ready", BOOT);
    b.wait_for("shrink-guest ready", BOOT);
    for vm in [&a, &b] {
        let field = |line: &str, k: &str| -> Option<u64> {
            line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}=")))?.parse().ok()
        };
        // A report covering at least 100 probes, however long the host takes to send them
        // (complete lines only: the console may be read in the middle of one).
        let line = wait_until("a probe report covering 100 probes", Duration::from_secs(120), || {
            let text = vm.serial_text();
            let done = &text[..text.rfind('\n')?];
            let line = done.lines().rfind(|l| l.starts_with("probe: "))?.to_owned();
            (field(&line, "sent")? >= 100).then_some(line)
        });
        let field = |k: &str| field(&line, k).unwrap_or_else(|| panic!("no {k}= in {line}"));
        assert_eq!(field("lost"), 0, "{line}");
        assert!(field("received") + 100 >= field("sent"), "{line}");
    }
}

fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_owned()
}

#[test]
fn disk_writes_persist_in_the_overlay_and_the_base_is_never_written() {
    let ns = lan("dvd");
    let dir = TempDir::new("dev-disk").unwrap();
    let base = image("base.qcow2");
    let before = sha256_file(&base);
    let overlay = dir.path().join("vm1.qcow2");
    let mut vm = boot_on(
        &ns,
        dir.path(),
        "vmd1",
        "52:54:00:00:03:02",
        "10.1.0.2",
        "preload=8M disktest=write:100000",
        Some(&overlay),
    );
    vm.wait_for("disktest: wrote 100000", BOOT);
    vm.exec("quit", json!({}));
    assert!(vm.wait_exit(Duration::from_secs(10)).unwrap().success());
    let check = Command::new("qemu-img").args(["check", overlay.to_str().unwrap()]).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
    let info = Command::new("qemu-img").args(["info", overlay.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains(base.canonicalize().unwrap().to_str().unwrap()));
    // A new VMM on the same overlay reads the data back.
    let vm = boot_on(&ns, dir.path(), "vmd2", "52:54:00:00:03:02", "10.1.0.2", "disktest=check:100000", Some(&overlay));
    vm.wait_for("disktest: ok 100000", BOOT);
    drop(vm);
    assert_eq!(sha256_file(&base), before, "the base image changed");
}

#[test]
fn snapshot_and_restore_with_live_network_and_disk() {
    let ns = lan("dvs");
    let dir = TempDir::new("dev-snap").unwrap();
    let overlay = dir.path().join("vm.qcow2");
    let snap = dir.path().join("snap");
    let mut vm =
        boot_on(&ns, dir.path(), "vms1", "52:54:00:00:04:02", "10.1.0.2", "disktest=write:200000", Some(&overlay));
    vm.wait_for("disktest: wrote 200000", BOOT);
    assert_eq!(udp_rtt(&ns, "10.1.0.2:7", 50)["received"], 50);
    vm.exec("pause", json!({}));
    vm.exec("snapshot", json!({"path": snap.to_str().unwrap()}));
    vm.exec("quit", json!({}));
    vm.wait_exit(Duration::from_secs(10)).unwrap();
    // The restored VM re-opens the same tap and overlay; its network stack carries on.
    let restored =
        VmProcess::spawn_in(Some(ns.name()), dir.path(), "vms2", &["--restore", snap.to_str().unwrap()], &[]);
    let n = restored.exec("status", json!({}));
    assert_eq!(n["devices"].as_array().unwrap().len(), 2, "{n}");
    let r = udp_rtt(&ns, "10.1.0.2:7", 50);
    assert_eq!(r["received"], 50, "UDP echo after restore: {r}");
    restored.exec("quit", json!({}));
    drop(restored);
    let vm = boot_on(&ns, dir.path(), "vms3", "52:54:00:00:04:02", "10.1.0.2", "disktest=check:200000", Some(&overlay));
    vm.wait_for("disktest: ok 200000", BOOT);
}

/// The set of non-zero page digests of a VM (per-page SHA-256 from the VMM).
fn page_digests(vm: &VmProcess, file: &Path) -> Vec<[u8; 32]> {
    let d = vm.exec("memory-digest", json!({"pages": file.to_str().unwrap()}));
    assert!(d["pages"].as_u64().unwrap() > 0);
    let zero = {
        use openssl::sha::sha256;
        sha256(&[0u8; 4096])
    };
    std::fs::read(file).unwrap().chunks(32).map(|c| <[u8; 32]>::try_from(c).unwrap()).filter(|d| *d != zero).collect()
}

#[test]
fn guests_from_one_image_share_their_preloaded_pages() {
    let ns = lan("dvl");
    let dir = TempDir::new("dev-preload").unwrap();
    let a = boot_on(
        &ns,
        dir.path(),
        "vml1",
        "52:54:00:00:05:02",
        "10.1.0.2",
        "preload=64M private=4M",
        Some(&dir.path().join("a.qcow2")),
    );
    let b = boot_on(
        &ns,
        dir.path(),
        "vml2",
        "52:54:00:00:05:03",
        "10.1.0.3",
        "preload=64M private=4M",
        Some(&dir.path().join("b.qcow2")),
    );
    a.wait_for("shrink-guest ready", BOOT);
    b.wait_for("shrink-guest ready", BOOT);
    a.exec("pause", json!({}));
    b.exec("pause", json!({}));
    let da = page_digests(&a, &dir.path().join("a.bin"));
    let db: std::collections::HashSet<[u8; 32]> = page_digests(&b, &dir.path().join("b.bin")).into_iter().collect();
    let shared = da.iter().filter(|d| db.contains(*d)).count();
    // The preloaded pages that are not zero: the non-zero 4 KiB pages of the image's first
    // 64 MiB, read independently with qemu-img.
    let raw = dir.path().join("head.raw");
    let out = Command::new("qemu-img")
        .args(["dd", "-f", "qcow2", "-O", "raw", "bs=1M", "count=64"])
        .arg(format!("if={}", image("base.qcow2").display()))
        .arg(format!("of={}", raw.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let preload_nonzero = std::fs::read(&raw).unwrap().chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).count();
    assert!(preload_nonzero > 4096, "the image's first 64 MiB: {preload_nonzero} non-zero pages");
    assert!(da.len() >= preload_nonzero, "non-zero pages: {}", da.len());
    let preload_shared = shared as f64 / preload_nonzero as f64;
    eprintln!(
        "non-zero pages {}, shared with the other VM {shared} ({:.1} % of the preload)",
        da.len(),
        preload_shared * 100.0
    );
    assert!(preload_shared >= 0.90, "only {shared} pages shared");
    // ... and the VMs are not identical: private memory differs.
    assert!(shared < da.len(), "two VMs with different MACs have identical memory");
}

fn one_line_error(args: &[&str], needle: &str) {
    let (code, err) = run_vmm(args, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

#[test]
fn bad_devices_are_refused_with_clear_errors() {
    let dir = TempDir::new("dev-bad").unwrap();
    let g = guest();
    let g = g.to_str().unwrap();
    let ov = dir.path().join("ov.qcow2");
    let ov = ov.to_str().unwrap();
    one_line_error(
        &["--kernel", g, "--image", "/nonexistent/base.qcow2", "--disk", ov],
        "base image /nonexistent/base.qcow2",
    );
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    one_line_error(&["--kernel", g, "--image", raw.to_str().unwrap(), "--disk", ov], "is not a qcow2 image");
    let corrupt = dir.path().join("corrupt.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend(std::iter::repeat_n(0xa5u8, 4096));
    std::fs::write(&corrupt, bytes).unwrap();
    one_line_error(&["--kernel", g, "--image", corrupt.to_str().unwrap(), "--disk", ov], "corrupt.qcow2");
    one_line_error(
        &["--kernel", g, "--net", "tap=a-name-much-too-long-for-linux,mac=52:54:00:00:00:01"],
        "tap name 'a-name-much-too-long-for-linux' is invalid",
    );
    one_line_error(&["--kernel", g, "--net", "tap=t0,mac=52:54:zz:00:00:01"], "malformed MAC '52:54:zz:00:00:01'");
    one_line_error(&["--kernel", g, "--net", "tap=t0"], "missing mac=MAC");
    one_line_error(
        &["--kernel", g, "--net", "tap=t0,mac=52:54:00:00:00:01,bridge=no-such-br"],
        "adding it to the bridge",
    );
}

#[test]
fn a_guest_that_breaks_the_virtio_protocol_gets_needs_reset_and_the_vmm_survives() {
    let dir = TempDir::new("dev-garbage").unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/virtio_garbage.S");
    let elf = dir.path().join("virtio_garbage");
    let cc = Command::new("cc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x200000", "-Wl,--build-id=none", "-o"])
        .arg(&elf)
        .arg(&src)
        .output()
        .expect("a C compiler (cc) builds the test guest");
    assert!(cc.status.success(), "{}", String::from_utf8_lossy(&cc.stderr));
    let ns = lan("dvg");
    let vm = VmProcess::spawn_in(
        Some(ns.name()),
        dir.path(),
        "vmg",
        &["--kernel", elf.to_str().unwrap(), "--mem", "64M", "--net", "tap=tg0,mac=52:54:00:00:06:02,bridge=br0"],
        &[],
    );
    vm.wait_for("virtio status: needs-reset", BOOT);
    let s = vm.exec("status", json!({}));
    assert_eq!(s["devices"][0]["needs_reset"], true, "{s}");
    assert!(!vm.stderr_text().contains("panicked"));
}
