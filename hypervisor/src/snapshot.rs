//! Snapshots on disk (stop-and-copy, the first form of migration).
//!
//! A snapshot is a directory holding:
//!
//! | file         | content                                                          |
//! |--------------|------------------------------------------------------------------|
//! | `state.json` | [`SnapshotState`]: format version, VM name and memory size, kernel command line, VM-wide KVM state (PIC, IOAPIC, PIT, kvmclock), every vCPU's state, device state |
//! | `memory.img` | guest RAM as one flat image, regions back to back, zero pages as holes (sparse) |

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSnapshot;
use crate::vstate::memory::{read_sparse_image, write_sparse_image, GuestMemoryMmap, MemoryError};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Version of the snapshot format this VMM writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;
const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory.img";

/// Errors reading or writing snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File-system error.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// `state.json` does not parse.
    #[error("snapshot {path}: invalid state file: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// Written by an incompatible version.
    #[error("snapshot {path}: format version {found}, this VMM reads version {SNAPSHOT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Version found.
        found: u32,
    },
    /// The memory image is unusable.
    #[error("snapshot {path}: {source}")]
    Memory {
        /// The file.
        path: String,
        /// Cause.
        source: MemoryError,
    },
}

/// Everything in a snapshot except guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Format version ([`SNAPSHOT_VERSION`]).
    pub version: u32,
    /// VM name.
    pub name: String,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Kernel command line the guest booted with.
    pub cmdline: String,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
    /// COM1 registers.
    pub serial: SerialSnapshot,
    /// virtio devices: backends and transport state, in MMIO order.
    #[serde(default)]
    pub devices: Vec<crate::vmm::DeviceSnapshot>,
    /// The VM was paused (by its user) before the migration that saved this: it stays paused
    /// at the destination.
    #[serde(default)]
    pub paused: bool,
}

/// Sizes and timings of a written snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotStats {
    /// Bytes of non-zero memory written.
    pub memory_bytes: u64,
    /// Size of the guest RAM.
    pub mem_size: u64,
    /// Milliseconds spent.
    pub time_ms: f64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.display().to_string(), source }
}

/// Writes a snapshot into `dir` (created if needed). The VM must be paused.
pub fn write_snapshot(
    dir: &Path,
    state: &SnapshotState,
    mem: &GuestMemoryMmap,
) -> Result<SnapshotStats, SnapshotError> {
    let start = std::time::Instant::now();
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_path = dir.join(MEMORY_FILE);
    let file = File::create(&mem_path).map_err(io(&mem_path))?;
    let memory_bytes = write_sparse_image(mem, &file)
        .map_err(|source| SnapshotError::Memory { path: mem_path.display().to_string(), source })?;
    file.sync_all().map_err(io(&mem_path))?;
    // Write the state last, through a rename: a directory with a state file is complete.
    let state_path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let json =
        serde_json::to_vec(state).map_err(|source| SnapshotError::Parse { path: tmp.display().to_string(), source })?;
    std::fs::write(&tmp, json).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &state_path).map_err(io(&state_path))?;
    Ok(SnapshotStats {
        memory_bytes,
        mem_size: crate::vstate::memory::mem_size(mem),
        time_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// Reads `state.json` of a snapshot and checks its version.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let data = std::fs::read(&path).map_err(io(&path))?;
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let p = || path.display().to_string();
    let v: Version = serde_json::from_slice(&data).map_err(|source| SnapshotError::Parse { path: p(), source })?;
    if v.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version { path: p(), found: v.version });
    }
    serde_json::from_slice(&data).map_err(|source| SnapshotError::Parse { path: p(), source })
}

/// Loads the memory image of a snapshot; returns the bytes read.
pub fn read_memory(dir: &Path, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let mut file = File::open(&path).map_err(io(&path))?;
    read_sparse_image(mem, &mut file)
        .map_err(|source| SnapshotError::Memory { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_corrupt_snapshots_are_named() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let err = read_state(dir.as_path()).unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        std::fs::write(dir.as_path().join("state.json"), b"{\"version\": 7}").unwrap();
        let err = read_state(dir.as_path()).unwrap_err().to_string();
        assert!(err.contains("version 7"), "{err}");
        std::fs::write(dir.as_path().join("state.json"), b"{\"version\": 1}").unwrap();
        let err = read_state(dir.as_path()).unwrap_err().to_string();
        assert!(err.contains("invalid state file"), "{err}");
    }
}
