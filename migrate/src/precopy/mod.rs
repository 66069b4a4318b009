//! The pre-copy engine, both ends, independent of KVM: the VMM plugs in through [`Source`] and
//! [`Sink`].
//!
//! Source: dirty logging on; a full pass; dirty passes until QEMU's switch-over rule holds
//! (bytes still dirty < measured bandwidth × downtime limit); pause; the last dirty pages, the
//! VM state, `End`; then wait for the destination's verdict. Only a positive verdict ends the
//! source's copy of the guest; any failure before it (destination gone, link down, corrupt
//! stream, cancel) resumes the guest at the source. With auto-converge a guest that dirties
//! memory faster than the link carries it is throttled (20 %, then +10 % per period, as QEMU).
//!
//! Destination: installs chunks as they arrive, checks the stream's own totals at `End`,
//! restores the VM, says so, and only then starts the guest.
//!
//! Guest memory is never borrowed: the source copies each group of chunks out once
//! ([`Source::read_chunk`], vm-memory's volatile accessors in the VMM) and classifies, hashes and
//! sends that copy, so a registered digest always matches the bytes sent; the destination writes
//! through [`Sink::write_chunk`]. A destination that stops answering is given up after
//! [`Params::verdict_timeout`] ([`MigrationError::Stalled`]), and the guest resumes at the
//! source.
//!
//! # The life of a chunk
//!
//! From the source's dirty log to the destination's memory, and the file of `precopy/` (or of
//! the crate) that holds each stage:
//!
//! ```text
//! SOURCE, the guest running                                            where
//! ───────────────────────────────────────────────────────────────────  ──────────────────────
//!  Source::dirty_log           one bitmap per region, bit per page     endpoints.rs (the VMM)
//!        │  pass 1: every page (full_bitmap); later: the log           layout.rs
//!        ▼
//!  Sender::send_pass           set bits → chunk addresses, by GROUP    source.rs
//!        ▼
//!  send_group                  Source::read_chunk: one copy each       source.rs
//!        ▼
//!  queue_group ─ uniform? ─ yes ──────────────────▶ Uniform(byte)      source.rs
//!        │        └─ no ─ Dedup::decide ─ digest ─▶ Digest(d)          endpoints.rs,
//!        │                               └─ none ─▶ Full(bytes)        shrinker/coordination.rs
//!        ▼
//!  PagesBuilder                ~1 MiB `Pages` records                  protocol.rs
//!        ▼
//!  flush_batch                 leaky bucket under max_bandwidth        rate.rs
//!        ▼
//!  end of pass ─ Iteration ─ another pass, Sync, switch over,          policy.rs
//!                throttle or give up (dirty ≤ bandwidth × downtime?)
//! ════════════════════════════════════ migration stream ═════════════════════════════════════
//! DESTINATION, the guest not started
//!  receive_with                Decoder; locate: inside one region?     sink.rs, layout.rs
//!        ├─ Full(bytes)  ─▶ Sink::write_chunk, Sink::on_write
//!        ├─ Uniform(b)   ─▶ Sink::fill_chunk (not 0 over never-written)
//!        └─ Digest(d)    ─▶ Sink::resolve (this VM, the site's hosts)  shrinker/site.rs
//!                              └─ not found ─▶ waiting list (pending)  sink.rs
//!  Sync, End ─ wait_for_site, then Pull ─▶ Sender::serve_pull          sink.rs, source.rs,
//!                              (when to stop waiting: site_wait)       shrinker/policy.rs
//!                              ◀─ Full(bytes) in `Pages`, PullDone
//!  End ─ totals, Verify, Sink::restore ─ Verdict ─▶ source stops       sink.rs
//!        ▼
//!  Sink::start                 the guest runs at the destination       sink.rs
//! ```
//!
//! The files: `types.rs` (errors, [`Params`], the statistics), `endpoints.rs` ([`Source`],
//! [`Sink`], [`Dedup`]), `layout.rs` (pages, dirty bitmaps, chunk addresses), `source.rs`
//! ([`Sender`]: passes, sync, switch-over, pulls, verdict), `policy.rs` (the convergence
//! decisions, pure), `rate.rs` (the bandwidth cap), `sink.rs` ([`receive_with`] and the waiting
//! list); the tests' fakes are in `testutil.rs`. Shrinker's halves (the `Dedup` that decides
//! digest or full, the site index that resolves digests) are in [`crate::shrinker`], with the
//! same life of a chunk seen from there.

mod endpoints;
mod layout;
mod policy;
mod rate;
mod sink;
mod source;
#[cfg(test)]
mod testutil;
mod types;

use indexd::hash::hex;

pub use endpoints::{Dedup, NoDedup, Sink, Source};
pub use layout::{full_bitmap, PAGE_SIZE};
pub use sink::{receive, receive_with};
pub use source::Sender;
pub use types::{
    DiskStats, EndpointError, MigrationError, MigrationInfo, Params, RamStats, ReceiveOptions, ReceiveStats, Status,
    DEFAULT_PULL_WAIT_MS,
};
