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
    ] {
        let (ok, err) = check(&bad, &format!("bad-{field}.toml"));
        assert!(!ok);
        assert!(err.contains(field), "{field}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// `vnet-probe probe` against a loopback `udp-echo` and a dead port: the echo loses
/// nothing and answers in the tail; the dead target is all warm-up (no root needed).
#[test]
fn probe_counts_loss_from_first_answer() {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    let free_port = || UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (echo_port, dead_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("vn{}cli-probe", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (echo_stop, probe_stop, out) = (dir.join("echo-stop"), dir.join("probe-stop"), dir.join("report.json"));
    let bin = env!("CARGO_BIN_EXE_vnet-probe");
    let mut echo = Command::new(bin)
        .args(["udp-echo", "--bind", &format!("127.0.0.1:{echo_port}")])
        .arg("--stop-file")
        .arg(&echo_stop)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut probe = Command::new(bin)
        .args(["probe", "--interval-ms", "10", "--bind", "127.0.0.1:0"])
        .args(["--target", &format!("echo=127.0.0.1:{echo_port}")])
        .args(["--target", &format!("dead=127.0.0.1:{dead_port}")])
        .arg("--stop-file")
        .arg(&probe_stop)
        .arg("--out")
        .arg(&out)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    std::fs::write(&probe_stop, b"").unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = probe.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = probe.kill();
            panic!("probe did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::fs::write(&echo_stop, b"").unwrap();
    let _ = echo.wait();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["interval_ms"], 10, "{r}");
    let (e, d) = (&r["targets"][0], &r["targets"][1]);
    assert_eq!(e["name"], "echo", "{r}");
    assert_eq!(e["answered"], true, "{r}");
    assert_eq!(e["lost"], 0, "{r}");
    assert!(e["received"].as_u64().unwrap() >= 50, "{r}");
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
