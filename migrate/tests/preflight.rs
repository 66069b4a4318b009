//! `shrink-migrate --cluster` checks, before it starts anything, that the sites' Redis
//! services accept its credentials (a real `redis-server` with a password).

use std::process::Command;

use shrink_testutil::fs::TempDir;
use shrink_testutil::redis::RedisServer;

#[test]
fn a_wrong_redis_password_stops_the_run_before_anything_starts_and_is_never_printed() {
    let redis = RedisServer::start().expect("redis-server (make deps)");
    // A password from now on (set once the server answers: its start-up check has none).
    redis.cli(&["CONFIG", "SET", "requirepass", "right-one"]).unwrap();
    let dir = TempDir::new("preflight").unwrap();
    let url = |pass: &str| format!("redis://:{pass}@127.0.0.1:{}", redis.port());
    // The VM's API socket does not exist: the run must stop before it is ever used.
    let vc = |coordination: &str| {
        format!(
            "[[sites]]\nname = \"siteA\"\ncoordination = \"{coordination}\"\nindex = \"{coordination}\"\nlaunch = \"ip netns exec {{host}} {{cmd}}\"\n\n\
             [[sites.hosts]]\nname = \"a1\"\naddress = \"10.0.0.1\"\n\n\
             [[sites]]\nname = \"siteB\"\ncoordination = \"{coordination}\"\nindex = \"{coordination}\"\nlaunch = \"ip netns exec {{host}} {{cmd}}\"\n\n\
             [[sites.hosts]]\nname = \"b1\"\naddress = \"10.0.0.2\"\n\n\
             [[vms]]\nname = \"v\"\nhost = \"a1\"\napi = \"{}\"\n",
            dir.path().join("v.sock").display()
        )
    };
    let file = dir.path().join("vc.toml");
    std::fs::write(&file, vc(&url("not-the-password"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shrink-migrate"))
        .args(["--cluster", file.to_str().unwrap(), "--dest", "siteB", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("sites[0].coordination") && err.contains("refuses the password"), "{err}");
    assert!(!err.contains("not-the-password"), "the password was printed: {err}");
    assert!(!dir.path().join("v-siteB.log").exists(), "a destination VMM was started");
    // The right password passes the check, and the run stops at the VM whose VMM is not there.
    std::fs::write(&file, vc(&url("right-one"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shrink-migrate"))
        .args(["--cluster", file.to_str().unwrap(), "--dest", "siteB", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("refuses the password"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("v: its VMM does not answer") && err.contains("nothing was started"), "{err}");
    assert!(!dir.path().join("v-siteB.log").exists(), "a destination VMM was started");
}
