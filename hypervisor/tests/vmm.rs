//! shrink-vmm as a user runs it: boot, heartbeats, pause/resume, snapshot/restore, the API.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const BOOT: Duration = Duration::from_secs(20);

#[test]
fn boots_to_ready_and_heartbeats() {
    let dir = TempDir::new("boot").unwrap();
    let vm = VmProcess::boot(dir.path(), "vm1", "256M", "workload=idle");
    vm.wait_for("shrink-guest ready", BOOT);
    vm.wait_for("heartbeat 2\n", BOOT);
    let hb = heartbeats(&vm.serial_text());
    assert_eq!(hb[..2], [1, 2], "heartbeats count up from 1: {hb:?}");
    let status = vm.exec("status", json!({}));
    assert_eq!(status["state"], "running");
    assert_eq!(status["name"], "vm1");
    assert_eq!(status["memory_bytes"], 256u64 << 20);
    assert!(status["vcpus"][0]["exits"]["io"].as_u64().unwrap() > 0, "{status}");
}

#[test]
fn pause_stops_the_heartbeat_and_resume_continues_it() {
    let dir = TempDir::new("pause").unwrap();
    let vm = VmProcess::boot(dir.path(), "vm", "128M", "workload=idle");
    vm.wait_for("heartbeat 1\n", BOOT);
    vm.exec("pause", json!({}));
    assert_eq!(vm.exec("status", json!({}))["state"], "paused");
    let at_pause = vm.last_heartbeat().unwrap();
    // Not a synchronisation: an observation window, more than two heartbeats long, in which
    // nothing may happen.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(vm.last_heartbeat().unwrap(), at_pause, "heartbeat advanced while paused");
    vm.exec("resume", json!({}));
    vm.wait_for(&format!("heartbeat {}\n", at_pause + 1), Duration::from_secs(5));
    assert_eq!(vm.exec("status", json!({}))["state"], "running");
}

#[test]
fn snapshot_then_restore_in_a_new_process_continues_the_guest() {
    let dir = TempDir::new("snap").unwrap();
    let snap = dir.path().join("snap");
    let mut vm = VmProcess::boot(dir.path(), "src", "128M", "workload=mem mem=16M rate=1M");
    vm.wait_for("heartbeat 2\n", BOOT);
    vm.exec("pause", json!({}));
    let before = vm.exec("memory-digest", json!({}));
    let stats = vm.exec("snapshot", json!({"path": snap.to_str().unwrap()}));
    // The guest has written about 1 MB/s of random pages: they are in, the zero pages are not.
    let written = stats["memory_bytes"].as_u64().unwrap();
    assert!(written > 1 << 20 && written < 64 << 20, "{stats}");
    assert_eq!(vm.exec("status", json!({}))["state"], "paused", "snapshot keeps a paused VM paused");
    let last = vm.last_heartbeat().unwrap();
    vm.exec("quit", json!({}));
    assert!(vm.wait_exit(Duration::from_secs(5)).unwrap().success());
    assert!(!vm.api.exists(), "quit removes the API socket");

    // Zero pages are holes in the memory image.
    let img = std::fs::metadata(snap.join("memory.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(img.blocks() * 512 < img.len() / 2, "memory image is not sparse");

    let restored = VmProcess::spawn(dir.path(), "dst", &["--restore", snap.to_str().unwrap(), "--paused"]);
    let after = restored.exec("memory-digest", json!({}));
    assert_eq!(before, after, "guest memory differs after restore");
    assert_eq!(restored.exec("status", json!({}))["name"], "src");
    restored.exec("resume", json!({}));
    restored.wait_for(&format!("heartbeat {}\n", last + 1), Duration::from_secs(5));
    let hb = heartbeats(&restored.serial_text());
    assert_eq!(hb[0], last + 1, "the counter continues where it stopped: {hb:?}");
}

#[test]
fn snapshot_of_a_running_vm_keeps_it_running() {
    let dir = TempDir::new("snaprun").unwrap();
    let vm = VmProcess::boot(dir.path(), "vm", "64M", "workload=idle");
    vm.wait_for("heartbeat 1\n", BOOT);
    vm.exec("snapshot", json!({"path": dir.path().join("s").to_str().unwrap()}));
    assert_eq!(vm.exec("status", json!({}))["state"], "running");
    let n = vm.last_heartbeat().unwrap();
    vm.wait_for(&format!("heartbeat {}\n", n + 1), Duration::from_secs(5));
}

#[test]
fn bad_api_requests_get_errors_and_the_vm_keeps_running() {
    let dir = TempDir::new("badapi").unwrap();
    let vm = VmProcess::boot(dir.path(), "vm", "64M", "workload=idle");
    vm.wait_for("heartbeat 1\n", BOOT);
    let mut c = vm.client();
    let r = c.raw("{this is not json").unwrap();
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r["error"]["desc"].as_str().unwrap().contains("malformed JSON"), "{r}");
    let r = c.raw(r#"{"execute": "reboot-the-moon"}"#).unwrap();
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert!(r["error"]["desc"].as_str().unwrap().contains("reboot-the-moon"), "{r}");
    let r = c.raw(r#"{"execute": "snapshot"}"#).unwrap();
    assert!(r["error"]["desc"].as_str().unwrap().contains("missing argument \"path\""), "{r}");
    let r = c.raw(r#"{"execute": "snapshot", "arguments": {"path": "/proc/nope/x"}}"#).unwrap();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // Same connection, still answering; guest still running.
    let r = c.raw(r#"{"execute": "status"}"#).unwrap();
    assert_eq!(r["return"]["state"], "running");
    let n = vm.last_heartbeat().unwrap();
    vm.wait_for(&format!("heartbeat {}\n", n + 1), Duration::from_secs(5));
    assert!(!vm.stderr_text().contains("panicked"));
}

fn assert_one_line_error(code: Option<i32>, stderr: &str, needle: &str) {
    assert_eq!(code, Some(1), "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line of error: {stderr:?}");
    assert!(lines[0].starts_with("shrink-vmm: error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn bad_command_lines_fail_with_one_clear_line() {
    let dir = TempDir::new("badcli").unwrap();
    let t = Duration::from_secs(10);
    let (code, err) = run_vmm(&["--kernel", "/nonexistent/vmlinux"], t);
    assert_one_line_error(code, &err, "cannot open kernel /nonexistent/vmlinux");
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "hello").unwrap();
    let (code, err) = run_vmm(&["--kernel", notes.to_str().unwrap()], t);
    assert_one_line_error(code, &err, "not an x86-64 ELF or bzImage kernel");
    let g = guest();
    let (code, err) = run_vmm(&["--kernel", g.to_str().unwrap(), "--mem", "1M"], t);
    assert_one_line_error(code, &err, "--mem 1M: the guest needs at least 32 MiB");
    let (code, err) = run_vmm(&["--kernel", g.to_str().unwrap(), "--mem", "lots"], t);
    assert_one_line_error(code, &err, "--mem: 'lots' is not a size");
    let (code, err) = run_vmm(&["--restore", dir.path().to_str().unwrap()], t);
    assert_one_line_error(code, &err, "state.json");
    let (code, err) = run_vmm(&["--kernel", g.to_str().unwrap(), "--serial", "/proc/nope/serial"], t);
    assert_one_line_error(code, &err, "cannot create serial output /proc/nope/serial");
}

#[test]
fn a_busy_api_socket_is_refused_and_left_alone() {
    let dir = TempDir::new("busy").unwrap();
    let vm = VmProcess::boot(dir.path(), "vm", "64M", "workload=idle");
    let g = guest();
    let (code, err) =
        run_vmm(&["--kernel", g.to_str().unwrap(), "--api", vm.api.to_str().unwrap()], Duration::from_secs(10));
    assert_one_line_error(code, &err, "in use by another process");
    assert_eq!(vm.exec("status", json!({}))["state"], "running");
}

#[test]
fn without_dev_kvm_the_error_says_so() {
    // A private mount namespace whose /dev is empty: the VMM cannot open /dev/kvm.
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs none /dev && exec \"$0\" --kernel \"$1\"", vmm_bin()])
        .arg(guest())
        .output()
        .expect("unshare (util-linux) is needed for this test");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(out.status.code(), &err, "cannot open /dev/kvm");
}

#[test]
fn a_snapshot_taken_on_a_cpu_of_another_vendor_is_refused_by_name() {
    let dir = TempDir::new("vendor").unwrap();
    let vm = VmProcess::boot(dir.path(), "vm", "64M", "workload=idle");
    vm.wait_for("heartbeat 1\n", BOOT);
    let snap = dir.path().join("s");
    vm.exec("snapshot", json!({"path": snap.to_str().unwrap()}));
    // Rewrite CPUID leaf 0 of the saved vCPU as the other vendor's. Entries are saved as the
    // bytes of `kvm_cpuid_entry2`: function at 0, then index, flags, eax, ebx at 16, ecx at 20,
    // edx at 24.
    let path = snap.join("state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let leaf0 = state["vcpus"][0]["cpuid"]
        .as_array_mut()
        .and_then(|l| {
            l.iter_mut().find(|e| e.as_array().is_some_and(|b| b.len() == 40 && b[..4].iter().all(|x| x == 0)))
        })
        .expect("CPUID leaf 0 in the saved vCPU");
    let at =
        |b: &serde_json::Value, o: usize| -> Vec<u8> { (o..o + 4).map(|i| b[i].as_u64().unwrap() as u8).collect() };
    let host = String::from_utf8([at(leaf0, 16), at(leaf0, 24), at(leaf0, 20)].concat()).unwrap();
    let other = if host == "AuthenticAMD" { "GenuineIntel" } else { "AuthenticAMD" };
    for (offset, part) in [16, 24, 20].into_iter().zip(other.as_bytes().chunks(4)) {
        for (i, byte) in part.iter().enumerate() {
            leaf0[offset + i] = json!(byte);
        }
    }
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let (code, err) = run_vmm(&["--restore", snap.to_str().unwrap(), "--paused"], Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("saved on a {other} CPU")) && err.contains(&host), "{err}");
}
