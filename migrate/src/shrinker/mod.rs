//! Shrinker: deduplicated live migration of a cluster of VMs across a WAN. Both halves live
//! here: the source half ([`coordination`]) decides which chunks cross the WAN in full and
//! which as a digest only; the destination half ([`site`]) finds the content of digest-only
//! chunks at the destination site and makes this VM's content available to the site's other
//! hypervisors. Both meet in Redis, under the keys of [`keys`]; the decisions that involve no
//! I/O are in `policy.rs`.
//!
//! **A digest-only chunk is resolved in [`SiteIndex::resolve`] (`shrinker/site.rs`).**
//!
//! # The life of a chunk
//!
//! Every step, and the file and function that does it (paths are under `migrate/src/` unless
//! they say otherwise):
//!
//! ```text
//!  SOURCE VMM — the guest runs
//!  ══════════════════════════════════════════════════════════════════════════════════════════
//!  1. read ONE copy of each chunk of a group of dirty chunks (a volatile copy; the copy is
//!     what is classified, hashed and sent, so a registered digest matches the bytes sent)
//!       precopy/source.rs       Sender::send_pass → Sender::send_group → Source::read_chunk
//!       hypervisor/src/migration.rs   VmmSource::read_chunk
//!          │
//!          ▼
//!  2. classify the copy ─── uniform (one byte repeated) ──────────────▶ Uniform(byte)
//!          │ not uniform: a "full" chunk
//!       precopy/source.rs       Sender::queue_group (protocol.rs: uniform_byte)
//!          ▼
//!  3. digest of the copy (SHA-256 or SHA-1), a whole group at once
//!       shrinker/coordination.rs   RedisDedup::decide (indexd::hash::digest)
//!          ▼
//!  4. SET shrink:coord:<run>:<dest site>:<digest> 1 NX EX ttl, in the SOURCE site's
//!     coordination Redis, one pipelined round trip per group
//!       shrinker/coordination.rs   RedisDedup::decide (shrinker/keys.rs: coordination_prefix,
//!                                  with_digest; Redis::set_nx_many)
//!          │
//!          ├─ first to set it (or coordination down) ─────────────────▶ Full(bytes)
//!          └─ already set by some VM of the cluster ──────────────────▶ Digest(digest)
//!  5. sent in a `Pages` record
//!       precopy/source.rs       Sender::queue_group (protocol.rs: PagesBuilder::full,
//!                               PagesBuilder::digest), Sender::flush_batch (precopy/rate.rs)
//!  ═════════════════════════════ migration stream over the WAN ═════════════════════════════
//!  DESTINATION VMM — the guest does not run yet
//!  6. each entry of a `Pages` record
//!       precopy/sink.rs         receive_inner
//!          │
//!          ├─ Full(bytes): install, then register this VMM as a holder
//!          │     precopy/sink.rs         Sink::write_chunk, Sink::on_write
//!          │     hypervisor/src/migration.rs   VmmSink::on_write
//!          │     shrinker/site.rs        SiteIndex::on_write → SiteIndex::record (ContentIndex;
//!          │                             shrinker/policy.rs: index_changes: SADD the new digest, SREM
//!          │                             the old one when its last copy is overwritten)
//!          │     shrinker/site.rs        SiteIndex::flush, at the end of the record: SADD/SREM
//!          │                             shrink:index:<digest> HOST:PORT in the DESTINATION
//!          │                             site's index Redis (shrinker/policy.rs: split_updates)
//!          ├─ Uniform(byte): fill (a zero one over never-written memory: nothing to do);
//!          │     not indexed: SiteIndex::on_write(None) SREMs the old digest's last copy
//!          │
//!          └─ Digest(digest): RESOLVE
//!                precopy/sink.rs         Sink::resolve, a record's digest-only chunks at once
//!                hypervisor/src/migration.rs   VmmSink::resolve
//!                shrinker/site.rs        SiteIndex::resolve                      ◀── here
//!                  a. this guest's own memory: ContentIndex::lookup, then
//!                     ChunkMemory::read_chunk (GuestChunks::read), verified
//!                  b. a random holder: SRANDMEMBER shrink:index:<digest>
//!                     (shrinker/policy.rs: first_holders — never this VMM), PeerClient::fetch
//!                  c. after a failure, the other holders, one per round: SMEMBERS
//!                     (shrinker/policy.rs: need_all_holders, untried, next_round; at most
//!                     HOLDER_ROUNDS rounds)
//!                  every peer's answer verified (shrinker/policy.rs: is_chunk) before
//!                  SiteIndex::install writes it and registers it (record → SADD)
//!                     │
//!                     └─ found nowhere ─▶ the waiting list, `pending`   precopy/sink.rs
//!  7. at `Sync` (the source waits, the guest still runs there) and after `End` (paused):
//!     retry the waiting list while the site makes progress (the content is usually in flight
//!     in other VMs' streams)
//!       precopy/sink.rs         wait_for_site → retry_pending → Sink::resolve
//!       shrinker/policy.rs      site_wait: stop when nothing waits, when no wait is allowed
//!                               (wait 0: one look), or after `wait` without progress
//!          ▼
//!  8. pull the rest from the source: `Pull` ─▶ the source reads and checks each chunk and
//!     answers with Full(bytes) ─▶ verified against its digest, installed and registered
//!     under that digest (not hashed again)
//!       precopy/sink.rs         pull → Sink::on_write_verified
//!       shrinker/site.rs        SiteIndex::on_write_verified → SiteIndex::record
//!       precopy/source.rs       Sender::serve_pull
//!  ══════════════════════════════════════════════════════════════════════════════════════════
//!  ALL ALONG, at the destination site
//!   - serve this guest's chunks to the site's other hypervisors, by digest, a fresh copy
//!     verified against the digest (the guest may have changed it)
//!       shrinker/site.rs        GuestChunks::chunk (indexd's ChunkSource, for its PeerServer)
//!   - the index failed: content comes from the source meanwhile; when it answers again,
//!     register all this VMM holds once more
//!       shrinker/site.rs        SiteIndex::index, SiteIndex::index_failed
//!   - the VM leaves this host: SREM all it held
//!       shrinker/site.rs        Drop for SiteIndex
//! ```
//!
//! # Guest memory
//!
//! The destination half reads this guest's chunks through [`ChunkMemory`], which the VMM
//! implements over its guest memory (`hypervisor/src/migration.rs`, with vm-memory's volatile
//! accessors): always a copy into a buffer, never a slice over guest memory that the guest, the
//! stream or a peer-server thread may write meanwhile.

pub mod coordination;
pub mod keys;
pub(crate) mod policy;
pub mod site;

pub use coordination::{DedupConfig, DedupStats, RedisDedup};
pub use site::{SiteIndex, SiteIndexError, SiteOptions};

/// Why a chunk of guest memory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkMemoryError {
    /// The range is not inside guest memory.
    #[error("{len} bytes at {gpa:#x}: not inside guest memory")]
    OutOfRange {
        /// The guest physical address.
        gpa: u64,
        /// The length.
        len: usize,
    },
    /// The memory could not be read.
    #[error("reading {len} bytes at {gpa:#x}: {source}")]
    Unreadable {
        /// The guest physical address.
        gpa: u64,
        /// The length.
        len: usize,
        /// Cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// This guest's memory, as the destination half reads it: to serve its chunks to peers and to
/// resolve digest-only chunks from its own content.
pub trait ChunkMemory: Send + Sync {
    /// Copies the `buf.len()` bytes of guest memory at `gpa` into `buf`. Implementations copy
    /// (the memory may be written meanwhile) and never hand out references into it.
    fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ChunkMemoryError>;
}
