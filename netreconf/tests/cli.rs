//! `vnetd --check`: a bad configuration is one clear line naming the field (no root needed).

use std::process::Command;

fn check(text: &str, name: &str) -> (bool, String) {
    let p = std::env::temp_dir().join(format!("vn{}cli-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vnetd"))
        .arg("--check")
        .arg(&p)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&p);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn example_configs_are_valid() {
    for (f, t) in [
        ("a.toml", include_str!("../examples/site-a.toml")),
        ("b.toml", include_str!("../examples/site-b.toml")),
    ] {
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
