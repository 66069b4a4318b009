//! Child processes for tests: spawned in a network namespace or in the background, killed
//! and reaped on drop (also when a test panics), the state of a process, and the workspace's
//! binaries (of the cargo profile of whoever runs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::{repo_root, wait_for, WaitTimeout};

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

/// The directory holding the workspace's binaries for this run: `$SHRINK_BIN_DIR` if set;
/// else, for an integration test or a bench (`target/<profile>/deps/<test>`), its profile's
/// directory `target/<profile>`; else the directory of the running program (a tool such as
/// `target/<profile>/shrink-testbed`); and the repository's `target/release` if the running
/// program cannot be found.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHRINK_BIN_DIR") {
        return PathBuf::from(d);
    }
    match std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_owned)) {
        Some(d) if d.file_name().is_some_and(|n| n == "deps") => d.parent().map(Path::to_owned).unwrap_or(d),
        Some(d) => d,
        None => repo_root().join("target/release"),
    }
}

/// How to build the workspace's binaries into `dir` (a `target/<profile>` directory).
pub fn build_hint(dir: &Path) -> String {
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(p) => p.to_owned(),
        None => "release".to_owned(),
    };
    format!("run `cargo build --workspace --profile {profile}` (or set SHRINK_BIN_DIR)")
}

/// A binary of this workspace, from [`bin_dir`] (the cargo profile of this run); panics with
/// what to build when it is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let dir = bin_dir();
    let p = dir.join(name);
    assert!(p.is_file(), "{} is missing: {}", p.display(), build_hint(&dir));
    p
}

/// The state letter of process `pid` (`R`, `S`, `T` for stopped, `Z` for a zombie, ...), from
/// `/proc/<pid>/stat`; `None` if there is no such process.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the name may hold spaces and parentheses.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_looked_up_in_the_profile_directory_of_the_run() {
        if std::env::var_os("SHRINK_BIN_DIR").is_none() {
            // A unit test runs as target/<profile>/deps/<test>.
            let exe = std::env::current_exe().unwrap();
            assert_eq!(exe.parent().unwrap().file_name().unwrap(), "deps");
            assert_eq!(bin_dir(), exe.parent().unwrap().parent().unwrap());
        }
        assert!(build_hint(Path::new("target/test-hooks")).contains("--profile test-hooks"));
        assert!(build_hint(Path::new("target/debug")).contains("--profile dev"));
    }

    #[test]
    fn this_process_has_a_state_and_a_missing_one_none() {
        // Its main thread waits for the test threads: running or sleeping, not a zombie.
        assert!(matches!(proc_state(std::process::id()), Some('R' | 'S')), "{:?}", proc_state(std::process::id()));
        assert_eq!(proc_state(u32::MAX), None);
    }
}
