//! Helpers for the VMM integration tests: real `shrink-vmm` processes booting the project's
//! guest on KVM, their serial consoles and API sockets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hypervisor::api::ApiClient;
use serde_json::Value;
use shrink_testutil::util::{wait_for, wait_text};

/// The project's guest kernel.
pub fn guest() -> PathBuf {
    image("shrink-guest")
}

/// The shrink-vmm binary under test.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_shrink-vmm")
}

#[allow(unused_imports)]
pub use shrink_testutil::fs::TempDir;
#[allow(unused_imports)]
pub use shrink_testutil::util::image;
#[allow(unused_imports)]
pub use shrink_testutil::util::{heartbeats, last_heartbeat};

/// A running shrink-vmm process; killed on drop.
pub struct VmProcess {
    pub child: Child,
    pub serial: PathBuf,
    pub api: PathBuf,
    pub stderr: PathBuf,
}

impl VmProcess {
    /// Starts `shrink-vmm` with `args` plus `--serial` and `--api` in `dir`.
    pub fn spawn(dir: &Path, tag: &str, args: &[&str]) -> VmProcess {
        VmProcess::spawn_in(None, dir, tag, args, &[])
    }

    /// Like [`VmProcess::spawn`], inside network namespace `ns` and with extra environment.
    pub fn spawn_in(ns: Option<&str>, dir: &Path, tag: &str, args: &[&str], env: &[(&str, &str)]) -> VmProcess {
        VmProcess::start(ns, dir, tag, args, env, true)
    }

    /// Like [`VmProcess::spawn`], with exactly `args`: no test cluster key added.
    pub fn spawn_exact(dir: &Path, tag: &str, args: &[&str]) -> VmProcess {
        VmProcess::start(None, dir, tag, args, &[], false)
    }

    fn start(ns: Option<&str>, dir: &Path, tag: &str, args: &[&str], env: &[(&str, &str)], key: bool) -> VmProcess {
        let serial = dir.join(format!("{tag}.serial"));
        let api = dir.join(format!("{tag}.sock"));
        let stderr = dir.join(format!("{tag}.stderr"));
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, vmm_bin()]);
                c
            }
            None => Command::new(vmm_bin()),
        };
        for (k, v) in env {
            cmd.env(k, v);
        }
        // TLS, as deployed, unless the test asks otherwise.
        if key && !args.iter().any(|a| *a == "--plain-tcp" || *a == "--cluster-key") {
            cmd.arg("--cluster-key").arg(shrink_testutil::util::cluster_key());
        }
        let child = cmd
            .args(args)
            .arg("--serial")
            .arg(&serial)
            .arg("--api")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start shrink-vmm");
        let vm = VmProcess { child, serial, api, stderr };
        vm.wait_for_api();
        vm
    }

    /// Boots the guest with `cmdline` and `mem`.
    pub fn boot(dir: &Path, tag: &str, mem: &str, cmdline: &str) -> VmProcess {
        let g = guest();
        VmProcess::spawn(
            dir,
            tag,
            &["--kernel", g.to_str().unwrap(), "--mem", mem, "--cmdline", cmdline, "--name", tag],
        )
    }

    fn wait_for_api(&self) {
        wait_for("the API socket", 10, || self.api.exists().then_some(()))
            .unwrap_or_else(|e| panic!("{e}; stderr: {}", self.stderr_text()));
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::connect(&self.api).expect("connect to the API")
    }

    /// Executes an API command that must succeed.
    pub fn exec(&self, cmd: &str, args: Value) -> Value {
        self.client().execute(cmd, args).expect("API I/O").unwrap_or_else(|e| panic!("{cmd} failed: {e}"))
    }

    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the serial console contains `needle`; a timeout shows the console and the
    /// VMM's stderr.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let _stderr = StderrOnPanic(self);
        wait_text(&self.serial, needle, timeout);
    }

    /// The last heartbeat number on the serial console.
    pub fn last_heartbeat(&self) -> Option<u64> {
        last_heartbeat(&self.serial_text())
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = &mut self.child;
        wait_for("the VMM to exit", timeout.as_secs(), || child.try_wait().unwrap()).ok()
    }
}

/// Prints the VMM's stderr if the test panics while it is alive (the panic names what failed).
struct StderrOnPanic<'a>(&'a VmProcess);

impl Drop for StderrOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("stderr of the VMM ({}):\n{}", self.0.stderr.display(), self.0.stderr_text());
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `query-migrate` on the source to reach a final status (`completed`, `failed`,
/// `cancelled`; `gone` when the source VMM no longer answers); returns it.
pub fn wait_migration(src: &VmProcess, timeout: Duration) -> Value {
    let start = std::time::Instant::now();
    let mut last = serde_json::json!({});
    while start.elapsed() < timeout {
        match src.client().execute("query-migrate", serde_json::json!({})) {
            Ok(Ok(v)) => {
                if matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                    return v;
                }
                last = v;
            }
            _ => return serde_json::json!({"status": "gone", "last": last}),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("migration still running after {timeout:?}: {last}");
}

/// Runs shrink-vmm to completion with `args`; returns (exit code, stderr).
pub fn run_vmm(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match wait_for("shrink-vmm to exit", timeout.as_secs(), || child.try_wait().unwrap()) {
        Ok(status) => {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            (status.code(), err)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            (None, String::from("timed out"))
        }
    }
}
