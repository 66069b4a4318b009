//! The engine's vocabulary: its errors, its parameters, and the statistics both ends report
//! (QEMU's `query-migrate` names at the source, [`ReceiveStats`] at the destination).

use std::num::NonZeroU64;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PAGE_SIZE;
use crate::protocol::{DigestKind, ProtocolError};

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream is broken or the peer speaks nonsense.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// An end of the migration (the VMM, its memory, the dedup service) failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The user cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The guest dirties memory faster than the link can carry it.
    #[error(
        "did not converge after {iterations} iterations: {dirty_mbps:.1} MB/s dirtied against {link_mbps:.1} MB/s sent"
    )]
    NoConvergence {
        /// Passes made.
        iterations: u32,
        /// Dirty rate.
        dirty_mbps: f64,
        /// Link rate.
        link_mbps: f64,
    },
    /// The destination refused or failed.
    #[error("destination failed: {0}")]
    Destination(String),
    /// The destination answered nothing, and took nothing, for the verdict timeout.
    #[error("the destination stopped answering: nothing for {ms} ms (the verdict timeout)")]
    Stalled {
        /// The timeout, milliseconds.
        ms: u128,
    },
    /// The stream violated the sequence (e.g. pages outside guest memory).
    #[error("invalid stream: {0}")]
    Invalid(String),
}

/// What an end of a migration (a [`Source`](super::Source), [`Sink`](super::Sink) or
/// [`Dedup`](super::Dedup)) reports when it fails.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A chunk outside guest memory, or a memory access that failed.
    #[error("guest memory at {gpa:#x} ({len} bytes): {reason}")]
    Memory {
        /// Guest physical address.
        gpa: u64,
        /// Bytes asked for.
        len: usize,
        /// What went wrong.
        reason: String,
    },
    /// An operation of the VMM or of a service it uses failed.
    #[error("{op}: {source}")]
    Failed {
        /// The operation (`pause`, `dirty log`, `dedup`, ...).
        op: &'static str,
        /// Cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl EndpointError {
    /// `op` failed with `source` (an error, or a message).
    pub fn failed(op: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> EndpointError {
        EndpointError::Failed { op, source: source.into() }
    }

    /// A closure for `map_err`: `op` failed.
    pub fn of<E: Into<Box<dyn std::error::Error + Send + Sync>>>(op: &'static str) -> impl FnOnce(E) -> EndpointError {
        move |e| EndpointError::failed(op, e)
    }
}

/// How a migration runs (QEMU's parameters).
#[derive(Debug, Clone)]
pub struct Params {
    /// Longest acceptable pause of the guest.
    pub downtime_limit: Duration,
    /// Upper bound of the sending rate, bytes/s (0, like `None`: no cap).
    pub max_bandwidth: Option<u64>,
    /// Give up after this many dirty passes without converging.
    pub max_iterations: Option<u32>,
    /// Throttle a guest that dirties faster than the link.
    pub auto_converge: bool,
    /// Deduplication granularity.
    pub chunk_size: usize,
    /// Digest of digest-only chunks (None: plain pre-copy).
    pub digest: DigestKind,
    /// How long the source waits on a destination that does nothing: no answer (sync ack,
    /// pull, verdict) and no room for the stream. Then it gives up and the guest runs at the
    /// source again. The VMM sets it as the migration socket's read and write timeouts, which
    /// surface here as [`MigrationError::Stalled`].
    pub verdict_timeout: Duration,
    /// Send a digest of all memory at pause; the destination refuses on a mismatch.
    pub verify: bool,
    /// Send full chunks compressed (zstd) when that makes them at least an eighth smaller.
    pub compress: bool,
}

impl Params {
    /// The cap on the sending rate, bytes/s, if there is one: `max_bandwidth`, where 0 means no
    /// cap (QEMU's convention). The rate limiter and the bandwidth estimate both take it from here.
    pub(super) fn bandwidth_cap(&self) -> Option<NonZeroU64> {
        self.max_bandwidth.and_then(NonZeroU64::new)
    }
}

impl Default for Params {
    fn default() -> Params {
        Params {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            max_iterations: None,
            auto_converge: false,
            chunk_size: PAGE_SIZE,
            digest: DigestKind::None,
            verdict_timeout: Duration::from_secs(120),
            verify: false,
            compress: false,
        }
    }
}

/// Migration status, with QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing started.
    #[default]
    None,
    /// Connecting and announcing.
    Setup,
    /// Passes running.
    Active,
    /// The guest runs at the destination.
    Completed,
    /// Failed; the guest runs at the source.
    Failed,
    /// Cancelled; the guest runs at the source.
    Cancelled,
}

impl Status {
    /// QEMU's name of the status (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// `ram` of `query-migrate`, QEMU's names and meanings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    /// Bytes sent on the wire (all records, headers included).
    pub transferred: u64,
    /// Bytes still dirty.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Uniform pages (QEMU's historical name for zero pages).
    pub duplicate: u64,
    /// Pages sent in full.
    pub normal: u64,
    /// `normal` × page size.
    pub normal_bytes: u64,
    /// Dirty-bitmap synchronisations (passes).
    pub dirty_sync_count: u64,
    /// Pages sent per second, last period.
    pub pages_per_second: u64,
    /// Sending rate, last period, Mbit/s.
    pub mbps: f64,
    /// Pages dirtied per second, last period.
    pub dirty_pages_rate: u64,
    /// Chunks sent as a digest only (shrink's deduplication).
    pub deduplicated: u64,
    /// Chunks the destination pulled from the source after `End` (no peer had them).
    pub pulled: u64,
    /// Of the chunks sent in full (memory and disk), those sent compressed.
    pub compressed: u64,
    /// Bytes compression saved on the stream.
    pub compression_saved_bytes: u64,
}

/// The disks' part of `query-migrate` (QEMU's block-migration names where they exist).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskStats {
    /// Size of the disks, bytes.
    pub total: u64,
    /// Bytes of disk entries sent (entry headers included, record framing not).
    pub transferred: u64,
    /// Disk bytes still dirty.
    pub remaining: u64,
    /// Blocks sent in full (one per chunk).
    pub normal: u64,
    /// Uniform blocks (one byte each).
    pub duplicate: u64,
    /// Blocks sent as a digest only (another VM sent the content, or the destination's
    /// repository holds it).
    pub deduplicated: u64,
    /// Per disk: whether the destination's disk started as this disk's base layer (only the
    /// top layer's blocks then travel).
    pub held: Vec<bool>,
    /// Why a disk was not held (its base content then travels too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `query-migrate`, QEMU's names and meanings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MigrationInfo {
    /// State of the migration.
    pub status: Status,
    /// Milliseconds since the start (or in total once finished).
    pub total_time: u64,
    /// Milliseconds before the first pass.
    pub setup_time: u64,
    /// Milliseconds the guest was paused (once completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Downtime expected if switching over now, ms (while active).
    pub expected_downtime: u64,
    /// Current vCPU throttle, percent.
    pub cpu_throttle_percentage: u8,
    /// Memory statistics.
    pub ram: RamStats,
    /// Disk statistics (a VM with disks: they migrate with the memory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStats>,
    /// Why it failed.
    #[serde(rename = "error-desc", skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// SHA-256 of all guest memory at pause (with `verify`), hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_sha256: Option<String>,
}

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReceiveStats {
    /// VM name.
    pub name: String,
    /// Chunk entries installed.
    pub entries: u64,
    /// Full chunks.
    pub full: u64,
    /// Uniform chunks.
    pub uniform: u64,
    /// Digest-only chunks resolved.
    pub digest: u64,
    /// Passes announced by the source.
    pub passes: u32,
    /// Milliseconds from `Hello` to the guest starting.
    pub total_ms: u64,
    /// SHA-256 of the installed memory, when the source asked for verification.
    pub memory_sha256: Option<String>,
    /// Digest-only chunks installed from content found at the destination site.
    pub resolved: u64,
    /// Digest-only chunks pulled from the source in the end.
    pub pulled: u64,
    /// Of `entries`, those of disk blocks.
    pub disk_entries: u64,
    /// Of `full`, disk blocks.
    pub disk_full: u64,
    /// Of `uniform`, disk blocks.
    pub disk_uniform: u64,
    /// Of `digest`, disk blocks.
    pub disk_digest: u64,
    /// Of `pulled`, disk blocks.
    pub disk_pulled: u64,
    /// Of `full`, chunks that arrived compressed.
    pub compressed: u64,
}

/// How long a destination waits, by default, for content in flight from other hosts of its
/// site before it pulls it from the source (`shrink-vmm --pull-wait-ms`; `shrink-migrate`
/// scales it with the cluster's size, [`crate::orchestrate::pull_wait_ms`]).
pub const DEFAULT_PULL_WAIT_MS: u64 = 500;

/// How the destination waits for content before pulling it from the source.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveOptions {
    /// How long the waiting list may go without progress (other hosts of the site delivering
    /// the content) before the rest is pulled from the source, while the guest still runs.
    pub wait: Duration,
    /// The same once the source has paused the guest: every millisecond is downtime, and a
    /// pull of the few chunks of the last pass costs one round trip, so the default is to look
    /// once more at the site and then pull.
    pub paused_wait: Duration,
    /// Whether chunks nobody at the site holds may be pulled from the source (tests turn it
    /// off to see a migration fail cleanly when every fallback is down).
    pub pull: bool,
    /// Asked at every record and before the verdict: `true` aborts the incoming migration
    /// (e.g. the destination VMM got SIGTERM) — the guest then stays at the source.
    pub cancelled: Option<fn() -> bool>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            wait: Duration::from_millis(DEFAULT_PULL_WAIT_MS),
            paused_wait: Duration::ZERO,
            pull: true,
            cancelled: None,
        }
    }
}
