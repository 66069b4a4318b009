//! Child processes for tests: spawned in a network namespace or in the background, killed
//! and reaped on drop (also when a test panics), and the workspace's release binaries.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::{wait_for, WaitTimeout};

/// Why a process could not be run or waited for.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Spawning it, or its log, failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// It did not exit in time (it was killed).
    #[error(transparent)]
    Timeout(#[from] WaitTimeout),
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    /// What it is (in messages).
    pub name: String,
    child: Option<Child>,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawn `args` in namespace `ns`, stdout+stderr to `log`.
    pub fn spawn(name: &str, ns: &str, args: &[&str], log: PathBuf) -> Result<Proc, ProcessError> {
        let f = std::fs::File::create(&log)?;
        let f2 = f.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .spawn()?;
        Ok(Proc { name: name.to_string(), child: Some(child), log })
    }

    /// Spawn with stdout captured to `out` and stderr to `log`.
    pub fn spawn_out(name: &str, ns: &str, args: &[&str], out: PathBuf, log: PathBuf) -> Result<Proc, ProcessError> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&out)?))
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()?;
        Ok(Proc { name: name.to_string(), child: Some(child), log })
    }

    /// Process id (`ip netns exec` execs the command, so this is the command's pid).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Is it still running?
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Wait for exit (up to `secs`), then kill.
    pub fn wait(&mut self, secs: u64) -> Result<std::process::ExitStatus, ProcessError> {
        let name = self.name.clone();
        let c = self.child.as_mut().ok_or_else(|| WaitTimeout { what: format!("{name} (already reaped)"), secs: 0 })?;
        let st = wait_for(&format!("{name} to exit"), secs, || c.try_wait().ok().flatten());
        if st.is_err() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(st?)
    }

    /// Kill now.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log's content.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A binary of this workspace (built by `cargo build --release`).
pub fn release_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("target/release").join(name);
    assert!(p.exists(), "{} is missing: cargo build --release --workspace", p.display());
    p
}

/// Runs a command in the background, its output in `log`; killed on drop.
pub struct Bg(pub Child);

impl Bg {
    /// Spawns `cmd`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Bg {
        let f = std::fs::File::create(log).unwrap();
        Bg(cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap())
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
