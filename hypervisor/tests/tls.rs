//! The migration stream is TLS with mutual authentication on the cluster key: real guests,
//! real VMMs, and what actually crosses the socket.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use shrink_testutil::ports::free_port;

const BOOT: Duration = Duration::from_secs(20);

/// A key file of another cluster, in `dir`.
fn other_key(dir: &std::path::Path) -> String {
    let p = dir.join("other.key");
    indexd::tls::ClusterKey::generate().unwrap().write_new(&p).unwrap();
    p.display().to_string()
}

/// Forwards one connection from `listen` to `to`, keeping every byte the source sent.
fn recording_relay(listen: TcpListener, to: String) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let t = std::thread::spawn(move || {
        let (mut from_src, _) = listen.accept().unwrap();
        let mut to_dst = TcpStream::connect(&to).unwrap();
        let (mut back_src, mut back_dst) = (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        let answers = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
            let _ = back_src.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    s2.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to_dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
        let _ = answers.join();
    });
    (seen, t)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Migrates a guest through a relay that records the source's bytes; returns them.
fn migrate_through_relay(flags: &[&str]) -> Vec<u8> {
    let dir = TempDir::new("tls-relay").unwrap();
    let dst_port = free_port();
    let dst_uri = format!("tcp:127.0.0.1:{dst_port}");
    let mut args = vec!["--incoming", dst_uri.as_str()];
    args.extend_from_slice(flags);
    let mut dst = VmProcess::spawn(dir.path(), "dst", &args);
    let g = guest();
    let mut boot =
        vec!["--kernel", g.to_str().unwrap(), "--mem", "128M", "--cmdline", "workload=idle", "--name", "src"];
    boot.extend_from_slice(flags);
    let mut src = VmProcess::spawn(dir.path(), "src", &boot);
    src.wait_for("heartbeat 1\n", BOOT);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_uri = format!("tcp:127.0.0.1:{}", relay.local_addr().unwrap().port());
    let (seen, t) = recording_relay(relay, format!("127.0.0.1:{dst_port}"));
    src.exec("migrate", json!({"uri": relay_uri}));
    let info = wait_migration(&src, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    let _ = src.wait_exit(Duration::from_secs(5));
    dst.wait_for("heartbeat", Duration::from_secs(10));
    dst.exec("quit", json!({}));
    let _ = dst.wait_exit(Duration::from_secs(5));
    t.join().unwrap();
    let bytes = seen.lock().unwrap().clone();
    bytes
}

#[test]
fn over_tls_nothing_of_the_stream_crosses_the_wire_in_clear_and_plain_tcp_only_on_request() {
    // What the guest prints on its console is in its memory, which the stream carries.
    let needle: &[u8] = b"shrink-guest ready";
    let tls = migrate_through_relay(&[]);
    assert!(tls.len() > 256 << 10, "the guest's memory went through the relay: {} bytes", tls.len());
    assert!(!contains(&tls, b"SHRK"), "a stream record header in clear over TLS");
    assert!(!contains(&tls, needle), "guest memory in clear over TLS");
    // The same move with --plain-tcp on both: the records and the memory are readable, which
    // is what the check above would have seen without TLS.
    let plain = migrate_through_relay(&["--plain-tcp"]);
    assert!(contains(&plain, b"SHRK") && contains(&plain, needle), "the plain stream is readable");
}

#[test]
fn a_listener_that_is_not_a_destination_gets_only_a_handshake_and_the_guest_runs_on() {
    let dir = TempDir::new("tls-stranger").unwrap();
    let src = VmProcess::boot(dir.path(), "src", "128M", "workload=idle");
    src.wait_for("heartbeat 1\n", BOOT);
    assert_eq!(src.exec("status", json!({}))["transport"], "tls");
    // A server that is not a shrink destination (a redis-server would do the same): it reads
    // what comes, and answers something that is not TLS.
    let stranger = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", stranger.local_addr().unwrap().port());
    let t = std::thread::spawn(move || {
        let (mut s, _) = stranger.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            let _ = s.write_all(b"-ERR unknown command\r\n");
        }
        got
    });
    src.exec("migrate", json!({"uri": uri}));
    let info = wait_migration(&src, Duration::from_secs(30));
    let got = t.join().unwrap();
    assert_eq!(info["status"], "failed", "{info}");
    let e = info["error-desc"].as_str().unwrap_or_default();
    assert!(e.contains("TLS handshake with 127.0.0.1") && e.contains("does not speak TLS"), "{info}");
    assert!(got.len() < 2048 && got.first() == Some(&0x16), "only a TLS ClientHello went: {} bytes", got.len());
    assert!(!contains(&got, b"SHRK"));
    // The guest never stopped.
    let before = src.last_heartbeat().unwrap();
    src.wait_for(&format!("heartbeat {}\n", before + 1), Duration::from_secs(5));
    assert_eq!(src.exec("status", json!({}))["state"], "running");
    src.exec("quit", json!({}));
}

#[test]
fn a_destination_of_another_cluster_is_refused_and_keeps_waiting_for_its_own_source() {
    let dir = TempDir::new("tls-other").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let key = other_key(dir.path());
    let dst = VmProcess::spawn(dir.path(), "dst", &["--incoming", &uri, "--cluster-key", &key]);
    let src = VmProcess::boot(dir.path(), "src", "128M", "workload=idle");
    src.wait_for("heartbeat 1\n", BOOT);
    let (a, b) = (src.exec("status", json!({})), dst.exec("status", json!({})));
    assert_ne!(a["cluster_key"], serde_json::Value::Null);
    src.exec("migrate", json!({"uri": uri}));
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    let e = info["error-desc"].as_str().unwrap_or_default();
    assert!(e.contains("another cluster key"), "{info}");
    // The destination is not taken by a source it cannot trust: it still waits.
    assert_eq!(dst.exec("status", json!({}))["state"], "inmigrate", "{b}");
    let log = std::fs::read_to_string(&dst.stderr).unwrap_or_default();
    assert!(log.contains("incoming connection refused") && log.contains("TLS handshake"), "{log}");
    // And the guest runs on at the source.
    assert_eq!(src.exec("status", json!({}))["state"], "running");
    src.exec("quit", json!({}));
    dst.exec("quit", json!({}));
}

#[test]
fn without_a_cluster_key_or_plain_tcp_a_vmm_does_not_migrate_and_says_how_to() {
    let dir = TempDir::new("tls-none").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let (code, err) = run_vmm(&["--incoming", &uri], Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("migrating needs --cluster-key FILE") && err.contains("--plain-tcp"), "{err}");
    // A VMM booted without either runs its guest, and refuses to migrate it, saying why.
    let g = guest();
    let vm = VmProcess::spawn_exact(
        dir.path(),
        "vm",
        &["--kernel", g.to_str().unwrap(), "--mem", "64M", "--cmdline", "workload=idle"],
    );
    vm.wait_for("heartbeat 1\n", BOOT);
    assert_eq!(vm.exec("status", json!({}))["transport"], serde_json::Value::Null);
    let r = vm.client().execute("migrate", json!({"uri": uri})).unwrap();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("migrating needs --cluster-key FILE"), "{e}");
    assert_eq!(vm.exec("status", json!({}))["state"], "running");
    vm.exec("quit", json!({}));
    // A file that is no key stops the VMM at once, naming it.
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, err) = run_vmm(&["--incoming", &uri, "--cluster-key", bad.to_str().unwrap()], Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("cluster key {}: expected 64 hexadecimal digits", bad.display())), "{err}");
    // A key readable by others is refused, naming the fix.
    let loose = dir.path().join("loose.key");
    std::fs::write(&loose, "00".repeat(32)).unwrap();
    let (code, err) = run_vmm(&["--incoming", &uri, "--cluster-key", loose.to_str().unwrap()], Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("readable by group or others") && err.contains("chmod 600"), "{err}");
}
