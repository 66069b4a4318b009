//! The sending side: [`Sender`] runs a migration from the source VMM ([`Source`]) to the
//! stream. Passes over the dirty log (each chunk copied out of guest memory once, classified
//! uniform / full / digest, batched into `Pages` records), the convergence decisions of
//! [`policy`](super::policy) after each, one sync with the destination, the switch-over
//! (pause, last pass, VM state, `End`), the chunks the destination pulls, and its verdict.

use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::layout::{count_bits, locate, or_into};
use super::policy::{self, Next, Throttle};
use super::rate::{flush_batch, RateLimiter};
use super::{hex, Dedup, DiskStats, MigrationError, MigrationInfo, Params, Source, Status, PAGE_SIZE};
use crate::protocol::{
    self, is_disk, uniform_byte, Decoder, Hello, PagesBuilder, ProtocolError, Record, Region, StreamParams, DISK_SPACE,
};

/// Target size of one `Pages` record.
const BATCH_BYTES: usize = 1 << 20;
/// Chunks classified together (one dedup round trip for the whole group).
const GROUP: usize = 1024;

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
    /// Auto-converge: the vCPU throttle and the strikes towards its next step.
    throttle: Throttle,
    /// Leaky bucket of the bandwidth cap.
    rate: RateLimiter,
    /// Bytes and time spent sending passes (for the bandwidth estimate).
    pass_bytes: u64,
    pass_time: Duration,
    /// The copies of the chunk group being sent (reused from group to group).
    copies: Vec<u8>,
}

/// Whether a socket error is a read or write timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` give
/// `EAGAIN`).
fn is_timeout(e: &std::io::Error) -> bool {
    // `WouldBlock`: a socket timeout of ours ran out. `TimedOut`: TCP's own verdict, which the
    // VMM ties to the same timeout (`TCP_USER_TIMEOUT`: data unacknowledged for that long).
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
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
        let cap = params.bandwidth_cap();
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
            throttle: Throttle::default(),
            rate: RateLimiter::new(cap, Instant::now()),
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
        let result = self.migrate().map_err(|e| self.stalled(e)).map_err(|e| self.explained(e));
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

    /// A stream the destination closed (it refused the migration, and said why on the back
    /// channel before closing) as the destination's reason; other errors as they are.
    fn explained(&mut self, e: MigrationError) -> MigrationError {
        let closed = matches!(&e, MigrationError::Protocol(ProtocolError::Io(io))
            if matches!(io.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset));
        if !closed {
            return e;
        }
        match Decoder::new().read(&mut self.back) {
            Ok(Some(Record::Verdict { ok: false, message })) => MigrationError::Destination(message),
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
        let total: u64 = regions.iter().filter(|r| !is_disk(r)).map(|r| r.len).sum();
        let disk_total: u64 = regions.iter().filter(|r| is_disk(r)).map(|r| r.len).sum();
        let disks = self.src.disks()?;
        if disks.len() != regions.iter().filter(|r| is_disk(r)).count() {
            return Err(MigrationError::Invalid(format!("{} disks for the disk regions of {regions:x?}", disks.len())));
        }
        self.update(|i| {
            i.status = Status::Setup;
            i.ram.total = total;
            if !disks.is_empty() {
                i.disk = Some(DiskStats { total: disk_total, ..Default::default() });
            }
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
        let held = if disks.is_empty() { Vec::new() } else { self.repository(&disks)? };
        self.src.start_dirty_log()?;
        let setup = self.start.elapsed().as_millis() as u64;
        self.update(|i| {
            i.status = Status::Active;
            i.setup_time = setup;
        });

        // Pass 1: all memory, and the blocks of each disk the destination does not have yet.
        // Later passes: what the guest wrote meanwhile.
        let mut dirty = self.src.first_pass(&regions, &held)?;
        if dirty.len() != regions.len() {
            return Err(MigrationError::Invalid(format!(
                "first pass of {} regions for {}",
                dirty.len(),
                regions.len()
            )));
        }
        let mut pass = 0u32;
        let mut last_sync = Instant::now();
        let mut synced = false;
        loop {
            pass += 1;
            let (sent, took) = self.send_pass(&regions, &dirty)?;
            dirty = self.src.dirty_log()?;
            let period = last_sync.elapsed().as_secs_f64().max(1e-3);
            last_sync = Instant::now();
            // Dirty disk blocks count with dirty memory: both must cross before the switch-over.
            let dirty_bytes = count_bits(&dirty) * PAGE_SIZE as u64;
            let disk_dirty = disk_bits(&regions, &dirty) * PAGE_SIZE as u64;
            // Bandwidth of the link, measured over every pass so far (see `policy`).
            self.pass_bytes += sent;
            self.pass_time += took;
            let bandwidth = policy::bandwidth(self.pass_bytes, self.pass_time, self.params.bandwidth_cap());
            let threshold = policy::switch_over_threshold(bandwidth, self.params.downtime_limit);
            let expected = policy::expected_downtime(dirty_bytes, bandwidth);
            self.update(|i| {
                i.ram.dirty_sync_count = pass as u64;
                i.ram.remaining = dirty_bytes - disk_dirty;
                if let Some(d) = i.disk.as_mut() {
                    d.remaining = disk_dirty;
                }
                i.ram.dirty_pages_rate = ((dirty_bytes / PAGE_SIZE as u64) as f64 / period) as u64;
                i.expected_downtime = (expected * 1e3) as u64;
            });
            protocol::write_iteration(&mut self.out, pass, dirty_bytes)?;
            match policy::after_pass(dirty_bytes, threshold, synced) {
                Next::SwitchOver => break,
                Next::Sync => {
                    // The source is ready; is the destination? It may still be installing what
                    // the socket buffers hold, or waiting for content other hosts of its site
                    // are receiving. Pausing now would add that to the downtime: let it catch up
                    // while the guest still runs, then decide again on a fresh dirty log.
                    self.sync(pass, &regions)?;
                    synced = true;
                    or_into(&mut dirty, &self.src.dirty_log()?);
                    let dirty_bytes = count_bits(&dirty) * PAGE_SIZE as u64;
                    if policy::can_switch_over(dirty_bytes, threshold) {
                        break;
                    }
                    continue;
                }
                Next::Continue => {}
            }
            if self.params.auto_converge {
                // QEMU: every second pass dirtying more than half of what it sent steps the
                // throttle up.
                let (throttle, step) = policy::auto_converge(self.throttle, dirty_bytes, sent);
                self.throttle = throttle;
                if let Some(t) = step {
                    self.src.set_throttle(t);
                    self.update(|i| i.cpu_throttle_percentage = t);
                }
            }
            if policy::out_of_iterations(pass, self.params.max_iterations) {
                return Err(policy::no_convergence(pass, dirty_bytes, period, bandwidth));
            }
        }

        // Switch over.
        self.check_cancel()?;
        let stop = Instant::now();
        self.src.pause()?;
        tracing::info!("switch-over: paused in {:?}", stop.elapsed());
        self.paused = true;
        or_into(&mut dirty, &self.src.dirty_log()?);
        self.send_pass(&regions, &dirty)?;
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
                Ok(Some(Record::Verdict { ok: true, .. })) => {
                    // The guest stops here for good: the destination may start it. Had this
                    // write failed, no `Commit` would reach the destination, which then never
                    // starts the guest, and the guest resumes here.
                    protocol::write_commit(&mut self.out)?;
                    self.out.flush().map_err(ProtocolError::from)?;
                    return Ok(stop.elapsed());
                }
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

    /// Sends the VM's disks and reads the destination's answer: per disk, whether its disk there
    /// starts as this one's base layer (then only this disk's own blocks travel).
    fn repository(&mut self, disks: &[protocol::DiskInfo]) -> Result<Vec<bool>, MigrationError> {
        protocol::write_disks(&mut self.out, disks)?;
        self.out.flush().map_err(ProtocolError::from)?;
        let mut decoder = Decoder::new();
        let (held, message) = match decoder.read(&mut self.back) {
            Ok(Some(Record::Repository { held, message })) if held.len() == disks.len() => (held, message),
            Ok(Some(Record::Verdict { ok: false, message })) => return Err(MigrationError::Destination(message)),
            Ok(Some(other)) => {
                return Err(MigrationError::Invalid(format!("expected a Repository answer, got {}", other.name())))
            }
            Ok(None) => return Err(MigrationError::Destination("closed the connection".into())),
            Err(ProtocolError::Io(io)) if is_timeout(&io) => return Err(ProtocolError::Io(io).into()),
            Err(e) => return Err(MigrationError::Destination(e.to_string())),
        };
        if !message.is_empty() {
            tracing::warn!("destination: {message}");
        }
        self.dedup.repository(held.first().copied().unwrap_or(false) && disks[0].base.is_some());
        self.update(|i| {
            if let Some(d) = i.disk.as_mut() {
                d.held = held.clone();
                d.warning = (!message.is_empty()).then(|| message.clone());
            }
        });
        Ok(held)
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
    fn send_pass(&mut self, regions: &[Region], dirty: &[Vec<u64>]) -> Result<(u64, Duration), MigrationError> {
        let t0 = Instant::now();
        let b0 = self.out.bytes;
        let chunk = self.params.chunk_size;
        let mut group: Vec<u64> = Vec::with_capacity(GROUP);
        let mut window = (Instant::now(), self.out.bytes, 0u64);
        for (region, bits) in regions.iter().zip(dirty) {
            // Groups stay within one region (memory and disk are counted apart).
            self.send_group(&group)?;
            group.clear();
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
        let (mut full, mut dedup, mut compressed, mut saved) = (0u64, 0u64, 0u64, 0u64);
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
                    match protocol::compress(bytes).filter(|_| self.params.compress) {
                        Some(c) => {
                            self.builder.compressed(*gpa, &c);
                            compressed += 1;
                            saved += (chunk - 4 - c.len()) as u64;
                        }
                        None => self.builder.full(*gpa, bytes),
                    }
                    full += 1;
                }
            }
            self.entries += 1;
            if self.builder.is_full() {
                self.flush_batch()?;
            }
        }
        let per_page = (PAGE_SIZE / chunk) as u64;
        let on_disk = group.first().is_some_and(|&a| a >= DISK_SPACE);
        let digest_len = self.params.digest.digest_len() as u64;
        self.update(|i| {
            i.ram.compressed += compressed;
            i.ram.compression_saved_bytes += saved;
        });
        self.update(|i| match i.disk.as_mut().filter(|_| on_disk) {
            // (A group never mixes memory and disk: each region is sent on its own.)
            Some(d) => {
                d.duplicate += uniform;
                d.normal += full;
                d.deduplicated += dedup;
                d.transferred += uniform * 9 + full * (8 + chunk as u64) + dedup * (8 + digest_len) - saved;
                d.remaining = d.remaining.saturating_sub((group.len() * chunk) as u64);
            }
            None => {
                i.ram.duplicate += uniform / per_page;
                i.ram.normal += full / per_page;
                i.ram.normal_bytes += full * chunk as u64;
                i.ram.deduplicated += dedup;
                i.ram.remaining = i.ram.remaining.saturating_sub((group.len() * chunk) as u64);
            }
        });
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), MigrationError> {
        flush_batch(&mut self.builder, &mut self.out, &mut self.rate, &mut self.page_bytes)
    }
}

/// Pages set in the disk regions' bitmaps.
fn disk_bits(regions: &[Region], maps: &[Vec<u64>]) -> u64 {
    regions.iter().zip(maps).filter(|(r, _)| is_disk(r)).map(|(_, m)| count_bits(std::slice::from_ref(m))).sum()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::super::testutil::{run, run_to, toy_digest, FakeDest, FakeVm, Pipe, PipeIn};
    use super::super::{
        hex, receive, EndpointError, MigrationError, MigrationInfo, NoDedup, Params, Sender, Sink, Status,
    };
    use crate::protocol::{Hello, Region};

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
}
