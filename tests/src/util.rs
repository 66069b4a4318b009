//! Small helpers shared by benchmarks and tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_owned()
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

/// Waits until the file contains `needle`; returns its text.
pub fn wait_text(p: &Path, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let t = std::fs::read_to_string(p).unwrap_or_default();
        if t.contains(needle) {
            return t;
        }
        assert!(start.elapsed() < timeout, "no {needle:?} in {} after {timeout:?}", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The current UTC time, ISO 8601.
pub fn utc_now() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}

/// This machine in one line: CPU model, cores, kernel, KVM nesting.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// The number of the last `heartbeat <n>` line the test guest printed on its console.
pub fn last_heartbeat(text: &str) -> Option<u64> {
    text.lines().filter_map(|l| l.strip_prefix("heartbeat ")).filter_map(|n| n.trim().parse().ok()).next_back()
}
