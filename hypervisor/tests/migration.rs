//! Live migration between two shrink-vmm processes: real guests, real sockets, real faults.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use shrink_testutil::netns::{self, Netns};
use shrink_testutil::util::wait_until;

const BOOT: Duration = Duration::from_secs(20);

use shrink_testutil::ports::free_port;

fn incoming(dir: &std::path::Path, tag: &str, uri: &str) -> VmProcess {
    VmProcess::spawn(dir, tag, &["--incoming", uri])
}

#[test]
fn a_busy_guest_migrates_over_loopback_exactly() {
    let dir = TempDir::new("mig-loop").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = incoming(dir.path(), "dst", &uri);
    let mut src = VmProcess::boot(dir.path(), "src", "256M", "workload=mem mem=32M rate=4M");
    src.wait_for("heartbeat 2\n", BOOT);
    src.exec("migrate", json!({"uri": uri, "verify": true}));
    let info = wait_migration(&src, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    let src_digest = info["memory-sha256"].as_str().unwrap().to_owned();
    assert!(info["downtime"].as_u64().is_some() && info["ram"]["transferred"].as_u64().unwrap() > 4 << 20, "{info}");
    assert!(info["ram"]["duplicate"].as_u64().unwrap() > 40_000, "zero pages sent as uniform: {info}");
    // The source process is gone.
    assert!(src.wait_exit(Duration::from_secs(5)).expect("source still running").success());
    let last = src.last_heartbeat().unwrap();
    // The destination installed exactly the paused source's memory, and the guest goes on.
    let incoming = dst.exec("query-migrate", json!({}));
    assert_eq!(incoming["incoming"]["memory_sha256"].as_str(), Some(src_digest.as_str()), "{incoming}");
    dst.wait_for(&format!("heartbeat {}\n", last + 1), Duration::from_secs(5));
    let hb = heartbeats(&dst.serial_text());
    assert_eq!(hb[0], last + 1, "the heartbeat continues without restarting: {hb:?}");
    assert_eq!(dst.exec("status", json!({}))["state"], "running");
    dst.exec("quit", json!({}));
    assert!(dst.wait_exit(Duration::from_secs(5)).unwrap().success());
}

#[test]
fn migration_over_a_100_mbit_link_between_namespaces() {
    netns::available().unwrap();
    let t = netns::unique_tag();
    let (a, b) = (Netns::new(&format!("mga{t}")).unwrap(), Netns::new(&format!("mgb{t}")).unwrap());
    netns::link(&a, "10.99.0.1/24", &b, "10.99.0.2/24", Some("100mbit")).unwrap();
    let dir = TempDir::new("mig-tbf").unwrap();
    let uri = "tcp:10.99.0.2:7000";
    let dst = VmProcess::spawn_in(Some(b.name()), dir.path(), "dst", &["--incoming", uri], &[]);
    let g = guest();
    let src = VmProcess::spawn_in(
        Some(a.name()),
        dir.path(),
        "src",
        &["--kernel", g.to_str().unwrap(), "--mem", "256M", "--cmdline", "workload=mem mem=24M rate=12M"],
        &[],
    );
    // Let the working set fill with random data: about 24 MB to carry.
    src.wait_for("heartbeat 3\n", BOOT);
    src.exec("migrate", json!({"uri": uri}));
    let info = wait_migration(&src, Duration::from_secs(120));
    assert_eq!(info["status"], "completed", "{info}");
    let bytes = info["ram"]["transferred"].as_u64().unwrap();
    assert!(bytes > 20_000_000, "the working set crossed: {info}");
    // The stream went through the token bucket on A's end of the link, set to 100 Mbit/s: it
    // passed at least the bytes the migration counted (the rate itself is measured by `make
    // bench`'s precopy bench).
    let qdiscs = a.exec(&["tc", "-s", "qdisc", "show"]).unwrap();
    let (mut shaped, mut in_tbf, mut tbf_rates) = (0u64, false, Vec::new());
    for l in qdiscs.lines() {
        if l.starts_with("qdisc ") {
            in_tbf = l.starts_with("qdisc tbf");
            if in_tbf {
                let mut words = l.split_whitespace().skip_while(|w| *w != "rate");
                tbf_rates.extend(words.nth(1).map(str::to_owned));
            }
        } else if let (true, Some(sent)) = (in_tbf, l.trim().strip_prefix("Sent ")) {
            shaped += sent.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    assert_eq!(tbf_rates, ["100Mbit"], "one tbf on A's link, at 100 Mbit/s:\n{qdiscs}");
    assert!(shaped >= bytes, "the tbf passed {shaped} bytes for {bytes} transferred:\n{qdiscs}");
    assert_eq!(dst.exec("status", json!({}))["state"], "running");
}

fn source_keeps_running(src: &VmProcess) {
    let n = src.last_heartbeat().unwrap();
    src.wait_for(&format!("heartbeat {}\n", n + 2), Duration::from_secs(6));
    assert_eq!(src.exec("status", json!({}))["state"], "running");
}

/// A busy source guest (16 MB dirtied at 8 MB/s) migrating to a fresh destination on
/// loopback, `migrate` called with `args` (besides the URI): (destination, source).
fn busy_source_migrating(dir: &TempDir, args: Value) -> (VmProcess, VmProcess) {
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = incoming(dir.path(), "dst", &uri);
    let src = VmProcess::boot(dir.path(), "src", "128M", "workload=mem mem=16M rate=8M");
    src.wait_for("heartbeat 2\n", BOOT);
    let mut args = args;
    args["uri"] = json!(uri);
    src.exec("migrate", args);
    (dst, src)
}

/// Waits until the source has sent its first bytes.
fn first_bytes_sent(src: &VmProcess) {
    wait_until("the first bytes on the stream", Duration::from_secs(30), || {
        (src.exec("query-migrate", json!({}))["ram"]["transferred"].as_u64().unwrap_or(0) > 0).then_some(())
    });
}

#[test]
fn killing_the_destination_during_the_dirty_passes_leaves_the_guest_at_the_source() {
    let dir = TempDir::new("mig-kill1").unwrap();
    // 2 MB/s: the passes take several seconds.
    let (mut dst, src) = busy_source_migrating(&dir, json!({"max_bandwidth": 2_000_000}));
    // The first full pass is over and a dirty pass has begun.
    let during = wait_until("a dirty pass", Duration::from_secs(60), || {
        let q = src.exec("query-migrate", json!({}));
        (q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2).then_some(q)
    });
    assert_eq!(during["status"], "active", "{during}");
    dst.child.kill().unwrap();
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().unwrap().len() > 5, "{info}");
    source_keeps_running(&src);
}

/// A destination that holds its verdict back for `stall_ms` once everything has arrived (a test
/// hook), and a running source dirtying 1 MB/s; returns the URI, the destination, the source.
fn stalling_destination_and_busy_source(dir: &TempDir, stall_ms: u64) -> (String, VmProcess, VmProcess) {
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let stall = stall_ms.to_string();
    let dst = VmProcess::spawn_in(
        None,
        dir.path(),
        "dst",
        &["--incoming", &uri],
        &[("SHRINK_TEST_STALL_BEFORE_VERDICT_MS", &stall)],
    );
    let src = VmProcess::boot(dir.path(), "src", "128M", "workload=mem mem=8M rate=1M");
    src.wait_for("heartbeat 2\n", BOOT);
    (uri, dst, src)
}

#[test]
fn killing_the_destination_during_the_final_pass_leaves_the_guest_at_the_source() {
    let dir = TempDir::new("mig-kill2").unwrap();
    let (uri, mut dst, src) = stalling_destination_and_busy_source(&dir, 20_000);
    src.exec("migrate", json!({"uri": uri}));
    // The source pauses the guest for the final pass and waits for the verdict.
    wait_until("the source pausing for the final pass", Duration::from_secs(20), || {
        (src.exec("status", json!({}))["state"] == "paused").then_some(())
    });
    dst.child.kill().unwrap();
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    source_keeps_running(&src);
}

#[test]
fn cancel_mid_way_keeps_the_guest_at_the_source() {
    let dir = TempDir::new("mig-cancel").unwrap();
    let (mut dst, src) = busy_source_migrating(&dir, json!({"max_bandwidth": 1_000_000}));
    first_bytes_sent(&src);
    src.exec("migrate_cancel", json!({}));
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "cancelled", "{info}");
    source_keeps_running(&src);
    // The destination saw a broken stream and gave up: no half-started guest.
    let status = dst.wait_exit(Duration::from_secs(10)).expect("destination still running");
    assert!(!status.success());
    assert!(dst.stderr_text().contains("incoming migration"), "{}", dst.stderr_text());
}

#[test]
fn garbage_and_truncated_streams_are_refused_by_the_destination() {
    let dir = TempDir::new("mig-garbage").unwrap();
    // Over TLS garbage fails the handshake, and the destination waits on for its source.
    let port = free_port();
    let tls = incoming(dir.path(), "dst0", &format!("tcp:127.0.0.1:{port}"));
    let mut s = connect_retry(port);
    s.write_all(b"GET / HTTP/1.1\r\nHost: shrink\r\n\r\n").unwrap();
    drop(s);
    wait_until("the refusal", Duration::from_secs(10), || {
        tls.stderr_text().contains("incoming connection refused").then_some(())
    });
    assert_eq!(tls.exec("status", json!({}))["state"], "inmigrate");
    tls.exec("quit", json!({}));
    // In clear text (--plain-tcp) the stream's decoder is what refuses. Garbage.
    let plain =
        |dir: &std::path::Path, tag: &str, uri: &str| VmProcess::spawn(dir, tag, &["--incoming", uri, "--plain-tcp"]);
    let port = free_port();
    let mut dst = plain(dir.path(), "dst1", &format!("tcp:127.0.0.1:{port}"));
    let mut s = connect_retry(port);
    s.write_all(b"GET / HTTP/1.1\r\nHost: shrink\r\n\r\n").unwrap();
    drop(s);
    let status = dst.wait_exit(Duration::from_secs(10)).expect("destination still running");
    assert_eq!(status.code(), Some(1));
    let err = dst.stderr_text();
    assert!(err.contains("bad record magic") && err.lines().count() == 1, "{err}");
    // A valid start, then the stream stops.
    let port = free_port();
    let mut dst = plain(dir.path(), "dst2", &format!("tcp:127.0.0.1:{port}"));
    let mut s = connect_retry(port);
    use migrate::protocol::*;
    let mut buf = Vec::new();
    write_hello(
        &mut buf,
        &Hello { version: VERSION, chunk_size: 4096, digest: DigestKind::None, mem_size: 64 << 20, name: "x".into() },
    )
    .unwrap();
    write_layout(&mut buf, &[Region { gpa: 0, len: 64 << 20 }]).unwrap();
    buf.extend_from_slice(&buf.clone()[..10]);
    s.write_all(&buf).unwrap();
    drop(s);
    let status = dst.wait_exit(Duration::from_secs(10)).expect("destination still running");
    assert_eq!(status.code(), Some(1));
    assert!(dst.stderr_text().contains("truncated"), "{}", dst.stderr_text());
}

fn connect_retry(port: u16) -> std::net::TcpStream {
    let start = Instant::now();
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if start.elapsed() > Duration::from_secs(5) => panic!("connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn auto_converge_makes_a_fast_dirtying_guest_converge() {
    let dir = TempDir::new("mig-converge").unwrap();
    // A 64 Mbit/s link (rate cap) against a guest dirtying 32 MB/s of a 4 MB working set:
    // 300 ms of downtime allows 2.4 MB, the working set is 4 MB.
    let run = |auto: bool, tag: &str| -> Value {
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let _dst = incoming(dir.path(), &format!("{tag}-dst"), &uri);
        let src = VmProcess::boot(dir.path(), &format!("{tag}-src"), "64M", "workload=mem mem=4M rate=32M");
        src.wait_for("heartbeat 1\n", BOOT);
        let iterations = if auto { 40 } else { 10 };
        src.exec(
            "migrate",
            json!({"uri": uri, "max_bandwidth": 8_000_000, "max_iterations": iterations, "auto_converge": auto}),
        );
        let info = wait_migration(&src, Duration::from_secs(120));
        if info["status"] != "completed" {
            source_keeps_running(&src);
        }
        info
    };
    let without = run(false, "plain");
    assert_eq!(without["status"], "failed", "{without}");
    assert!(without["error-desc"].as_str().unwrap().contains("did not converge"), "{without}");
    let with = run(true, "auto");
    assert_eq!(with["status"], "completed", "{with}");
    assert!(with["ram"]["dirty-sync-count"].as_u64().unwrap() > 2, "{with}");
}

#[test]
fn a_guest_on_a_bridge_keeps_answering_and_announces_itself_after_migrating() {
    netns::available().unwrap();
    let ns = Netns::new(&format!("mgr{}", netns::unique_tag())).unwrap();
    netns::bridge(&ns, "br0").unwrap();
    ns.exec(&["ip", "addr", "add", "10.1.0.1/16", "dev", "br0"]).unwrap();
    let dir = TempDir::new("mig-rarp").unwrap();
    let mac = "52:54:00:00:07:02";
    let g = guest();
    // Both VMMs on the same bridge, each with its own tap.
    let src = VmProcess::spawn_in(
        Some(ns.name()),
        dir.path(),
        "src",
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--mem",
            "128M",
            "--cmdline",
            "ip=10.1.0.2/16",
            "--net",
            &format!("tap=tsrc,mac={mac},bridge=br0"),
        ],
        &[],
    );
    src.wait_for("shrink-guest ready", BOOT);
    let uri = "tcp:127.0.0.1:7400";
    let dst = VmProcess::spawn_in(
        Some(ns.name()),
        dir.path(),
        "dst",
        &["--incoming", uri, "--net", &format!("tap=tdst,mac={mac},bridge=br0")],
        &[],
    );
    // `Netns::udp_rtt` runs the workspace's vnet-probe (and says how to build it if missing).
    let rtt = |count: u32| -> Value { ns.udp_rtt("10.1.0.2:7", count, 1000).unwrap() };
    assert_eq!(rtt(50)["received"], 50, "echo before");
    // Capture RARP on the bridge during the migration.
    let pcap = dir.path().join("rarp.pcap");
    let dump_log = dir.path().join("tcpdump.log");
    let mut dump = ns
        .command("tcpdump")
        .args(["-i", "br0", "-w", pcap.to_str().unwrap(), "-U", "ether proto 0x8035"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&dump_log).unwrap())
        .spawn()
        .expect("tcpdump (make deps)");
    wait_until("tcpdump listening on br0", Duration::from_secs(20), || {
        std::fs::read_to_string(&dump_log).unwrap_or_default().contains("listening on").then_some(())
    });
    src.exec("migrate", json!({"uri": uri}));
    let info = wait_migration(&src, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    let rarps = || -> Vec<(f64, String)> {
        let out = Command::new("tcpdump").args(["-r", pcap.to_str().unwrap(), "-e", "-n", "-tt"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(mac) && l.contains("Reverse Request"))
            .filter_map(|l| Some((l.split_whitespace().next()?.parse().ok()?, l.to_owned())))
            .collect()
    };
    // The guest answers at its new place once the first announcement has told the bridge.
    wait_until("the first RARP announcement", Duration::from_secs(10), || (!rarps().is_empty()).then_some(()));
    let after = rtt(100);
    assert_eq!(after["received"], 100, "echo after: {after}");
    wait_until("QEMU's five RARP rounds", Duration::from_secs(10), || (rarps().len() >= 5).then_some(()));
    let _ = Command::new("kill").arg("-INT").arg(dump.id().to_string()).status();
    let _ = dump.wait();
    let frames = rarps();
    assert_eq!(frames.len(), 5, "exactly five rounds: {frames:#?}");
    assert!(frames.iter().all(|(_, l)| l.contains("ff:ff:ff:ff:ff:ff") && l.contains("length 60")), "{frames:#?}");
    // QEMU's schedule (`QEMU_ANNOUNCE_MS`), from the capture timestamps: rounds at 0, 50, 200,
    // 450 and 800 ms, each
    // due a step after the previous one. A late round (a busy host) is tolerated, an early one
    // is not.
    let gaps = netreconf::frames::QEMU_ANNOUNCE_GAPS_MS[1..].iter().map(|&g| g as f64);
    for (w, gap_ms) in frames.windows(2).zip(gaps) {
        let at_ms = (w[1].0 - w[0].0) * 1e3;
        assert!(
            at_ms >= gap_ms - 5.0,
            "a round due {gap_ms} ms after the previous went after {at_ms:.1} ms: {}",
            w[1].1
        );
    }
    drop(dst);
}

/// The source gives up on a destination that keeps the connection open but answers nothing
/// (here: it holds its verdict back for 8 s), and the guest runs at the source again. When the
/// destination comes back, it finds no `Commit` and never starts its copy: the guest runs once.
#[test]
fn a_destination_that_withholds_its_verdict_is_given_up_and_never_starts_the_guest() {
    let dir = TempDir::new("mig-verdict").unwrap();
    let (uri, mut dst, src) = stalling_destination_and_busy_source(&dir, 8_000);
    src.exec("migrate", json!({"uri": uri, "verdict_timeout_ms": 2000}));
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().unwrap().contains("stopped answering"), "{info}");
    source_keeps_running(&src);
    // The destination wakes up to a closed connection (its verdict cannot be sent, or no
    // `Commit` follows it) and exits without starting the guest.
    let status = dst.wait_exit(Duration::from_secs(60)).expect("the destination still runs");
    assert!(!status.success());
    let err = dst.stderr_text();
    assert!(err.contains("incoming migration"), "{err}");
    assert!(!dst.serial_text().contains("heartbeat"), "the destination ran the guest: {}", dst.serial_text());
    source_keeps_running(&src);
}

/// The same for a destination that stops reading the stream during the dirty passes (its
/// process is stopped): the source's writes time out.
#[test]
fn a_destination_that_stops_reading_is_given_up_after_the_verdict_timeout() {
    let dir = TempDir::new("mig-stop").unwrap();
    let (mut dst, src) = busy_source_migrating(&dir, json!({"max_bandwidth": 4_000_000, "verdict_timeout_ms": 2000}));
    wait_until("a dirty pass", Duration::from_secs(60), || {
        (src.exec("query-migrate", json!({}))["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    let pid = dst.child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let info = wait_migration(&src, Duration::from_secs(60));
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().unwrap().contains("stopped answering"), "{info}");
    source_keeps_running(&src);
    let _ = dst.child.kill();
}

/// A VMM awaiting its incoming migration answers its API (no VM yet) and ends on SIGTERM, on
/// SIGINT and on `quit`, saying why.
#[test]
fn a_waiting_destination_answers_its_api_and_obeys_sigterm_sigint_and_quit() {
    let dir = TempDir::new("mig-wait").unwrap();
    for how in ["SIGTERM", "SIGINT", "quit"] {
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let mut dst = incoming(dir.path(), &format!("w{how}"), &uri);
        assert_eq!(dst.exec("status", json!({}))["state"], "inmigrate");
        assert_eq!(dst.exec("query-migrate", json!({}))["status"], "setup");
        let refused = dst.client().execute("pause", json!({})).expect("API I/O");
        assert!(refused.is_err_and(|e| e.desc.contains("no VM yet")), "pause before there is a VM");
        match how {
            "quit" => {
                dst.exec("quit", json!({}));
            }
            sig => {
                let signal = if sig == "SIGTERM" { libc::SIGTERM } else { libc::SIGINT };
                // SAFETY: kill(2) on our own child's pid.
                assert_eq!(unsafe { libc::kill(dst.child.id() as i32, signal) }, 0);
            }
        }
        let status = dst.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| panic!("{how} ignored while waiting"));
        assert!(!status.success(), "{how}: a wait that ends without a VM is a failure");
        assert!(
            dst.stderr_text().contains("terminated while waiting for the incoming migration"),
            "{how}: {}",
            dst.stderr_text()
        );
    }
}

/// `quit` sent to a destination while it receives cancels the migration there, as SIGTERM
/// does: the destination exits without starting the guest, the source keeps it. (Held until
/// the end, it would have stopped the guest's only copy once it ran at the destination.)
#[test]
fn quit_sent_to_a_receiving_destination_cancels_it_and_the_source_keeps_its_guest() {
    let dir = TempDir::new("mig-quit").unwrap();
    let (mut dst, src) = busy_source_migrating(&dir, json!({"max_bandwidth": 1_000_000}));
    first_bytes_sent(&src);
    dst.exec("quit", json!({}));
    let status = dst.wait_exit(Duration::from_secs(10)).expect("quit ignored while receiving");
    assert!(!status.success());
    assert!(!dst.serial_text().contains("heartbeat"), "the destination ran the guest: {}", dst.serial_text());
    let info = wait_migration(&src, Duration::from_secs(60));
    assert_eq!(info["status"], "failed", "{info}");
    source_keeps_running(&src);
}

#[test]
fn a_paused_guest_stays_paused_when_it_moves_and_when_its_move_fails() {
    // It moves: paused at the destination, until its user resumes it.
    let dir = TempDir::new("mig-paused").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = incoming(dir.path(), "dst", &uri);
    let mut src = VmProcess::boot(dir.path(), "src", "128M", "workload=mem mem=8M rate=1M");
    src.wait_for("heartbeat 2\n", BOOT);
    src.exec("pause", json!({}));
    let last = src.last_heartbeat().unwrap();
    src.exec("migrate", json!({"uri": uri}));
    let info = wait_migration(&src, Duration::from_secs(60));
    assert!(info["status"] == "completed" || info["status"] == "gone", "{info}");
    let _ = src.wait_exit(Duration::from_secs(5));
    assert_eq!(dst.exec("status", json!({}))["state"], "paused");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(dst.last_heartbeat(), None, "the guest ran at the destination before its user resumed it");
    dst.exec("resume", json!({}));
    dst.wait_for(&format!("heartbeat {}\n", last + 1), Duration::from_secs(5));

    // Its move fails after the source's final pass: it stays paused at the source.
    let dir = TempDir::new("mig-paused-fail").unwrap();
    let (uri, mut dst, src) = stalling_destination_and_busy_source(&dir, 20_000);
    src.exec("pause", json!({}));
    src.exec("migrate", json!({"uri": uri}));
    // A paused 128 MiB guest crosses loopback in about a second; then the destination stalls.
    std::thread::sleep(Duration::from_secs(5));
    dst.child.kill().unwrap();
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(src.exec("status", json!({}))["state"], "paused", "the failed move resumed a paused guest");
}
