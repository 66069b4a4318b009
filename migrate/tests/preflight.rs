//! `shrink-migrate --cluster` checks, before it starts anything, that every source VMM answers.

use std::process::Command;

use shrink_testutil::fs::TempDir;

#[test]
fn a_source_that_does_not_answer_stops_the_run_before_anything_starts() {
    let dir = TempDir::new("preflight").unwrap();
    // The VM's API socket does not exist.
    let vc = format!(
        "plain_tcp = true\n\n[[sites]]\nname = \"siteA\"\ncoordination = \"redis://127.0.0.1:1\"\nindex = \"redis://127.0.0.1:1\"\nlaunch = \"ip netns exec {{host}} {{cmd}}\"\n\n\
         [[sites.hosts]]\nname = \"a1\"\naddress = \"10.0.0.1\"\n\n\
         [[sites]]\nname = \"siteB\"\ncoordination = \"redis://127.0.0.1:1\"\nindex = \"redis://127.0.0.1:1\"\nlaunch = \"ip netns exec {{host}} {{cmd}}\"\n\n\
         [[sites.hosts]]\nname = \"b1\"\naddress = \"10.0.0.2\"\n\n\
         [[vms]]\nname = \"v\"\nhost = \"a1\"\napi = \"{}\"\n",
        dir.path().join("v.sock").display()
    );
    let file = dir.path().join("vc.toml");
    std::fs::write(&file, vc).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shrink-migrate"))
        .args(["--cluster", file.to_str().unwrap(), "--dest", "siteB", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("v: its VMM does not answer") && err.contains("nothing was started"), "{err}");
    let started: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(started, vec![std::ffi::OsString::from("vc.toml")], "a destination VMM was started");
}
