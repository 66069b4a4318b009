//! Small helpers shared by benchmarks and tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testutil/ is in the repository").to_owned()
}

/// A benchmark's output file: its first argument ending in `.json` (relative to the repository
/// root, since cargo runs benches from their package's directory), else `default`.
pub fn bench_output(default: &str) -> PathBuf {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && a.ends_with(".json"))
        .map(|p| repo_root().join(p))
        .unwrap_or_else(|| repo_root().join(default))
}

/// An artefact of `make images` (`images/out/<name>`); panics telling to build them when it
/// is missing.
pub fn image(name: &str) -> PathBuf {
    let p = repo_root().join("images/out").join(name);
    assert!(p.exists(), "{} is missing: run `make images` first", p.display());
    p
}

/// The tests' cluster key (`shrink-vmm --cluster-key`): one file shared by every test
/// process of this machine, `$TMPDIR/shrink-test-cluster.key` (mode 0600), made on first use.
/// Made complete under another name and then hard-linked into place, so that a process never
/// reads half a key and every VMM of a test gets the same one.
pub fn cluster_key() -> &'static Path {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join("shrink-test-cluster.key");
        if !path.exists() {
            let mut k = [0u8; 32];
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut k)).expect("read /dev/urandom");
            let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
            let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .expect("write the test cluster key");
            f.write_all(format!("{hex}\n").as_bytes()).expect("write the test cluster key");
            drop(f);
            // Whoever links first wins; the others use that key.
            let _ = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
        }
        path
    })
}

/// Waits until the file contains `needle`; returns its text. Panics after `timeout` with what
/// the file holds then.
pub fn wait_text(p: &Path, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let t = std::fs::read_to_string(p).unwrap_or_default();
        if t.contains(needle) {
            return t;
        }
        assert!(start.elapsed() < timeout, "no {needle:?} in {} after {timeout:?}:\n{t}", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Something did not happen in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {secs} s waiting for {what}")]
pub struct WaitTimeout {
    /// What was waited for.
    pub what: String,
    /// How long, in seconds.
    pub secs: u64,
}

/// Polls `f` every 20 ms until it returns `Some`, and returns that; after `secs` seconds, an
/// error saying that `what` did not happen.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> Result<T, WaitTimeout> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > Duration::from_secs(secs) {
            return Err(WaitTimeout { what: what.to_owned(), secs });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 20 ms until it returns `Some`, and returns that; panics after `timeout`
/// saying that `what` did not happen. For tests: a wait on a condition, never a fixed sleep.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "{what}: did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of the text file `p` (empty if it cannot be read).
pub fn tail_lines(p: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The current UTC time, ISO 8601.
pub fn utc_now() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}

/// This machine, as read from it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`).
    pub cpu: String,
    /// The CPU's vendor (`GenuineIntel`, `AuthenticAMD`, ...).
    pub vendor: String,
    /// Cores available to this process.
    pub cores: usize,
    /// The running kernel's release.
    pub kernel: String,
    /// Whether this machine is itself a VM (the CPU's `hypervisor` flag), so that the KVM it
    /// offers is nested.
    pub nested_kvm: bool,
}

impl Machine {
    /// Reads this machine.
    pub fn read() -> Machine {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_owned()))
                .unwrap_or_default()
        };
        let cpu = field("model name");
        Machine {
            cpu: if cpu.is_empty() { "unknown CPU".into() } else { cpu },
            vendor: field("vendor_id"),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            nested_kvm: field("flags").split_whitespace().any(|f| f == "hypervisor"),
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kvm = if self.nested_kvm { "nested KVM" } else { "KVM" };
        write!(f, "{} ({}), {} cores, Linux {}, {kvm}", self.cpu, self.vendor, self.cores, self.kernel)
    }
}

/// This machine in one line: CPU model and vendor, cores, kernel, KVM nesting.
pub fn machine() -> String {
    Machine::read().to_string()
}

/// This machine as the `host` object of a benchmark's JSON.
pub fn host_info() -> serde_json::Value {
    serde_json::to_value(Machine::read()).unwrap_or_default()
}

/// The number of the last `heartbeat <n>` line the test guest printed on its console.
pub fn last_heartbeat(text: &str) -> Option<u64> {
    heartbeats(text).last().copied()
}

/// The heartbeat numbers in a console transcript, from its complete lines only: a last line
/// without its `\n` may be cut in the middle of its number (a guest paused mid-print).
pub fn heartbeats(text: &str) -> Vec<u64> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().filter_map(|l| l.trim().strip_prefix("heartbeat ")).filter_map(|n| n.trim().parse().ok()).collect()
}

/// A deterministic pseudo-random sequence (xorshift64) for test data: the same `seed`, the
/// same numbers, on every machine.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A sequence from `seed` (any value; 0 is mapped to a non-zero state).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `len` bytes of the sequence.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_come_from_complete_lines_only() {
        assert_eq!(heartbeats("heartbeat 1\nheartbeat 2\nheartbeat 3"), [1, 2]);
        assert_eq!(last_heartbeat("boot\nheartbeat 11\nheartbeat 1"), Some(11));
        assert_eq!(last_heartbeat("heartbeat 7\n"), Some(7));
        assert_eq!(last_heartbeat("heartbeat 7"), None);
    }

    #[test]
    fn xorshift_is_deterministic_and_not_uniform() {
        assert_eq!(XorShift::new(7).bytes(64), XorShift::new(7).bytes(64));
        assert_ne!(XorShift::new(7).bytes(64), XorShift::new(8).bytes(64));
        let b = XorShift::new(0).bytes(4096);
        assert!(b.iter().any(|&x| x != b[0]), "seed 0 still varies");
    }
}
