//! VM configuration and the parsing of command-line values.

use std::path::PathBuf;

use crate::arch::layout::MIN_MEM_SIZE;
use crate::arch::mptable::MAX_VCPUS;
use crate::devices::serial::SharedBuffer;
use crate::devices::virtio::block::DiskConfig;
use crate::devices::virtio::net::NetConfig;
use crate::loader::KernelConfig;

/// Errors in user-supplied configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Not a size.
    #[error("{option}: '{value}' is not a size (use e.g. 256M, 1G, 65536)")]
    NotASize {
        /// The option.
        option: &'static str,
        /// The value given.
        value: String,
    },
    /// Guest memory too small.
    #[error("--mem {value}: the guest needs at least {min} MiB")]
    MemTooSmall {
        /// The value given.
        value: String,
        /// Minimum in MiB.
        min: u64,
    },
    /// Guest memory not a multiple of the page size.
    #[error("--mem {0}: must be a multiple of 4 KiB")]
    MemUnaligned(String),
    /// A vCPU count that is not 1 to 32.
    #[error("--cpus {0}: a VM has 1 to {MAX_VCPUS} vCPUs")]
    Cpus(String),
}

/// Parses `256M`, `1G`, `512K`, `4096` (binary units; an optional trailing `B`/`iB`).
pub fn parse_size(option: &'static str, value: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::NotASize { option, value: value.to_owned() };
    let v = value.trim();
    let v = v.strip_suffix("iB").or_else(|| v.strip_suffix('B')).unwrap_or(v);
    let (digits, shift) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 30),
        Some('T' | 't') => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1 << shift).ok_or_else(err)
}

/// Parses and checks `--mem`.
pub fn parse_mem_size(value: &str) -> Result<u64, ConfigError> {
    let size = parse_size("--mem", value)?;
    if size < MIN_MEM_SIZE {
        return Err(ConfigError::MemTooSmall { value: value.to_owned(), min: MIN_MEM_SIZE >> 20 });
    }
    if size % 4096 != 0 {
        return Err(ConfigError::MemUnaligned(value.to_owned()));
    }
    Ok(size)
}

/// Parses and checks `--cpus` (1 to 32).
pub fn parse_cpus(value: &str) -> Result<u8, ConfigError> {
    match value.trim().parse::<u8>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(ConfigError::Cpus(value.to_owned())),
    }
}

/// Where guest serial output goes.
#[derive(Clone, Default)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// An in-memory buffer (tests).
    Buffer(SharedBuffer),
    /// Discarded.
    Sink,
}

/// Everything needed to boot a VM.
#[derive(Clone)]
pub struct VmConfig {
    /// Name (for logs and the API).
    pub name: String,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs (1 to 32).
    pub vcpus: u8,
    /// Kernel to boot.
    pub kernel: KernelConfig,
    /// Serial console destination.
    pub serial: SerialOutput,
    /// Start with the vCPUs paused (QEMU's `-S`).
    pub start_paused: bool,
    /// NICs, in order.
    pub net: Vec<NetConfig>,
    /// The disk, if any.
    pub disk: Option<DiskConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("--mem", "256M"), Ok(256 << 20));
        assert_eq!(parse_size("--mem", "1G"), Ok(1 << 30));
        assert_eq!(parse_size("--mem", "1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("--mem", "512k"), Ok(512 << 10));
        assert_eq!(parse_size("--mem", "4096"), Ok(4096));
        for bad in ["", "M", "12Q", "-1M", "1.5G", "99999999999999999999G", "abc"] {
            assert!(parse_size("--mem", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mem_limits() {
        assert!(matches!(parse_mem_size("1M"), Err(ConfigError::MemTooSmall { .. })));
        assert!(matches!(parse_mem_size("33554433"), Err(ConfigError::MemUnaligned(_))));
        assert_eq!(parse_mem_size("32M"), Ok(32 << 20));
        let msg = parse_mem_size("lots").unwrap_err().to_string();
        assert!(msg.contains("--mem") && msg.contains("lots"), "{msg}");
    }

    #[test]
    fn cpu_counts() {
        assert_eq!(parse_cpus("1"), Ok(1));
        assert_eq!(parse_cpus("32"), Ok(32));
        for bad in ["0", "33", "-1", "two", "", "256"] {
            let e = parse_cpus(bad).unwrap_err().to_string();
            assert!(e.contains("--cpus") && e.contains("1 to 32"), "{bad}: {e}");
        }
    }
}
