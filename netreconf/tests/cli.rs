//! `vnetd --check`: a bad configuration is one clear line naming the field (no root needed).

use std::process::Command;

fn check(text: &str, name: &str) -> (bool, String) {
    let p = std::env::temp_dir().join(format!("vn{}cli-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vnetd")).arg("--check").arg(&p).output().unwrap();
    let _ = std::fs::remove_file(&p);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn example_configs_are_valid() {
    for (f, t) in
        [("a.toml", include_str!("../examples/site-a.toml")), ("b.toml", include_str!("../examples/site-b.toml"))]
    {
        let (ok, err) = check(t, f);
        assert!(ok, "{f}: {err}");
    }
}

#[test]
fn bad_config_names_the_field_in_one_line() {
    let ex = include_str!("../examples/site-a.toml");
    for (bad, field) in [
        (ex.replace("02:00:0a:01:00:fe", "02:00:0a"), "router_mac"),
        (ex.replace("10.1.0.254", "10.1.0.256"), "router_ip"),
        (ex.replace("router = \"B\"", "router = \"C\""), "gndt[1].router"),
        (ex.replace("shrink-demo-key-change-me-0123456789", "short"), "key"),
        (ex.replace("lan_interface = \"lan0\"", ""), "lan_interface"),
        // Values of the wrong type: the field, not just the line.
        (ex.replace("announce_count = 3 ", "announce_count = \"3\" "), "timers.announce_count"),
        (ex.replace("address = \"192.168.100.2:7800\"", "address = 7800"), "peers[0].address"),
        // Conflicting tables.
        (ex.replace("network = \"10.1.1.0/24\"", "network = \"10.1.0.0/24\""), "gndt[1].network"),
        (ex.replace("lndt = [\"10.1.0.0/24\"]", "lndt = [\"10.1.1.0/24\"]"), "lndt[0]"),
    ] {
        let (ok, err) = check(&bad, &format!("bad-{field}.toml"));
        assert!(!ok);
        assert!(err.contains(field), "{field}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// A UDP relay between `vnet-probe probe` and `vnet-probe udp-echo` on loopback: it
/// forwards the probes to the echo and the answers back, and counts the answers it
/// delivered, so the test can wait for answers instead of for time.
struct Relay {
    addr: std::net::SocketAddr,
    answers: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(echo: std::net::SocketAddr) -> Relay {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        use std::time::Duration;

        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let client: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let client2 = client.clone();
        let answers = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (answers2, stop1, stop2) = (answers.clone(), stop.clone(), stop.clone());
        let mut buf = [0u8; 2048];
        let to_echo = std::thread::spawn(move || {
            while !stop1.load(Ordering::SeqCst) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    *client.lock().unwrap() = Some(from);
                    let _ = back.send_to(&buf[..n], echo);
                }
            }
        });
        let mut buf2 = [0u8; 2048];
        let to_probe = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((n, from)) = back2.recv_from(&mut buf2) {
                    let to = *client2.lock().unwrap();
                    if let (true, Some(to)) = (from == echo, to) {
                        if front2.send_to(&buf2[..n], to).is_ok() {
                            answers2.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
        Relay { addr, answers, stop, threads: vec![to_echo, to_probe] }
    }

    fn answers(&self) -> u64 {
        self.answers.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Answers the probe must have received before it is stopped.
const ANSWERS: u64 = 50;

/// `vnet-probe probe` against a loopback `udp-echo` (through a counting relay) and a dead
/// port: the echo loses nothing and answers in the tail; the dead target is all warm-up
/// (no root needed). The probe is stopped once the echo has answered `ANSWERS` probes.
#[test]
fn probe_counts_loss_from_first_answer() {
    use shrink_testutil::util::wait_for;
    use std::net::UdpSocket;

    let free_port = || UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (echo_port, dead_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("vn{}cli-probe", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (echo_stop, probe_stop, out) = (dir.join("echo-stop"), dir.join("probe-stop"), dir.join("report.json"));
    let bin = env!("CARGO_BIN_EXE_vnet-probe");
    let echo_addr: std::net::SocketAddr = format!("127.0.0.1:{echo_port}").parse().unwrap();
    let mut echo = Command::new(bin)
        .args(["udp-echo", "--bind", &echo_addr.to_string()])
        .arg("--stop-file")
        .arg(&echo_stop)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let relay = Relay::start(echo_addr);
    let mut probe = Command::new(bin)
        .args(["probe", "--interval-ms", "10", "--bind", "127.0.0.1:0"])
        .args(["--target", &format!("echo={}", relay.addr)])
        .args(["--target", &format!("dead=127.0.0.1:{dead_port}")])
        .arg("--stop-file")
        .arg(&probe_stop)
        .arg("--out")
        .arg(&out)
        .spawn()
        .unwrap();
    let answered = wait_for(&format!("the echo to answer {ANSWERS} probes"), 30, || {
        let n = relay.answers();
        (n >= ANSWERS).then_some(n)
    })
    .unwrap_or_else(|e| {
        let _ = probe.kill();
        let _ = echo.kill();
        panic!("{e}: {} answers delivered to the probe", relay.answers())
    });
    std::fs::write(&probe_stop, b"").unwrap();
    let status = wait_for("the probe to stop after its stop file appeared", 20, || probe.try_wait().unwrap())
        .unwrap_or_else(|e| {
            let _ = probe.kill();
            let _ = echo.kill();
            panic!("{e}")
        });
    std::fs::write(&echo_stop, b"").unwrap();
    wait_for("udp-echo to stop after its stop file appeared", 20, || echo.try_wait().unwrap()).unwrap_or_else(|e| {
        let _ = echo.kill();
        panic!("{e}")
    });
    drop(relay);
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["interval_ms"], 10, "{r}");
    let (e, d) = (&r["targets"][0], &r["targets"][1]);
    assert_eq!(e["name"], "echo", "{r}");
    assert_eq!(e["answered"], true, "{r}");
    assert_eq!(e["lost"], 0, "{r}");
    // Every answer delivered before the stop was counted.
    assert!(e["received"].as_u64().unwrap() >= answered, "{answered} answers delivered before the stop: {r}");
    assert_eq!(e["sent"], e["received"], "{r}");
    assert!(e["tail_sent"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(e["tail_received"], e["tail_sent"], "{r}");
    assert!(e["rtt_max_us"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(d["name"], "dead", "{r}");
    assert_eq!(d["answered"], false, "{r}");
    assert_eq!(d["sent"], 0, "{r}");
    assert_eq!(d["lost"], 0, "{r}");
    assert!(d["warmup"].as_u64().unwrap() > 0, "{r}");
}
