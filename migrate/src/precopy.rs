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

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::protocol::{
    self, uniform_byte, Chunk, Decoder, DigestKind, Hello, PagesBuilder, ProtocolError, Record, Region, StreamParams,
};

/// Guest page size (dirty-log granularity).
pub const PAGE_SIZE: usize = 4096;
/// Target size of one `Pages` record.
const BATCH_BYTES: usize = 1 << 20;
/// Chunks classified together (one dedup round trip for the whole group).
const GROUP: usize = 1024;

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

/// What an end of a migration (a [`Source`], [`Sink`] or [`Dedup`]) reports when it fails.
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
    /// Upper bound of the sending rate, bytes/s.
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
    /// Why it failed.
    #[serde(rename = "error-desc", skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// SHA-256 of all guest memory at pause (with `verify`), hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_sha256: Option<String>,
}

/// What the engine needs from the source VMM.
///
/// Guest memory is only ever copied out, a chunk at a time ([`Source::read_chunk`]): the guest
/// and other threads may write it at any moment, so no reference into it is ever held. The
/// engine classifies, hashes and sends a chunk from that one copy, so the digest it registers
/// is always the digest of the bytes it sent.
pub trait Source {
    /// Guest memory regions, in order.
    fn regions(&self) -> Vec<Region>;
    /// Copies the guest's `buf.len()` bytes at `gpa` (inside one region) into `buf`. While the
    /// guest runs the copy may be torn; the dirty log then has the page, and it is sent again.
    fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), EndpointError>;
    /// Starts dirty logging.
    fn start_dirty_log(&mut self) -> Result<(), EndpointError>;
    /// Stops dirty logging.
    fn stop_dirty_log(&mut self) -> Result<(), EndpointError>;
    /// Pages written since the last call, one bitmap per region (bit per 4 KiB page).
    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, EndpointError>;
    /// Pauses the guest (vCPUs and devices).
    fn pause(&mut self) -> Result<(), EndpointError>;
    /// Resumes the guest.
    fn resume(&mut self) -> Result<(), EndpointError>;
    /// vCPU, VM and device state of the paused guest.
    fn vm_state(&mut self) -> Result<Vec<u8>, EndpointError>;
    /// Sets the vCPU throttle (percent of time kept off the CPU).
    fn set_throttle(&mut self, percent: u8);
    /// VM name.
    fn name(&self) -> String;
    /// SHA-256 of all guest memory in address order (the guest is paused).
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError>;
}

pub use indexd::hash::hex;

/// How non-uniform chunks travel: in full, or as a digest the destination resolves.
pub trait Dedup {
    /// For each chunk of `chunks` (address, bytes), `Some(digest)` to send only the digest,
    /// `None` to send it in full.
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError>;
}

impl<D: Dedup + ?Sized> Dedup for Box<D> {
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        (**self).decide(chunks)
    }
}

/// Plain pre-copy: everything in full.
pub struct NoDedup;

impl Dedup for NoDedup {
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        Ok(vec![None; chunks.len()])
    }
}

/// Counts bytes written through it.
struct Counting<W: Write> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The sending side of one migration.
pub struct Sender<'a, S: Source, D: Dedup, W: Write, R: Read> {
    src: &'a mut S,
    dedup: D,
    out: Counting<BufWriter<W>>,
    back: R,
    params: Params,
    info: Arc<Mutex<MigrationInfo>>,
    cancel: Arc<AtomicBool>,
    start: Instant,
    builder: PagesBuilder,
    entries: u64,
    page_bytes: u64,
    paused: bool,
    throttle: u8,
    throttle_strikes: u32,
    /// Leaky bucket of the bandwidth cap: when the next byte may leave.
    next_send: Instant,
    /// Bytes and time spent sending passes (for the bandwidth estimate).
    pass_bytes: u64,
    pass_time: Duration,
    /// The copies of the chunk group being sent (reused from group to group).
    copies: Vec<u8>,
}

/// Whether a socket error is a read or write timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` give
/// `EAGAIN`).
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// Sets every page bit of a region of `len` bytes.
fn full_bitmap(len: u64) -> Vec<u64> {
    let pages = (len as usize) / PAGE_SIZE;
    let mut v = vec![u64::MAX; pages.div_ceil(64)];
    if !pages.is_multiple_of(64) {
        *v.last_mut().expect("non-empty") = (1u64 << (pages % 64)) - 1;
    }
    v
}

/// ORs the per-region dirty bitmaps `more` into `dirty`.
fn or_into(dirty: &mut [Vec<u64>], more: &[Vec<u64>]) {
    for (d, m) in dirty.iter_mut().zip(more) {
        for (x, y) in d.iter_mut().zip(m) {
            *x |= y;
        }
    }
}

fn count_bits(maps: &[Vec<u64>]) -> u64 {
    maps.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

impl<'a, S: Source, D: Dedup, W: Write, R: Read> Sender<'a, S, D, W, R> {
    /// A sender over `out` (the migration stream) and `back` (the destination's answers).
    pub fn new(
        src: &'a mut S,
        dedup: D,
        out: W,
        back: R,
        params: Params,
        info: Arc<Mutex<MigrationInfo>>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        let builder = PagesBuilder::new(params.chunk_size, params.digest, BATCH_BYTES);
        Sender {
            src,
            dedup,
            out: Counting { inner: BufWriter::with_capacity(4 << 20, out), bytes: 0 },
            back,
            params,
            info,
            cancel,
            start: Instant::now(),
            builder,
            entries: 0,
            page_bytes: 0,
            paused: false,
            throttle: 0,
            throttle_strikes: 0,
            next_send: Instant::now(),
            pass_bytes: 0,
            pass_time: Duration::ZERO,
            copies: Vec::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        let mut i = self.info.lock().expect("migration info poisoned");
        f(&mut i);
        i.total_time = self.start.elapsed().as_millis() as u64;
        i.ram.transferred = self.out.bytes;
    }

    /// Runs the migration to its end. On success the guest runs at the destination; on error
    /// it runs here again.
    pub fn run(mut self) -> Result<MigrationInfo, MigrationError> {
        let result = self.migrate().map_err(|e| self.stalled(e));
        match result {
            Ok(downtime) => {
                let _ = self.src.stop_dirty_log();
                self.update(|i| {
                    i.status = Status::Completed;
                    i.downtime = Some(downtime.as_millis() as u64);
                    i.ram.remaining = 0;
                    i.expected_downtime = 0;
                });
            }
            Err(ref e) => {
                self.src.set_throttle(0);
                let resumed = if self.paused { self.src.resume() } else { Ok(()) };
                let _ = self.src.stop_dirty_log();
                // A cancel also shuts the socket down, so it may surface as an I/O error.
                let cancelled = matches!(e, MigrationError::Cancelled) || self.cancel.load(Ordering::SeqCst);
                let status = if cancelled { Status::Cancelled } else { Status::Failed };
                let mut msg = if cancelled { "cancelled".to_owned() } else { e.to_string() };
                if let Err(r) = resumed {
                    msg.push_str(&format!("; resuming the guest at the source failed: {r}"));
                }
                self.update(|i| {
                    i.status = status;
                    i.error = Some(msg);
                    i.cpu_throttle_percentage = 0;
                });
            }
        }
        let info = self.info.lock().expect("migration info poisoned").clone();
        result.map(|_| info)
    }

    /// A socket read or write that timed out (see [`Params::verdict_timeout`]) as
    /// [`MigrationError::Stalled`]; other errors as they are.
    fn stalled(&self, e: MigrationError) -> MigrationError {
        match &e {
            MigrationError::Protocol(ProtocolError::Io(io)) if is_timeout(io) => {
                MigrationError::Stalled { ms: self.params.verdict_timeout.as_millis() }
            }
            _ => e,
        }
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn migrate(&mut self) -> Result<Duration, MigrationError> {
        let regions = self.src.regions();
        let total: u64 = regions.iter().map(|r| r.len).sum();
        self.update(|i| {
            i.status = Status::Setup;
            i.ram.total = total;
            i.expected_downtime = self.params.downtime_limit.as_millis() as u64;
        });
        protocol::write_hello(
            &mut self.out,
            &Hello {
                version: protocol::VERSION,
                chunk_size: self.params.chunk_size as u32,
                digest: self.params.digest,
                mem_size: total,
                name: self.src.name(),
            },
        )?;
        protocol::write_layout(&mut self.out, &regions)?;
        self.src.start_dirty_log()?;
        let setup = self.start.elapsed().as_millis() as u64;
        self.update(|i| {
            i.status = Status::Active;
            i.setup_time = setup;
        });

        // Pass 1: everything. Later passes: what the guest wrote meanwhile.
        let mut dirty: Vec<Vec<u64>> = regions.iter().map(|r| full_bitmap(r.len)).collect();
        let mut pass = 0u32;
        let mut last_sync = Instant::now();
        let mut synced = false;
        loop {
            pass += 1;
            let (sent, took) = self.send_pass(&regions, &dirty, pass)?;
            dirty = self.src.dirty_log()?;
            let period = last_sync.elapsed().as_secs_f64().max(1e-3);
            last_sync = Instant::now();
            let dirty_bytes = count_bits(&dirty) * PAGE_SIZE as u64;
            // Bandwidth of the link, measured over every pass so far: a short pass alone mostly
            // measures how fast socket buffers fill, and would switch over too early.
            self.pass_bytes += sent;
            self.pass_time += took;
            let mut bandwidth = self.pass_bytes as f64 / self.pass_time.as_secs_f64().max(1e-3);
            if let Some(cap) = self.params.max_bandwidth.filter(|&c| c > 0) {
                bandwidth = bandwidth.min(cap as f64);
            }
            let threshold = bandwidth * self.params.downtime_limit.as_secs_f64();
            let expected = if bandwidth > 0.0 { dirty_bytes as f64 / bandwidth } else { 0.0 };
            self.update(|i| {
                i.ram.dirty_sync_count = pass as u64;
                i.ram.remaining = dirty_bytes;
                i.ram.dirty_pages_rate = ((dirty_bytes / PAGE_SIZE as u64) as f64 / period) as u64;
                i.expected_downtime = (expected * 1e3) as u64;
            });
            protocol::write_iteration(&mut self.out, pass, dirty_bytes)?;
            if (dirty_bytes as f64) <= threshold {
                // The source is ready; is the destination? It may still be installing what the
                // socket buffers hold, or waiting for content other hosts of its site are
                // receiving. Pausing now would add that to the downtime: let it catch up while
                // the guest still runs, then decide again on a fresh dirty log.
                if synced {
                    break;
                }
                self.sync(pass, &regions)?;
                synced = true;
                or_into(&mut dirty, &self.src.dirty_log()?);
                let dirty_bytes = count_bits(&dirty) * PAGE_SIZE as u64;
                if (dirty_bytes as f64) <= threshold {
                    break;
                }
                continue;
            }
            if self.params.auto_converge && dirty_bytes as f64 > 0.5 * sent as f64 {
                // QEMU: two periods in a row dirtying more than half of what was sent.
                self.throttle_strikes += 1;
                if self.throttle_strikes >= 2 {
                    self.throttle = if self.throttle == 0 { 20 } else { (self.throttle + 10).min(99) };
                    self.src.set_throttle(self.throttle);
                    let t = self.throttle;
                    self.update(|i| i.cpu_throttle_percentage = t);
                    self.throttle_strikes = 0;
                }
            }
            if let Some(max) = self.params.max_iterations {
                if pass >= max {
                    return Err(MigrationError::NoConvergence {
                        iterations: pass,
                        dirty_mbps: dirty_bytes as f64 / period / 1e6,
                        link_mbps: bandwidth / 1e6,
                    });
                }
            }
        }

        // Switch over.
        self.check_cancel()?;
        let stop = Instant::now();
        self.src.pause()?;
        tracing::info!("switch-over: paused in {:?}", stop.elapsed());
        self.paused = true;
        or_into(&mut dirty, &self.src.dirty_log()?);
        self.send_pass(&regions, &dirty, pass + 1)?;
        tracing::info!("switch-over: last pass sent at {:?}", stop.elapsed());
        let state = self.src.vm_state()?;
        tracing::info!("switch-over: state ({} bytes) read at {:?}", state.len(), stop.elapsed());
        protocol::write_vm_state(&mut self.out, &state)?;
        if self.params.verify {
            let d = self.src.memory_digest()?;
            protocol::write_verify(&mut self.out, &d)?;
            self.update(|i| i.memory_sha256 = Some(hex(&d)));
        }
        protocol::write_end(&mut self.out, self.entries, self.page_bytes)?;
        self.out.flush().map_err(ProtocolError::from)?;
        tracing::info!("switch-over: end sent at {:?}", stop.elapsed());
        self.update(|_| {});
        // The destination has everything or pulls what its site lacks; then it says whether the
        // guest runs there.
        let mut decoder =
            Decoder::with_params(StreamParams { chunk_size: self.params.chunk_size, digest: self.params.digest });
        loop {
            match decoder.read(&mut self.back) {
                Ok(Some(Record::Verdict { ok: true, .. })) => return Ok(stop.elapsed()),
                Ok(Some(Record::Verdict { ok: false, message })) => return Err(MigrationError::Destination(message)),
                Ok(Some(Record::Pull(list))) => self.serve_pull(&regions, &list)?,
                Ok(Some(other)) => {
                    return Err(MigrationError::Invalid(format!("expected a Verdict, got {}", other.name())))
                }
                Ok(None) => return Err(MigrationError::Destination("closed the connection without a verdict".into())),
                Err(ProtocolError::Io(io)) if is_timeout(&io) => return Err(ProtocolError::Io(io).into()),
                Err(e) => return Err(MigrationError::Destination(e.to_string())),
            }
        }
    }

    /// Waits until the destination has installed everything sent so far, serving the chunks it
    /// pulls meanwhile (the guest still runs).
    fn sync(&mut self, seq: u32, regions: &[Region]) -> Result<(), MigrationError> {
        protocol::write_sync(&mut self.out, seq)?;
        self.out.flush().map_err(ProtocolError::from)?;
        let t = Instant::now();
        let mut decoder =
            Decoder::with_params(StreamParams { chunk_size: self.params.chunk_size, digest: self.params.digest });
        loop {
            self.check_cancel()?;
            match decoder.read(&mut self.back) {
                Ok(Some(Record::SyncAck { seq: s, pending })) if s == seq => {
                    tracing::info!("destination caught up in {:?} ({pending} chunks still waiting)", t.elapsed());
                    return Ok(());
                }
                Ok(Some(Record::SyncAck { .. })) => {}
                Ok(Some(Record::Pull(list))) => self.serve_pull(regions, &list)?,
                Ok(Some(Record::Verdict { ok: false, message })) => return Err(MigrationError::Destination(message)),
                Ok(Some(other)) => {
                    return Err(MigrationError::Invalid(format!("expected a SyncAck, got {}", other.name())))
                }
                Ok(None) => return Err(MigrationError::Destination("closed the connection".into())),
                Err(ProtocolError::Io(io)) if is_timeout(&io) => return Err(ProtocolError::Io(io).into()),
                Err(e) => return Err(MigrationError::Destination(e.to_string())),
            }
        }
    }

    /// Answers a `Pull`: the chunks in full, each checked against the digest the destination
    /// holds for it. While the guest runs, a chunk may have changed since its digest was taken:
    /// it is skipped (the dirty log sends its new content later). Once paused, nothing changes,
    /// and a mismatch is an error.
    fn serve_pull(&mut self, regions: &[Region], list: &[(u64, Vec<u8>)]) -> Result<(), MigrationError> {
        let algo = self
            .params
            .digest
            .algo()
            .ok_or_else(|| MigrationError::Invalid("Pull in a stream without digests".into()))?;
        let chunk = self.params.chunk_size;
        let mut sent = 0u32;
        // Pulled chunks are not part of the stream's own totals (checked at `End`).
        let stream_bytes = self.page_bytes;
        let mut copy = vec![0u8; chunk];
        for (gpa, digest) in list {
            if gpa % chunk as u64 != 0 {
                return Err(MigrationError::Invalid(format!("pull of {gpa:#x}: not a chunk address")));
            }
            locate(regions, *gpa, chunk)?;
            self.src.read_chunk(*gpa, &mut copy)?;
            let bytes = &copy[..];
            if indexd::hash::digest(algo, bytes) != *digest {
                if self.paused {
                    return Err(MigrationError::Invalid(format!(
                        "pull of {gpa:#x}: the paused guest holds other content"
                    )));
                }
                continue;
            }
            self.builder.full(*gpa, bytes);
            sent += 1;
            if self.builder.is_full() {
                self.flush_batch()?;
            }
        }
        self.flush_batch()?;
        self.page_bytes = stream_bytes;
        protocol::write_pull_done(&mut self.out, sent)?;
        self.out.flush().map_err(ProtocolError::from)?;
        let n = sent as u64;
        self.update(|i| i.ram.pulled += n);
        Ok(())
    }

    /// Sends every chunk of the pages set in `dirty`; returns (bytes written, time taken).
    fn send_pass(
        &mut self,
        regions: &[Region],
        dirty: &[Vec<u64>],
        pass: u32,
    ) -> Result<(u64, Duration), MigrationError> {
        let t0 = Instant::now();
        let b0 = self.out.bytes;
        let chunk = self.params.chunk_size;
        let mut group: Vec<u64> = Vec::with_capacity(GROUP);
        let mut window = (Instant::now(), self.out.bytes, 0u64);
        for (region, bits) in regions.iter().zip(dirty) {
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let b = word.trailing_zeros() as usize;
                    word &= word - 1;
                    let page_off = (w * 64 + b) * PAGE_SIZE;
                    if page_off as u64 >= region.len {
                        continue;
                    }
                    for off in (page_off..page_off + PAGE_SIZE).step_by(chunk) {
                        group.push(region.gpa + off as u64);
                    }
                    if group.len() >= GROUP {
                        self.send_group(&group)?;
                        group.clear();
                        if window.0.elapsed() >= Duration::from_millis(100) {
                            let secs = window.0.elapsed().as_secs_f64();
                            let (bytes, pages) = (self.out.bytes - window.1, self.entries - window.2);
                            self.update(|i| {
                                i.ram.mbps = bytes as f64 * 8.0 / secs / 1e6;
                                i.ram.pages_per_second = (pages as f64 / secs) as u64;
                            });
                            window = (Instant::now(), self.out.bytes, self.entries);
                        }
                    }
                }
            }
        }
        self.send_group(&group)?;
        self.flush_batch()?;
        self.out.flush().map_err(ProtocolError::from)?;
        let _ = pass;
        Ok((self.out.bytes - b0, t0.elapsed()))
    }

    /// Copies a group of chunks out of guest memory once, classifies the copies (uniform /
    /// full / digest) and queues them: what is hashed is what is sent.
    fn send_group(&mut self, group: &[u64]) -> Result<(), MigrationError> {
        self.check_cancel()?;
        let chunk = self.params.chunk_size;
        let mut copies = std::mem::take(&mut self.copies);
        copies.resize(group.len() * chunk, 0);
        for (&gpa, buf) in group.iter().zip(copies.chunks_exact_mut(chunk)) {
            self.src.read_chunk(gpa, buf)?;
        }
        let r = self.queue_group(group, &copies);
        self.copies = copies;
        r
    }

    /// Queues the chunks at `group` whose copies are `copies` (one chunk after the other).
    fn queue_group(&mut self, group: &[u64], copies: &[u8]) -> Result<(), MigrationError> {
        let chunk = self.params.chunk_size;
        let mut others: Vec<(u64, &[u8])> = Vec::with_capacity(group.len());
        let mut uniform = 0u64;
        let mut uniforms = Vec::new();
        for (&gpa, bytes) in group.iter().zip(copies.chunks_exact(chunk)) {
            match uniform_byte(bytes) {
                Some(b) => {
                    uniforms.push((gpa, b));
                    uniform += 1;
                }
                None => others.push((gpa, bytes)),
            }
        }
        let decisions = if others.is_empty() { Vec::new() } else { self.dedup.decide(&others)? };
        let (mut full, mut dedup) = (0u64, 0u64);
        for (gpa, b) in uniforms {
            self.builder.uniform(gpa, b);
            self.entries += 1;
            if self.builder.is_full() {
                self.flush_batch()?;
            }
        }
        for ((gpa, bytes), d) in others.iter().zip(decisions) {
            match d {
                Some(digest) => {
                    self.builder.digest(*gpa, &digest);
                    dedup += 1;
                }
                None => {
                    self.builder.full(*gpa, bytes);
                    full += 1;
                }
            }
            self.entries += 1;
            if self.builder.is_full() {
                self.flush_batch()?;
            }
        }
        let per_page = (PAGE_SIZE / chunk) as u64;
        self.update(|i| {
            i.ram.duplicate += uniform / per_page;
            i.ram.normal += full / per_page;
            i.ram.normal_bytes += full * chunk as u64;
            i.ram.deduplicated += dedup;
            i.ram.remaining = i.ram.remaining.saturating_sub((group.len() * chunk) as u64);
        });
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), MigrationError> {
        flush_batch(
            &mut self.builder,
            &mut self.out,
            self.params.max_bandwidth,
            &mut self.next_send,
            &mut self.page_bytes,
        )
    }
}

/// Writes the current batch as a record, keeping the rate under `max_bandwidth` (a leaky
/// bucket: each record leaves once the previous ones have drained at that rate).
fn flush_batch<W: Write>(
    builder: &mut PagesBuilder,
    out: &mut Counting<BufWriter<W>>,
    max_bandwidth: Option<u64>,
    next_send: &mut Instant,
    page_bytes: &mut u64,
) -> Result<(), MigrationError> {
    let n = builder.flush(out)?;
    *page_bytes += n as u64;
    if let Some(rate) = max_bandwidth.filter(|&r| r > 0) {
        let now = Instant::now();
        *next_send = (*next_send).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
        if *next_send > now {
            // The buffered writer must not hold the record back while we wait.
            out.flush().map_err(ProtocolError::from)?;
            std::thread::sleep(*next_send - now);
        }
    }
    Ok(())
}

/// What the engine needs from the destination VMM.
pub trait Sink {
    /// Creates guest memory for `regions` (from `Hello` and `MemoryLayout`). It must be
    /// zero-filled: zero chunks are written only over chunks written before.
    fn prepare(&mut self, hello: &Hello, regions: &[Region]) -> Result<(), EndpointError>;
    /// Writes `data` to guest memory at `gpa` (inside one region). The guest does not run yet,
    /// but other threads (a peer server) may read the memory meanwhile.
    fn write_chunk(&mut self, gpa: u64, data: &[u8]) -> Result<(), EndpointError>;
    /// Fills `len` bytes of guest memory at `gpa` with `byte`.
    fn fill_chunk(&mut self, gpa: u64, byte: u8, len: usize) -> Result<(), EndpointError> {
        self.write_chunk(gpa, &vec![byte; len])
    }
    /// A chunk was installed at `gpa`: `Some(bytes)` for content that arrived in full (or was
    /// pulled), `None` for a uniform chunk. (Content indexes keep track here.)
    fn on_write(&mut self, _gpa: u64, _data: Option<&[u8]>) {}
    /// Digest-only chunks `(address, digest)`: install those whose content can be found (this
    /// VM's memory, peers) and remove them from `batch`; the rest wait. The default finds none.
    fn resolve(&mut self, _batch: &mut Vec<(u64, Vec<u8>)>) -> Result<(), EndpointError> {
        Ok(())
    }
    /// End of a record: a good moment to push batched index updates.
    fn flush(&mut self) {}
    /// Everything has arrived: restore vCPU, VM and device state; do not run yet.
    fn restore(&mut self, state: &[u8]) -> Result<(), EndpointError>;
    /// Starts the guest (after the source was told).
    fn start(&mut self) -> Result<(), EndpointError>;
    /// SHA-256 of all guest memory in address order, before the guest runs.
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError>;
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
}

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
        ReceiveOptions { wait: Duration::from_millis(500), paused_wait: Duration::ZERO, pull: true, cancelled: None }
    }
}

/// Receives a migration on `input`, answering on `answer`. The guest starts only after every
/// chunk is in place, the state restored and the source told so.
pub fn receive<S: Sink, R: Read, W: Write>(sink: &mut S, input: R, answer: W) -> Result<ReceiveStats, MigrationError> {
    receive_with(sink, input, answer, ReceiveOptions::default())
}

/// [`receive`] with options.
pub fn receive_with<S: Sink, R: Read, W: Write>(
    sink: &mut S,
    input: R,
    mut answer: W,
    opts: ReceiveOptions,
) -> Result<ReceiveStats, MigrationError> {
    match receive_inner(sink, input, &mut answer, opts) {
        Ok(mut stats) => {
            protocol::write_verdict(&mut answer, true, "running")?;
            answer.flush().map_err(ProtocolError::from)?;
            let t = Instant::now();
            sink.start()?;
            stats.total_ms += t.elapsed().as_millis() as u64;
            Ok(stats)
        }
        Err(e) => {
            let _ = protocol::write_verdict(&mut answer, false, &e.to_string());
            let _ = answer.flush();
            Err(e)
        }
    }
}

/// Tries the waiting digests again; counts what got resolved.
fn retry_pending<S: Sink>(
    sink: &mut S,
    pending: &mut HashMap<u64, Vec<u8>>,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut batch: Vec<(u64, Vec<u8>)> = pending.drain().collect();
    let before = batch.len();
    sink.resolve(&mut batch)?;
    stats.resolved += (before - batch.len()) as u64;
    pending.extend(batch);
    Ok(())
}

fn receive_inner<S: Sink, R: Read, W: Write>(
    sink: &mut S,
    input: R,
    answer: &mut W,
    opts: ReceiveOptions,
) -> Result<ReceiveStats, MigrationError> {
    let start = Instant::now();
    let mut input = std::io::BufReader::with_capacity(4 << 20, input);
    let mut dec = Decoder::new();
    let next = |dec: &mut Decoder, input: &mut std::io::BufReader<R>, what: &str| -> Result<Record, MigrationError> {
        dec.read(input)?.ok_or_else(|| MigrationError::Invalid(format!("stream ended before {what}")))
    };
    let hello = match next(&mut dec, &mut input, "Hello")? {
        Record::Hello(h) => h,
        r => return Err(MigrationError::Invalid(format!("expected Hello, got {}", r.name()))),
    };
    let regions = match next(&mut dec, &mut input, "MemoryLayout")? {
        Record::MemoryLayout(r) => r,
        r => return Err(MigrationError::Invalid(format!("expected MemoryLayout, got {}", r.name()))),
    };
    let total: u64 = regions.iter().map(|r| r.len).sum();
    if total != hello.mem_size || regions.is_empty() {
        return Err(MigrationError::Invalid(format!("layout of {total} bytes for a {}-byte guest", hello.mem_size)));
    }
    sink.prepare(&hello, &regions)?;
    let chunk = hello.chunk_size as usize;
    let mut stats = ReceiveStats { name: hello.name.clone(), ..Default::default() };
    // Chunks written so far, per region. Fresh guest memory is zero: a zero chunk that was
    // never written needs no write at all (and its page is never faulted in).
    let mut written: Vec<Vec<u64>> =
        regions.iter().map(|r| vec![0u64; ((r.len as usize) / chunk).div_ceil(64)]).collect();
    let mut page_bytes = 0u64;
    let mut state = None;
    let mut verify = None;
    // Digest-only chunks whose content was not found yet, by address (a newer write to the
    // address cancels the wait).
    let mut pending: HashMap<u64, Vec<u8>> = HashMap::new();
    let check = |opts: &ReceiveOptions| -> Result<(), MigrationError> {
        if opts.cancelled.is_some_and(|f| f()) {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    };
    loop {
        check(&opts)?;
        match next(&mut dec, &mut input, "End")? {
            Record::Pages(p) => {
                page_bytes += p.payload_len() as u64;
                let mut batch = Vec::new();
                for (gpa, c) in p.iter() {
                    let (ri, off) = locate(&regions, gpa, chunk)?;
                    let (word, bit) = ((off / chunk) / 64, 1u64 << ((off / chunk) % 64));
                    if !pending.is_empty() {
                        pending.remove(&gpa);
                    }
                    match c {
                        Chunk::Full(data) => {
                            sink.write_chunk(gpa, data)?;
                            written[ri][word] |= bit;
                            sink.on_write(gpa, Some(data));
                            stats.full += 1;
                        }
                        Chunk::Uniform(0) if written[ri][word] & bit == 0 => stats.uniform += 1,
                        Chunk::Uniform(b) => {
                            sink.fill_chunk(gpa, b, chunk)?;
                            written[ri][word] |= bit;
                            sink.on_write(gpa, None);
                            stats.uniform += 1;
                        }
                        Chunk::Digest(d) => {
                            // (The decoder refuses digest entries in a plain stream.)
                            written[ri][word] |= bit;
                            batch.push((gpa, d.to_vec()));
                            stats.digest += 1;
                        }
                    }
                    stats.entries += 1;
                }
                if !batch.is_empty() {
                    let before = batch.len();
                    sink.resolve(&mut batch)?;
                    stats.resolved += (before - batch.len()) as u64;
                    pending.extend(batch);
                }
                sink.flush();
            }
            Record::Iteration { pass, .. } => {
                stats.passes = pass;
                retry_pending(sink, &mut pending, &mut stats)?;
            }
            Record::Sync(seq) => {
                // Everything before this is installed. The content still waiting is usually on
                // its way in other VMs' streams (the WAN is shared): wait while it keeps
                // arriving — the guest still runs at the source, so this costs no downtime —
                // and pull what stalls, also before the source pauses.
                wait_for_site(sink, &mut pending, &mut stats, &opts, &check)?;
                if !pending.is_empty() && opts.pull {
                    pull(
                        sink,
                        &mut dec,
                        &mut input,
                        answer,
                        &regions,
                        chunk,
                        hello.digest,
                        std::mem::take(&mut pending),
                        &mut stats,
                        true,
                    )?;
                }
                protocol::write_sync_ack(answer, seq, pending.len() as u64)?;
                answer.flush().map_err(ProtocolError::from)?;
            }
            Record::VmState(s) => state = Some(s),
            Record::Verify(d) => verify = Some(d),
            Record::End { entries, page_bytes: pb } => {
                if entries != stats.entries || pb != page_bytes {
                    return Err(MigrationError::Invalid(format!(
                        "source sent {entries} entries in {pb} bytes, {} entries in {page_bytes} bytes arrived",
                        stats.entries
                    )));
                }
                break;
            }
            r => return Err(MigrationError::Invalid(format!("unexpected {} record", r.name()))),
        }
    }
    let state = state.ok_or_else(|| MigrationError::Invalid("no VmState before End".into()))?;
    // Chunks still waiting (from the last pass): look at the site once more (briefly: the guest
    // is paused), then pull what is left from the paused source.
    wait_for_site(sink, &mut pending, &mut stats, &ReceiveOptions { wait: opts.paused_wait, ..opts }, &check)?;
    if !pending.is_empty() {
        if !opts.pull {
            return Err(MigrationError::Invalid(format!(
                "{} chunks were sent as digests but no hypervisor of the site holds them, and pulling from the source is off",
                pending.len()
            )));
        }
        pull(sink, &mut dec, &mut input, answer, &regions, chunk, hello.digest, pending, &mut stats, false)?;
    }
    if let Some(expected) = verify {
        let got = sink.memory_digest()?;
        stats.memory_sha256 = Some(hex(&got));
        if got != expected {
            return Err(MigrationError::Invalid(format!(
                "memory digest mismatch: source {}, destination {}",
                hex(&expected),
                hex(&got)
            )));
        }
    }
    sink.restore(&state)?;
    // Last chance to say no: after the verdict the guest runs here.
    check(&opts)?;
    stats.total_ms = start.elapsed().as_millis() as u64;
    Ok(stats)
}

/// The region and offset of the chunk at `gpa`, which must lie inside guest memory.
fn locate(regions: &[Region], gpa: u64, chunk: usize) -> Result<(usize, usize), MigrationError> {
    regions
        .iter()
        .enumerate()
        .find(|(_, r)| gpa >= r.gpa && gpa.saturating_add(chunk as u64) <= r.gpa + r.len)
        .map(|(i, r)| (i, (gpa - r.gpa) as usize))
        .ok_or_else(|| MigrationError::Invalid(format!("chunk at {gpa:#x} outside guest memory")))
}

/// Retries the waiting digests for as long as they keep getting resolved; gives up after
/// `opts.wait` without progress.
fn wait_for_site<S: Sink>(
    sink: &mut S,
    pending: &mut HashMap<u64, Vec<u8>>,
    stats: &mut ReceiveStats,
    opts: &ReceiveOptions,
    check: &dyn Fn(&ReceiveOptions) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    let mut left = pending.len();
    let mut progress = Instant::now();
    loop {
        check(opts)?;
        retry_pending(sink, pending, stats)?;
        if opts.wait.is_zero() {
            // One look, no waiting (the guest is paused).
            return Ok(());
        }
        if pending.is_empty() {
            return Ok(());
        }
        if pending.len() < left {
            left = pending.len();
            progress = Instant::now();
        } else if progress.elapsed() >= opts.wait {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asks the source for `pending` and installs its answer, checking every chunk's digest. With
/// `live` (the guest still runs at the source), chunks the source no longer holds are dropped:
/// their new content comes with a later pass.
#[allow(clippy::too_many_arguments)]
fn pull<S: Sink, R: Read, W: Write>(
    sink: &mut S,
    dec: &mut Decoder,
    input: &mut R,
    answer: &mut W,
    regions: &[Region],
    chunk: usize,
    digest: DigestKind,
    pending: HashMap<u64, Vec<u8>>,
    stats: &mut ReceiveStats,
    live: bool,
) -> Result<(), MigrationError> {
    let algo = digest.algo().ok_or_else(|| MigrationError::Invalid("digest entries in a plain stream".into()))?;
    let list: Vec<(u64, Vec<u8>)> = pending.into_iter().collect();
    let mut want: HashMap<u64, Vec<u8>> = HashMap::new();
    for part in list.chunks(4096) {
        protocol::write_pull(answer, part)?;
        want.extend(part.iter().cloned());
    }
    answer.flush().map_err(ProtocolError::from)?;
    let mut got = 0u64;
    let mut dones = 0usize;
    let parts = list.len().div_ceil(4096);
    while dones < parts {
        match dec.read(input)?.ok_or_else(|| MigrationError::Invalid("stream ended during a pull".into()))? {
            Record::Pages(p) => {
                for (gpa, c) in p.iter() {
                    let Chunk::Full(data) = c else {
                        return Err(MigrationError::Invalid("a pulled chunk that is not full".into()));
                    };
                    let expected = want
                        .remove(&gpa)
                        .ok_or_else(|| MigrationError::Invalid(format!("pulled chunk {gpa:#x} was not asked for")))?;
                    if indexd::hash::digest(algo, data) != expected {
                        return Err(MigrationError::Invalid(format!(
                            "pulled chunk {gpa:#x} does not match its digest"
                        )));
                    }
                    locate(regions, gpa, chunk)?;
                    sink.write_chunk(gpa, data)?;
                    sink.on_write(gpa, Some(data));
                    got += 1;
                }
                sink.flush();
            }
            Record::PullDone(_) => dones += 1,
            r => return Err(MigrationError::Invalid(format!("unexpected {} record during a pull", r.name()))),
        }
    }
    if !want.is_empty() && !live {
        return Err(MigrationError::Invalid(format!("{} pulled chunks never arrived", want.len())));
    }
    stats.pulled += got;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A fake guest: memory in a Vec, writes simulated between passes.
    struct FakeVm {
        mem: Vec<u8>,
        dirty: Vec<u64>,
        logging: bool,
        paused: bool,
        resumed: u32,
        /// Pages the "guest" dirties at each dirty-log fetch while running.
        churn: Vec<usize>,
        throttle: u8,
        max_throttle: u8,
    }

    impl FakeVm {
        fn new(pages: usize) -> FakeVm {
            let mut mem = vec![0u8; pages * PAGE_SIZE];
            for p in 0..pages / 2 {
                mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill((p % 251) as u8 + 1);
                mem[p * PAGE_SIZE + 7] = p as u8; // not uniform
            }
            FakeVm {
                mem,
                dirty: vec![0; pages.div_ceil(64)],
                logging: false,
                paused: false,
                resumed: 0,
                churn: vec![],
                throttle: 0,
                max_throttle: 0,
            }
        }
        fn write(&mut self, page: usize, byte: u8) {
            self.mem[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(byte);
            self.mem[page * PAGE_SIZE] ^= 0x55;
            if self.logging {
                self.dirty[page / 64] |= 1 << (page % 64);
            }
        }
    }

    impl Source for FakeVm {
        fn regions(&self) -> Vec<Region> {
            vec![Region { gpa: 0, len: self.mem.len() as u64 }]
        }
        fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), EndpointError> {
            buf.copy_from_slice(&self.mem[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        }
        fn start_dirty_log(&mut self) -> Result<(), EndpointError> {
            self.logging = true;
            Ok(())
        }
        fn stop_dirty_log(&mut self) -> Result<(), EndpointError> {
            self.logging = false;
            Ok(())
        }
        fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, EndpointError> {
            if !self.paused {
                let churn = self.churn.clone();
                for p in churn {
                    self.write(p, 0xee);
                }
            }
            let n = self.dirty.len();
            Ok(vec![std::mem::replace(&mut self.dirty, vec![0; n])])
        }
        fn pause(&mut self) -> Result<(), EndpointError> {
            self.paused = true;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), EndpointError> {
            self.paused = false;
            self.resumed += 1;
            Ok(())
        }
        fn vm_state(&mut self) -> Result<Vec<u8>, EndpointError> {
            Ok(b"state".to_vec())
        }
        fn set_throttle(&mut self, p: u8) {
            self.throttle = p;
            self.max_throttle = self.max_throttle.max(p);
        }
        fn name(&self) -> String {
            "fake".into()
        }
        fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
            Ok(toy_digest(&self.mem))
        }
    }

    /// Not cryptographic; enough to compare two byte strings in tests.
    fn toy_digest(b: &[u8]) -> [u8; 32] {
        let mut d = [0u8; 32];
        for (i, chunk) in b.chunks(32).enumerate() {
            for (j, x) in chunk.iter().enumerate() {
                d[j] = d[j].wrapping_mul(31).wrapping_add(*x ^ i as u8);
            }
        }
        d
    }

    #[derive(Default)]
    struct FakeDest {
        mem: Vec<u8>,
        state: Vec<u8>,
        started: bool,
        /// Simulates a page that arrived wrong.
        corrupt: bool,
        /// Resolve digest-only chunks from this VM's own memory (else they must be pulled).
        resolvable: bool,
        index: HashMap<Vec<u8>, u64>,
    }

    impl Sink for FakeDest {
        fn prepare(&mut self, _: &Hello, regions: &[Region]) -> Result<(), EndpointError> {
            self.mem = vec![0; regions[0].len as usize];
            Ok(())
        }
        fn write_chunk(&mut self, gpa: u64, data: &[u8]) -> Result<(), EndpointError> {
            self.mem[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn on_write(&mut self, gpa: u64, data: Option<&[u8]>) {
            if let Some(d) = data {
                self.index.insert(indexd::hash::digest(indexd::hash::Algo::Sha256, d), gpa);
            }
        }
        fn resolve(&mut self, batch: &mut Vec<(u64, Vec<u8>)>) -> Result<(), EndpointError> {
            if !self.resolvable {
                return Ok(());
            }
            batch.retain(|(gpa, d)| {
                let Some(&src) = self.index.get(d) else { return true };
                let chunk = self.mem[src as usize..src as usize + PAGE_SIZE].to_vec();
                if indexd::hash::digest(indexd::hash::Algo::Sha256, &chunk) != *d {
                    return true;
                }
                self.mem[*gpa as usize..*gpa as usize + PAGE_SIZE].copy_from_slice(&chunk);
                false
            });
            Ok(())
        }
        fn restore(&mut self, state: &[u8]) -> Result<(), EndpointError> {
            self.state = state.to_vec();
            Ok(())
        }
        fn start(&mut self) -> Result<(), EndpointError> {
            self.started = true;
            Ok(())
        }
        fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
            if self.corrupt {
                self.mem[4096 * 3 + 9] ^= 1;
            }
            Ok(toy_digest(&self.mem))
        }
    }

    /// A byte pipe between threads.
    struct Pipe(mpsc::Sender<Vec<u8>>);
    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.send(b.to_vec()).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    struct PipeIn(mpsc::Receiver<Vec<u8>>, Vec<u8>, usize);
    impl Read for PipeIn {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            while self.2 >= self.1.len() {
                match self.0.recv() {
                    Ok(v) => {
                        self.1 = v;
                        self.2 = 0;
                    }
                    Err(_) => return Ok(0),
                }
            }
            let n = buf.len().min(self.1.len() - self.2);
            buf[..n].copy_from_slice(&self.1[self.2..self.2 + n]);
            self.2 += n;
            Ok(n)
        }
    }

    fn run(
        vm: &mut FakeVm,
        params: Params,
    ) -> (Result<MigrationInfo, MigrationError>, Result<FakeDest, MigrationError>) {
        run_to(vm, params, FakeDest::default())
    }

    fn run_to(
        vm: &mut FakeVm,
        params: Params,
        dest: FakeDest,
    ) -> (Result<MigrationInfo, MigrationError>, Result<FakeDest, MigrationError>) {
        run_full(vm, params, dest, NoDedup).map_second()
    }

    trait MapSecond<A, B> {
        fn map_second(self) -> (A, B);
    }
    impl<A, B, C> MapSecond<A, B> for (A, B, C) {
        fn map_second(self) -> (A, B) {
            (self.0, self.1)
        }
    }

    fn run_full<D: Dedup>(
        vm: &mut FakeVm,
        params: Params,
        dest: FakeDest,
        dedup: D,
    ) -> (Result<MigrationInfo, MigrationError>, Result<FakeDest, MigrationError>, ReceiveStats) {
        let (tx, rx) = mpsc::channel();
        let (btx, brx) = mpsc::channel();
        let dest = std::thread::spawn(move || {
            let mut d = dest;
            let opts = ReceiveOptions { wait: Duration::from_millis(100), ..ReceiveOptions::default() };
            match receive_with(&mut d, PipeIn(rx, vec![], 0), Pipe(btx), opts) {
                Ok(s) => (Ok(d), s),
                Err(e) => (Err(e), ReceiveStats::default()),
            }
        });
        let info = Arc::new(Mutex::new(MigrationInfo::default()));
        let r =
            Sender::new(vm, dedup, Pipe(tx), PipeIn(brx, vec![], 0), params, info, Arc::new(AtomicBool::new(false)))
                .run();
        let (d, s) = dest.join().unwrap();
        (r, d, s)
    }

    /// In-memory coordination: the first chunk with a digest goes in full, the others as digests.
    struct SetDedup(std::collections::HashSet<Vec<u8>>);
    impl Dedup for SetDedup {
        fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
            Ok(chunks
                .iter()
                .map(|(_, c)| {
                    let d = indexd::hash::digest(indexd::hash::Algo::Sha256, c);
                    if self.0.insert(d.clone()) {
                        None
                    } else {
                        Some(d)
                    }
                })
                .collect())
        }
    }

    fn duplicated_vm() -> FakeVm {
        let mut vm = FakeVm::new(512);
        // 256 pages of data, but only 16 distinct contents.
        for p in 0..256 {
            let fill = (p % 16) as u8 + 1;
            vm.mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(fill);
            vm.mem[p * PAGE_SIZE + 1] = 0x77;
        }
        vm
    }

    #[test]
    fn duplicates_travel_as_digests_and_are_found_at_the_destination() {
        let mut vm = duplicated_vm();
        vm.churn = vec![300];
        let params = Params { digest: DigestKind::Sha256, verify: true, ..Params::default() };
        let dest = FakeDest { resolvable: true, ..FakeDest::default() };
        let (r, d, stats) = run_full(&mut vm, params, dest, SetDedup(Default::default()));
        let info = r.unwrap();
        assert_eq!(d.unwrap().mem, vm.mem);
        assert!(info.ram.deduplicated >= 240, "{:?}", info.ram);
        assert_eq!(info.ram.pulled, 0);
        assert_eq!(stats.resolved, stats.digest);
        assert_eq!(stats.pulled, 0);
    }

    #[test]
    fn content_nobody_at_the_destination_holds_is_pulled_from_the_source() {
        let mut vm = duplicated_vm();
        let params = Params { digest: DigestKind::Sha256, verify: true, ..Params::default() };
        let dest = FakeDest { resolvable: false, ..FakeDest::default() };
        let (r, d, stats) = run_full(&mut vm, params, dest, SetDedup(Default::default()));
        let info = r.unwrap();
        assert_eq!(d.unwrap().mem, vm.mem, "pulled chunks are in place");
        assert_eq!(info.ram.pulled, info.ram.deduplicated, "{:?}", info.ram);
        assert_eq!(stats.pulled, stats.digest);
        assert_eq!(stats.resolved, 0);
    }

    #[test]
    fn converging_migration_copies_memory_exactly() {
        let mut vm = FakeVm::new(1024);
        vm.churn = vec![3, 5, 700];
        let (r, d) = run(&mut vm, Params::default());
        let info = r.unwrap();
        let d = d.unwrap();
        assert!(d.started);
        assert_eq!(d.state, b"state");
        assert_eq!(d.mem, vm.mem, "destination memory differs");
        assert_eq!(info.status, Status::Completed);
        assert_eq!(info.ram.total, 1024 * 4096);
        assert!(info.ram.duplicate >= 512, "zero pages are uniform: {:?}", info.ram);
        assert!(info.ram.normal >= 512);
        assert!(info.ram.transferred > info.ram.normal_bytes);
        assert!(info.downtime.is_some());
        assert_eq!(vm.resumed, 0, "a completed migration never resumes the source");
    }

    #[test]
    fn verified_migrations_compare_memory_digests() {
        let mut vm = FakeVm::new(256);
        vm.churn = vec![1, 2];
        let (r, d) = run(&mut vm, Params { verify: true, ..Params::default() });
        let info = r.unwrap();
        assert_eq!(info.memory_sha256.as_deref(), Some(hex(&toy_digest(&vm.mem)).as_str()));
        assert!(d.unwrap().started);
        // A destination whose memory came out different refuses, and the source resumes.
        let mut vm = FakeVm::new(256);
        let (r, d) = run_to(
            &mut vm,
            Params { verify: true, ..Params::default() },
            FakeDest { corrupt: true, ..FakeDest::default() },
        );
        let e = r.unwrap_err().to_string();
        assert!(e.contains("memory digest mismatch"), "{e}");
        assert!(d.is_err());
        assert!(!vm.paused, "source resumed");
        assert_eq!(vm.resumed, 1);
    }

    #[test]
    fn a_refusing_destination_resumes_the_source() {
        struct Refuse;
        impl Sink for Refuse {
            fn prepare(&mut self, _: &Hello, _: &[Region]) -> Result<(), EndpointError> {
                Err(EndpointError::failed("prepare", "no room for this guest"))
            }
            fn write_chunk(&mut self, _: u64, _: &[u8]) -> Result<(), EndpointError> {
                unreachable!()
            }
            fn restore(&mut self, _: &[u8]) -> Result<(), EndpointError> {
                Ok(())
            }
            fn start(&mut self) -> Result<(), EndpointError> {
                Ok(())
            }
            fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
                Ok([0; 32])
            }
        }
        let mut vm = FakeVm::new(64);
        let (tx, rx) = mpsc::channel();
        let (btx, brx) = mpsc::channel();
        let dest = std::thread::spawn(move || receive(&mut Refuse, PipeIn(rx, vec![], 0), Pipe(btx)));
        let info = Arc::new(Mutex::new(MigrationInfo::default()));
        let r = Sender::new(
            &mut vm,
            NoDedup,
            Pipe(tx),
            PipeIn(brx, vec![], 0),
            Params::default(),
            info.clone(),
            Arc::new(AtomicBool::new(false)),
        )
        .run();
        assert!(dest.join().unwrap().is_err());
        let e = r.unwrap_err().to_string();
        assert!(e.contains("no room for this guest"), "{e}");
        assert_eq!(info.lock().unwrap().status, Status::Failed);
        assert!(!vm.paused);
        assert!(!vm.logging, "dirty logging off again");
    }

    #[test]
    fn no_convergence_is_reported_not_hung() {
        let mut vm = FakeVm::new(256);
        vm.churn = (0..256).collect();
        let params = Params { max_iterations: Some(4), downtime_limit: Duration::from_nanos(1), ..Params::default() };
        let (r, d) = run(&mut vm, params);
        let e = r.unwrap_err();
        assert!(matches!(e, MigrationError::NoConvergence { iterations: 4, .. }), "{e}");
        assert!(d.is_err(), "destination sees the stream end early");
        assert!(!vm.paused);
    }

    #[test]
    fn auto_converge_throttles_a_busy_guest() {
        let mut vm = FakeVm::new(256);
        vm.churn = (0..256).collect();
        let params = Params {
            max_iterations: Some(6),
            auto_converge: true,
            downtime_limit: Duration::from_nanos(1),
            ..Params::default()
        };
        let _ = run(&mut vm, params);
        // Two strikes per step: 20 % after pass 2, 30 % after pass 4, 40 % after pass 6.
        assert_eq!(vm.max_throttle, 40, "throttle steps of QEMU's policy");
        assert_eq!(vm.throttle, 0, "throttle released after the migration");
    }

    /// Copies what passes through into a shared buffer.
    struct Tee(Pipe, Arc<Mutex<Vec<u8>>>);
    impl Write for Tee {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.lock().unwrap().extend_from_slice(b);
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_truncated_stream_fails_cleanly_at_the_destination() {
        // Record a complete migration's stream.
        let full = Arc::new(Mutex::new(Vec::new()));
        {
            let mut vm = FakeVm::new(64);
            let (tx, rx) = mpsc::channel();
            let (btx, brx) = mpsc::channel();
            let dest = std::thread::spawn(move || receive(&mut FakeDest::default(), PipeIn(rx, vec![], 0), Pipe(btx)));
            let info = Arc::new(Mutex::new(MigrationInfo::default()));
            Sender::new(
                &mut vm,
                NoDedup,
                Tee(Pipe(tx), full.clone()),
                PipeIn(brx, vec![], 0),
                Params::default(),
                info,
                Arc::new(AtomicBool::new(false)),
            )
            .run()
            .unwrap();
            dest.join().unwrap().unwrap();
        }
        let full = full.lock().unwrap().clone();
        for cut in [0, 10, full.len() / 2, full.len() - 1] {
            let mut d = FakeDest::default();
            let mut answer = Vec::new();
            let e = receive(&mut d, &full[..cut], &mut answer).unwrap_err();
            assert!(!d.started, "cut at {cut}: guest started");
            let _ = e;
            // The answer ends with a failed verdict (after any SyncAck).
            let mut dec = Decoder::new();
            let mut r = &answer[..];
            let mut last = None;
            while let Ok(Some(rec)) = dec.read(&mut r) {
                last = Some(rec);
            }
            assert!(matches!(last, Some(Record::Verdict { ok: false, .. })), "cut at {cut}: {last:?}");
        }
        let mut d = FakeDest::default();
        receive(&mut d, &full[..], Vec::new()).unwrap();
        assert!(d.started);
    }
}
