//! The receiving side: [`receive_with`] takes a migration off the stream into the destination
//! VMM ([`Sink`]). It installs chunks as they arrive (full ones written, uniform ones filled
//! — zero ones skipped where memory was never written —, digest-only ones resolved at the site
//! or put on the waiting list), waits at `Sync` for the site to deliver what is missing and
//! pulls the rest from the source, checks the stream's own totals and the memory digest at
//! `End`, restores the VM, answers the verdict, and only then starts the guest.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::layout::locate;
use super::{hex, MigrationError, ReceiveOptions, ReceiveStats, Sink};
use crate::protocol::{
    self, disk_addr, is_disk, Chunk, Decoder, DigestKind, ProtocolError, Record, Region, DISK_SPACE,
};
use crate::shrinker::policy::{site_wait, SiteWait};

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
    // One buffer for the whole stream: the `Commit` after the verdict is read from it too.
    let mut input = std::io::BufReader::with_capacity(4 << 20, input);
    match receive_inner(sink, &mut input, &mut answer, opts) {
        Ok(mut stats) => {
            protocol::write_verdict(&mut answer, true, "ready")?;
            answer.flush().map_err(ProtocolError::from)?;
            // Only the source's `Commit` hands the guest over: a source that gave up meanwhile
            // has resumed its own copy and closed the connection.
            match Decoder::new().read(&mut input) {
                Ok(Some(Record::Commit)) => {}
                Ok(Some(other)) => {
                    return Err(MigrationError::Invalid(format!("expected a Commit, got {}", other.name())))
                }
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        _ => "the connection closed".into(),
                    };
                    return Err(MigrationError::Invalid(format!(
                        "the source did not commit the switch-over ({why}): the guest was not started here"
                    )));
                }
            }
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
    input: &mut std::io::BufReader<R>,
    answer: &mut W,
    opts: ReceiveOptions,
) -> Result<ReceiveStats, MigrationError> {
    let start = Instant::now();
    let mut dec = Decoder::new();
    let next = |dec: &mut Decoder, input: &mut std::io::BufReader<R>, what: &str| -> Result<Record, MigrationError> {
        dec.read(input)?.ok_or_else(|| MigrationError::Invalid(format!("stream ended before {what}")))
    };
    let hello = match next(&mut dec, input, "Hello")? {
        Record::Hello(h) => h,
        r => return Err(MigrationError::Invalid(format!("expected Hello, got {}", r.name()))),
    };
    let regions = match next(&mut dec, input, "MemoryLayout")? {
        Record::MemoryLayout(r) => r,
        r => return Err(MigrationError::Invalid(format!("expected MemoryLayout, got {}", r.name()))),
    };
    let total: u64 = regions.iter().filter(|r| !is_disk(r)).map(|r| r.len).sum();
    if total != hello.mem_size || regions.is_empty() {
        return Err(MigrationError::Invalid(format!("layout of {total} bytes for a {}-byte guest", hello.mem_size)));
    }
    let disk_regions: Vec<&Region> = regions.iter().filter(|r| is_disk(r)).collect();
    if regions.iter().skip_while(|r| !is_disk(r)).any(|r| !is_disk(r))
        || disk_regions.iter().enumerate().any(|(i, r)| r.gpa != disk_addr(i, 0))
    {
        return Err(MigrationError::Invalid(format!("disk regions out of order in {regions:x?}")));
    }
    sink.prepare(&hello, &regions)?;
    if !disk_regions.is_empty() {
        let disks = match next(&mut dec, input, "Disks")? {
            Record::Disks(d) => d,
            r => return Err(MigrationError::Invalid(format!("expected Disks, got {}", r.name()))),
        };
        if disks.len() != disk_regions.len() || disks.iter().zip(&disk_regions).any(|(d, r)| d.size != r.len) {
            return Err(MigrationError::Invalid("Disks does not match the disk regions of MemoryLayout".into()));
        }
        let (held, message) = sink.disks(&disks)?;
        protocol::write_repository(answer, &held, &message)?;
        answer.flush().map_err(ProtocolError::from)?;
    }
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
        match next(&mut dec, input, "End")? {
            Record::Pages(p) => {
                page_bytes += p.payload_len() as u64;
                let mut batch = Vec::new();
                for (gpa, c) in p.iter() {
                    let (ri, off) = locate(&regions, gpa, chunk)?;
                    let (word, bit) = ((off / chunk) / 64, 1u64 << ((off / chunk) % 64));
                    let on_disk = gpa >= DISK_SPACE;
                    if !pending.is_empty() {
                        pending.remove(&gpa);
                    }
                    let unpacked;
                    let c = match c {
                        Chunk::Compressed(z) => {
                            unpacked = protocol::decompress(z, chunk)?;
                            stats.compressed += 1;
                            Chunk::Full(&unpacked)
                        }
                        c => c,
                    };
                    match c {
                        Chunk::Full(data) => {
                            sink.write_chunk(gpa, data)?;
                            written[ri][word] |= bit;
                            sink.on_write(gpa, Some(data));
                            stats.full += 1;
                            stats.disk_full += on_disk as u64;
                        }
                        Chunk::Compressed(_) => return Err(MigrationError::Invalid("a chunk compressed twice".into())),
                        // Fresh memory is zero; a disk block is whatever its base holds.
                        Chunk::Uniform(0) if !on_disk && written[ri][word] & bit == 0 => stats.uniform += 1,
                        Chunk::Uniform(b) => {
                            sink.fill_chunk(gpa, b, chunk)?;
                            written[ri][word] |= bit;
                            sink.on_write(gpa, None);
                            stats.uniform += 1;
                            stats.disk_uniform += on_disk as u64;
                        }
                        Chunk::Digest(d) => {
                            // (The decoder refuses digest entries in a plain stream.)
                            written[ri][word] |= bit;
                            batch.push((gpa, d.to_vec()));
                            stats.digest += 1;
                            stats.disk_digest += on_disk as u64;
                        }
                    }
                    stats.entries += 1;
                    stats.disk_entries += on_disk as u64;
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
                        input,
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
        pull(sink, &mut dec, input, answer, &regions, chunk, hello.digest, pending, &mut stats, false)?;
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

/// Retries the waiting digests for as long as they keep getting resolved; gives up after
/// `opts.wait` without progress (the decision is [`site_wait`]'s).
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
        match site_wait(opts.wait, left, pending.len(), progress.elapsed()) {
            // Everything found, or what is left is pulled (a zero wait: one look, the guest is
            // paused).
            SiteWait::Resolved | SiteWait::Pull => return Ok(()),
            SiteWait::Progress => {
                left = pending.len();
                progress = Instant::now();
            }
            SiteWait::Wait => {}
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
                    sink.on_write_verified(gpa, data, &expected);
                    got += 1;
                    stats.disk_pulled += (gpa >= DISK_SPACE) as u64;
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
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    use super::super::testutil::{duplicated_vm, run_full, DiskVm, FakeDest, FakeVm, Pipe, PipeIn, SetDedup, Tee};
    use super::super::{receive, MigrationInfo, NoDedup, Params, Sender};
    use crate::protocol::{Decoder, DigestKind, Record};

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
    fn disks_send_their_own_blocks_and_what_the_guest_writes_or_everything_when_not_held() {
        let base: Vec<u8> = (0..64 * 4096usize).map(|i| ((i * 7 + i / 4096) % 251) as u8 + 1).collect();
        // Blocks 3 and 4 rewritten, block 10 zeroed (over non-zero base content).
        for held in [true, false] {
            let mut vm = DiskVm::new(FakeVm::new(64), &base, &[(3, 0x11), (4, 0x22), (10, 0)]);
            vm.churn = vec![20];
            let dest = FakeDest { base: held.then(|| base.clone()), ..FakeDest::default() };
            let (r, d, stats) = run_full(&mut vm, Params::default(), dest, NoDedup);
            let info = r.unwrap();
            let d = d.unwrap();
            assert_eq!(vm.held, vec![held]);
            assert_eq!(d.disk, vm.top, "held={held}: the destination's disk is the source's");
            let disk = info.disk.unwrap();
            assert_eq!(disk.held, vec![held]);
            assert_eq!(disk.total, 64 * 4096);
            // Held: the 3 own blocks, then block 20 each pass; not held: all 64 blocks first.
            let first = if held { 3 } else { 64 };
            assert!(
                stats.disk_entries > first && stats.disk_entries <= first + 1 + u64::from(stats.passes),
                "{stats:?}"
            );
            assert_eq!(disk.warning.is_some(), !held);
            assert!(stats.disk_uniform >= 1, "the zeroed block travels as uniform and is written: {stats:?}");
        }
    }

    #[test]
    fn full_chunks_travel_compressed_when_it_pays() {
        let mut vm = FakeVm::new(256);
        // Half the pages are random: they do not compress, and go as they are.
        let mut x = 0x9e3779b97f4a7c15u64;
        for b in vm.mem[64 * 4096..128 * 4096].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let plain = run_full(&mut FakeVm::new(256), Params::default(), FakeDest::default(), NoDedup).0.unwrap();
        let (r, d, stats) =
            run_full(&mut vm, Params { compress: true, ..Params::default() }, FakeDest::default(), NoDedup);
        let info = r.unwrap();
        assert_eq!(d.unwrap().mem, vm.mem, "what was compressed arrives as it was");
        assert!(info.ram.compressed >= 60 && info.ram.compressed < 128, "{:?}", info.ram);
        assert_eq!(stats.compressed, info.ram.compressed);
        assert!(info.ram.compression_saved_bytes > 60 * 3500, "{:?}", info.ram);
        assert!(info.ram.transferred < plain.ram.transferred, "{} vs {}", info.ram.transferred, plain.ram.transferred);
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
            // A cut inside the final `Commit` (a bare header) comes after a positive verdict:
            // the destination said it was ready, and still does not start the guest.
            let in_commit = cut > full.len() - crate::protocol::HEADER_LEN;
            let refused = matches!(last, Some(Record::Verdict { ok: false, .. }));
            let ready = matches!(last, Some(Record::Verdict { ok: true, .. }));
            assert!(if in_commit { ready } else { refused }, "cut at {cut}: {last:?}");
        }
        let mut d = FakeDest::default();
        receive(&mut d, &full[..], Vec::new()).unwrap();
        assert!(d.started);
    }
}
