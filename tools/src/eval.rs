//! The evaluation's measuring instruments, apart from the testbed itself: the dedup lower bound
//! of a cluster's memory, QEMU's own live migration of the same cluster as the baseline (plain,
//! and with multifd + zstd), and PNG plots.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::testbed::{BootSpec, Result, Site, Testbed, TestbedError, VmInfo};
use shrink_testutil::qemu::{self, Qemu, QemuError};
use shrink_testutil::util::{wait_for, WaitTimeout};

/// Bytes on the migration stream per chunk entry besides its content: the address word.
const ENTRY_HEADER: u64 = 8;

/// The least a deduplicating migration of these memory images (and disk blocks) can send with
/// chunks of `chunk` bytes: every distinct non-uniform chunk the destination site does not
/// already hold (in its image repository) once in full, every other non-uniform chunk as a
/// digest of `digest_len` bytes, every uniform chunk as one byte (each entry with its address
/// word, as shrink's stream encodes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct LowerBound {
    /// Chunk size.
    pub chunk: u64,
    /// Distinct non-uniform chunks across all images.
    pub distinct: u64,
    /// Non-uniform chunks.
    pub nonuniform: u64,
    /// Uniform chunks (every byte the same).
    pub uniform: u64,
    /// Non-uniform chunks whose content the destination's repository holds (digests only).
    pub in_repository: u64,
    /// Of all chunks, disk blocks (the VMs' own overlay blocks).
    pub disk_chunks: u64,
    /// The bound, bytes.
    pub bytes: u64,
}

/// A VM's disk as far as the migration carries it: a raw copy of its guest-visible content and
/// the byte ranges its overlay holds itself (the rest is base-image content the destination has).
#[derive(Debug, Clone)]
pub struct DiskContent {
    /// Raw guest-visible content.
    pub raw: PathBuf,
    /// (offset, length) of the overlay's own data.
    pub own: Vec<(u64, u64)>,
}

fn run_tool(argv: &[&str]) -> Result<Vec<u8>> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| TestbedError::Failed(format!("{}: {e}", argv[0])))?;
    if !out.status.success() {
        return Err(TestbedError::Failed(format!("{argv:?}: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(out.stdout)
}

impl DiskContent {
    /// Reads `overlay` with `qemu-img` (its map and a raw copy at `raw`).
    pub fn of(overlay: &Path, raw: &Path) -> Result<DiskContent> {
        let ov = overlay.to_str().unwrap_or("");
        let map = run_tool(&["qemu-img", "map", "-U", "--output=json", ov])?;
        let map: Vec<Value> =
            serde_json::from_slice(&map).map_err(|e| TestbedError::Failed(format!("qemu-img map {ov}: {e}")))?;
        let own = map
            .iter()
            .filter(|e| e["depth"].as_u64() == Some(0) && (e["data"] == true || e["zero"] == true))
            .map(|e| (e["start"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0)))
            .collect();
        run_tool(&["qemu-img", "convert", "-U", "-O", "raw", ov, raw.to_str().unwrap_or("")])?;
        Ok(DiskContent { raw: raw.to_owned(), own })
    }
}

/// The SHA-256 digests of the non-uniform `chunk`-byte chunks of the image at `base` (what a
/// site's repository index holds).
pub fn repository_digests(base: &Path, raw: &Path, chunk: usize) -> Result<HashSet<[u8; 32]>> {
    run_tool(&["qemu-img", "convert", "-U", "-O", "raw", base.to_str().unwrap_or(""), raw.to_str().unwrap_or("")])?;
    let data = std::fs::read(raw).map_err(|source| TestbedError::Io { path: raw.display().to_string(), source })?;
    let _ = std::fs::remove_file(raw);
    Ok(data
        .chunks(chunk)
        .filter(|c| migrate::protocol::uniform_byte(c).is_none())
        .map(|c| {
            let mut k = [0u8; 32];
            k.copy_from_slice(&indexd::hash::digest(indexd::hash::Algo::Sha256, c)[..32]);
            k
        })
        .collect())
}

impl LowerBound {
    /// Computes the bound over `images` (raw guest memory).
    pub fn of(images: &[PathBuf], chunk: usize, digest_len: u64) -> Result<LowerBound> {
        Self::of_content(images, &[], None, chunk, digest_len)
    }

    /// The bound over memory `images`, the own blocks of `disks`, with `repository` the
    /// destination's repository content (those chunks travel as digests).
    pub fn of_content(
        images: &[PathBuf],
        disks: &[DiskContent],
        repository: Option<&HashSet<[u8; 32]>>,
        chunk: usize,
        digest_len: u64,
    ) -> Result<LowerBound> {
        let mut seen = HashSet::new();
        let mut b = LowerBound { chunk: chunk as u64, ..Default::default() };
        let read =
            |p: &Path| std::fs::read(p).map_err(|source| TestbedError::Io { path: p.display().to_string(), source });
        for img in images {
            b.add(&read(img)?, &mut seen, repository);
        }
        for d in disks {
            let data = read(&d.raw)?;
            let before = b.uniform + b.nonuniform;
            for &(off, len) in &d.own {
                let (s, e) = (off as usize, (off + len).min(data.len() as u64) as usize);
                if s < e {
                    b.add(&data[s..e], &mut seen, repository);
                }
            }
            b.disk_chunks += b.uniform + b.nonuniform - before;
        }
        b.bytes = b.distinct * (ENTRY_HEADER + b.chunk)
            + (b.nonuniform - b.distinct) * (ENTRY_HEADER + digest_len)
            + b.uniform * (ENTRY_HEADER + 1);
        Ok(b)
    }

    fn add(&mut self, data: &[u8], seen: &mut HashSet<[u8; 32]>, repository: Option<&HashSet<[u8; 32]>>) {
        for c in data.chunks(self.chunk as usize) {
            if migrate::protocol::uniform_byte(c).is_some() {
                self.uniform += 1;
            } else {
                self.nonuniform += 1;
                let d = indexd::hash::digest(indexd::hash::Algo::Sha256, c);
                let mut k = [0u8; 32];
                k.copy_from_slice(&d[..32]);
                if repository.is_some_and(|r| r.contains(&k)) {
                    self.in_repository += 1;
                } else if seen.insert(k) {
                    self.distinct += 1;
                }
            }
        }
    }

    /// Milliseconds the bound needs at `bits_per_s`.
    pub fn time_ms(&self, bits_per_s: u64) -> u64 {
        (self.bytes as f64 * 8.0 / bits_per_s.max(1) as f64 * 1e3) as u64
    }
}

/// QEMU's two live-migration set-ups the evaluation compares shrink with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuVariant {
    /// Plain pre-copy, QEMU's defaults (300 ms downtime limit), no bandwidth cap.
    Plain,
    /// `multifd` with 2 channels and `multifd-compression=zstd` (what KubeVirt offers).
    MultifdZstd,
}

impl QemuVariant {
    /// Both, in the order the evaluation runs them.
    pub const ALL: [QemuVariant; 2] = [QemuVariant::Plain, QemuVariant::MultifdZstd];

    /// Its key in `eval.json` (`qemu`, `qemu_zstd`).
    pub fn key(self) -> &'static str {
        match self {
            QemuVariant::Plain => "qemu",
            QemuVariant::MultifdZstd => "qemu_zstd",
        }
    }

    /// Its name on plots.
    pub fn label(self) -> &'static str {
        match self {
            QemuVariant::Plain => "QEMU",
            QemuVariant::MultifdZstd => "QEMU multifd+zstd",
        }
    }

    /// The QMP capabilities and parameters both ends get before the migration.
    fn setup(self, q: &mut Qemu) -> Result<()> {
        if self == QemuVariant::MultifdZstd {
            qemu::enable_multifd_zstd(q)?;
        }
        Ok(())
    }
}

/// Bytes per second the running probes alone put on the link towards `dest`, measured over
/// 2 s before a move: subtracted from the move's link bytes ([`net_link_bytes`]), what
/// CPU-seconds the whole machine has been busy since boot (`/proc/stat`: user, nice, system,
/// irq, softirq, steal): the difference over a run is what every process of both sites spent,
/// VMMs, vnetd, Redis and the kernel's network stack included.
pub fn cpu_busy_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| TestbedError::Failed(format!("/proc/stat: {e}")))?;
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if f.len() < 8 {
        return Err(TestbedError::Failed(format!("/proc/stat: unexpected first line '{line}'")));
    }
    // In USER_HZ, which the kernel's ABI fixes at 100 on x86.
    const USER_HZ: f64 = 100.0;
    Ok((f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / USER_HZ)
}

/// remains is the move's own traffic, headers included, whatever the system counts itself.
pub fn probe_rate(tb: &Testbed, dest: Site) -> Result<f64> {
    let towards = |(a, b): (u64, u64)| if dest == Site::B { a } else { b };
    let b0 = towards(tb.wan_bytes()?);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let b1 = towards(tb.wan_bytes()?);
    Ok(b1.saturating_sub(b0) as f64 / t.elapsed().as_secs_f64())
}

/// A move's bytes on the link (`a1 - a0`, over `secs`) less the probes' own traffic at
/// `probe_bps`.
pub fn net_link_bytes(a0: u64, a1: u64, probe_bps: f64, secs: f64) -> u64 {
    a1.saturating_sub(a0).saturating_sub((probe_bps * secs) as u64)
}

/// One QEMU of [`qemu_live`]: a source or a destination.
struct Side {
    qmp: Qemu,
    serial: PathBuf,
}

fn qemu_side(tb: &Testbed, tag: &str, ns: &str, argv: Vec<String>) -> Result<Side> {
    let (sock, serial) = (tb.path(&format!("{tag}.qmp")), tb.path(&format!("{tag}.serial")));
    let mut full = argv;
    full.extend(qemu::qmp_arg(&sock));
    let child = tb.spawn(tag, ns, &full.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(Side { qmp: Qemu::attach(tag, child, &tb.path(&format!("{tag}.log")), &sock)?, serial })
}

/// The baseline a user would otherwise pick, live: the cluster of `spec` boots at site A on
/// stock QEMU (`-M microvm`, the project's guest by PVH, the same command line, MAC and
/// address as on shrink-vmm, a tap on the host's `br0`, its disk an overlay on site A's base
/// image on virtio-blk), and QEMU migrates every VM at once, each to a QEMU started with
/// `-incoming` on a site-B host, over the testbed's WAN, in `variant`'s set-up. The disks move
/// as libvirt moves them without shared storage: the destination exports a new overlay on
/// site B's own base image over NBD, the source mirrors its top layer into it
/// (`blockdev-mirror sync=top`), migrates once the mirror is ready with
/// `pause-before-switchover`, completes the mirror while the guest is paused, switches over,
/// and resumes the destination (started with `-S`), as libvirt does. The clients of both sites
/// probe every VM meanwhile, and vnetd sees QEMU's own RARP announcements, so the network
/// figures are those of shrink's runs.
///
/// A VM's move ends when its destination runs. Its downtime (`downtime_ms`) is QEMU's own
/// (`query-migrate`: from the source's stop to its last write into the socket) plus the time
/// from then until the destination runs (`resume_ms`): the data still in flight and `cont`.
/// QEMU's figure alone is `qemu_downtime_ms`.
///
/// The testbed must be fresh (no cluster booted); QEMU's VMs become its cluster.
pub fn qemu_live(tb: &mut Testbed, spec: &BootSpec, variant: QemuVariant) -> Result<Value> {
    let q = qemu::binary().ok_or(QemuError::NotInstalled)?;
    let q = q.display().to_string();
    let hosts = tb.state.opts.hosts_per_site;
    let guest = tb.state.bins.guest.clone();
    let vms: Vec<VmInfo> = (1..=spec.vms).map(VmInfo::nth).collect();
    let mut pairs = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let k = i % hosts + 1;
        let tap = format!("q{}", vm.name);
        let mut ends = Vec::new();
        for site in Site::ALL {
            let ns = tb.host_ns(site, k);
            tb.exec(&ns, &["ip", "tuntap", "add", &tap, "mode", "tap"])?;
            tb.exec(&ns, &["ip", "link", "set", &tap, "master", "br0", "up"])?;
            let disk = tb.storage(site).join(format!("q{}.qcow2", vm.name));
            let (base, d) = (tb.repository(site).display().to_string(), disk.display().to_string());
            run_tool(&["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &d])?;
            let tag = format!("q{}-{}", vm.name, site.letter());
            let serial = tb.path(&format!("{tag}.serial"));
            let mut argv = vec![q.clone()];
            argv.extend(qemu::microvm_args(&spec.mem));
            argv.extend(qemu::guest_args(&guest, &vm.cmdline(spec), &serial, Some((&tap, &vm.mac)), Some(&disk)));
            if site == Site::B {
                // Paused after the move until its disk is complete, as libvirt starts it.
                argv.extend(["-S".into(), "-incoming".into(), "defer".into()]);
            }
            ends.push(qemu_side(tb, &tag, &ns, argv)?);
        }
        let dst = ends.pop().expect("two ends");
        let src = ends.pop().expect("two ends");
        pairs.push((vm.clone(), k, src, dst));
    }
    tb.adopt(vms.clone())?;
    for (vm, _, src, _) in &pairs {
        wait_for(&format!("{} to boot on QEMU (serial {})", vm.name, src.serial.display()), 120, || {
            std::fs::read_to_string(&src.serial).unwrap_or_default().contains("heartbeat 1\n").then_some(())
        })?;
    }
    for (i, (_, k, src, dst)) in pairs.iter_mut().enumerate() {
        let host = Testbed::host_addr(Site::B, *k);
        for end in [&mut *src, &mut *dst] {
            variant.setup(&mut end.qmp)?;
        }
        // No cap of QEMU's own (its default is 32 MiB/s per VM): the link is the limit.
        src.qmp.cmd("migrate-set-parameters", json!({"max-bandwidth": 10_000_000_000u64}))?;
        // libvirt's switch-over with NBD storage: the source stops at `pre-switchover`, the
        // mirror is completed while the guest is paused, then the migration continues. (A
        // mirror still running when QEMU 7.2 inactivates the disks at completion aborts it:
        // `bdrv_co_write_req_prepare: Assertion !(bs->open_flags & BDRV_O_INACTIVE)`.)
        src.qmp.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
        )?;
        dst.qmp.cmd("migrate-incoming", json!({"uri": format!("tcp:{host}:{}", 8100 + i)}))?;
        let port = (10900 + i).to_string();
        dst.qmp.cmd("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": host, "port": port}}}))?;
        dst.qmp.cmd("block-export-add", json!({"type": "nbd", "id": "d0", "node-name": "d0", "writable": true}))?;
        src.qmp.cmd(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "t0", "export": "d0",
                   "server": {"type": "inet", "host": host, "port": port}}),
        )?;
    }
    tb.start_probes(10)?;
    let probe_bps = probe_rate(tb, Site::B)?;
    let (a0, _) = tb.wan_bytes()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(1800);
    let late = |what: &str| TestbedError::Timeout(WaitTimeout { what: what.into(), secs: 1800 });
    // libvirt: mirror every disk, wait until each mirror is ready, then migrate.
    for (_, _, src, _) in pairs.iter_mut() {
        src.qmp.cmd("blockdev-mirror", json!({"job-id": "m0", "device": "d0", "target": "t0", "sync": "top"}))?;
    }
    for (_, _, src, _) in pairs.iter_mut() {
        loop {
            if Instant::now() > deadline {
                return Err(late("QEMU's disk mirrors"));
            }
            let jobs = src.qmp.cmd("query-block-jobs", json!({}))?;
            if jobs.as_array().and_then(|j| j.first()).is_some_and(|j| j["ready"] == true) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for (i, (_, k, src, _)) in pairs.iter_mut().enumerate() {
        let uri = format!("tcp:{}:{}", Testbed::host_addr(Site::B, *k), 8100 + i);
        src.qmp.cmd("migrate", json!({"uri": uri}))?;
    }
    // Every VM in turn, polled every 5 ms: its source reaches `pre-switchover` (the mirror is
    // completed there), then completes (QEMU's status says so once the last byte is written
    // to the socket, before it has crossed the link), and the destination, started paused as
    // libvirt starts it, is resumed once its incoming migration is in. The VM has moved when
    // its destination runs.
    let n = pairs.len();
    let mut migrated: Vec<Option<(Value, Instant)>> = vec![None; n];
    let mut mirrored: Vec<u64> = vec![0; n];
    let mut done: Vec<Option<Value>> = vec![None; n];
    while done.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            return Err(late("QEMU's migrations"));
        }
        for (i, (vm, _, src, dst)) in pairs.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let Some((r, completed_at)) = &migrated[i] else {
                let r = src.qmp.cmd("query-migrate", json!({}))?;
                match r["status"].as_str().unwrap_or("") {
                    "pre-switchover" => {
                        // The guest is paused: complete the mirror (the destination's disk is
                        // then the source's at the switch-over), and switch over.
                        let jobs = src.qmp.cmd("query-block-jobs", json!({}))?;
                        mirrored[i] =
                            jobs.as_array().and_then(|j| j.first()).map_or(0, |j| j["offset"].as_u64().unwrap_or(0));
                        src.qmp.cmd("block-job-cancel", json!({"device": "m0"}))?;
                        while src.qmp.cmd("query-block-jobs", json!({}))?.as_array().is_some_and(|j| !j.is_empty()) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        src.qmp.cmd("migrate-continue", json!({"state": "pre-switchover"}))?;
                    }
                    "completed" => migrated[i] = Some((r, Instant::now())),
                    "failed" | "cancelled" => {
                        done[i] = Some(json!({"vm": vm.name, "status": r["status"], "error": r["error-desc"]}))
                    }
                    _ => {}
                }
                continue;
            };
            let st = dst.qmp.cmd("query-status", json!({}))?;
            match st["status"].as_str().unwrap_or("") {
                "inmigrate" => continue,
                "paused" | "prelaunch" => {}
                other => {
                    done[i] = Some(
                        json!({"vm": vm.name, "status": "failed", "error": format!("the destination QEMU is {other}")}),
                    );
                    continue;
                }
            }
            // Its memory and disk are in: start it.
            let disk_bytes = mirrored[i];
            dst.qmp.cmd("cont", json!({}))?;
            // QEMU's own downtime (which includes the mirror's completion at pre-switchover)
            // ends at the source's last write; the guest runs again only now.
            let resume_ms = completed_at.elapsed().as_millis() as u64;
            let qemu_downtime = r["downtime"].as_u64().unwrap_or(0);
            // A VM's time runs from the start of the move (its mirror first, then the memory)
            // until it runs at the destination with its disk complete, as shrink's does.
            done[i] = Some(json!({
                "vm": vm.name, "status": "completed", "total_time_ms": start.elapsed().as_millis() as u64,
                "downtime_ms": qemu_downtime + resume_ms, "qemu_downtime_ms": qemu_downtime, "resume_ms": resume_ms,
                "memory_bytes": r["ram"]["transferred"], "multifd_bytes": r["ram"]["multifd-bytes"],
                "disk_bytes": disk_bytes, "dirty_sync_count": r["ram"]["dirty-sync-count"],
            }));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out: Vec<Value> = done.into_iter().flatten().collect();
    let total = start.elapsed();
    let (a1, _) = tb.wan_bytes()?;
    std::thread::sleep(Duration::from_secs(2));
    let probes = tb.stop_probes()?;
    let network = tb.network_report(Site::B, &json!({"vms": out}), &probes);
    for ((_, _, _, dst), _) in pairs.iter_mut().zip(&out).filter(|(_, v)| v["status"] == "completed") {
        // Every destination of a completed move runs its guest now.
        let st = dst.qmp.cmd("query-status", json!({}))?;
        if st["status"] != "running" {
            return Err(TestbedError::Failed(format!("{}: the destination QEMU is {}", dst.qmp.tag(), st["status"])));
        }
    }
    let vms = out;
    let net = net_link_bytes(a0, a1, probe_bps, total.as_secs_f64());
    let sum = |k: &str| vms.iter().map(|v| v[k].as_u64().unwrap_or(0)).sum::<u64>();
    let n = vms.len().max(1) as u64;
    Ok(json!({
        "variant": variant.label(),
        "total_time_ms": total.as_millis() as u64,
        // What crossed the link for the move (QEMU's own counters do not count what zstd
        // saved): the link's bytes less the probes' traffic.
        "wan_bytes": net, "wan_net_bytes": net,
        "wan_link_bytes": a1 - a0, "probe_link_bytes_per_s": probe_bps as u64,
        "stream_bytes": sum("memory_bytes") + sum("disk_bytes"),
        "avg_vm_time_ms": sum("total_time_ms") / n, "avg_downtime_ms": sum("downtime_ms") / n,
        "max_downtime_ms": vms.iter().map(|v| v["downtime_ms"].as_u64().unwrap_or(0)).max().unwrap_or(0),
        "failed": vms.iter().filter(|v| v["status"] != "completed").count(), "vms": vms,
        "network": network,
    }))
}

/// The source's dedup pipeline: 4 KiB chunks per second through SHA-256 and one pipelined
/// `SET NX` per 1024 chunks on a real `redis-server` on loopback, against hashing alone.
pub fn source_pipeline() -> Result<Value> {
    let pages: Vec<Vec<u8>> = (0..16384u32)
        .map(|i| (0..4096u32).map(|j| (i.wrapping_mul(2654435761).wrapping_add(j * 40503) >> 13) as u8).collect())
        .collect();
    let t = Instant::now();
    for p in &pages {
        std::hint::black_box(indexd::hash::digest(indexd::hash::Algo::Sha256, p));
    }
    let hash_only = pages.len() as f64 / t.elapsed().as_secs_f64();
    let redis =
        shrink_testutil::redis::RedisServer::start().map_err(|e| TestbedError::Failed(format!("redis-server: {e}")))?;
    let mut dedup = migrate::shrinker::RedisDedup::new(&migrate::shrinker::DedupConfig {
        coordination: redis.url(),
        migration_id: "bench".into(),
        dest_site: "B".into(),
        algo: indexd::hash::Algo::Sha256,
        ttl_s: 60,
    });
    use migrate::precopy::Dedup;
    let t = Instant::now();
    for group in pages.chunks(1024) {
        let chunks: Vec<(u64, &[u8])> =
            group.iter().enumerate().map(|(i, p)| (i as u64 * 4096, p.as_slice())).collect();
        std::hint::black_box(dedup.decide(&chunks).map_err(|e| TestbedError::Failed(e.to_string()))?);
    }
    let with_redis = pages.len() as f64 / t.elapsed().as_secs_f64();
    Ok(json!({
        "hash_only_pages_per_s": hash_only,
        "hash_and_coordination_pages_per_s": with_redis,
        "fraction_of_hash_limit": with_redis / hash_only,
        "note": "one source thread, SHA-256, groups of 1024 chunks per pipelined SET NX round trip, Redis on loopback",
    }))
}

/// One line of a plot.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend.
    pub name: String,
    /// Points (x, y); x > 0 (the x axis is logarithmic).
    pub points: Vec<(f64, f64)>,
    /// Dashed (a reference such as the lower bound).
    pub dashed: bool,
}

/// One chart of a figure.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

/// Why a plot could not be drawn.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlotError {
    /// The font is not installed.
    #[error("no DejaVuSans.ttf: apt-get install fonts-dejavu-core (or `make deps`)")]
    NoFont,
    /// The font file cannot be read or is not a font.
    #[error("{path}: {why}")]
    Font {
        /// The font file.
        path: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Drawing or writing the PNG failed.
    #[error("{path}: {why}")]
    Draw {
        /// The PNG.
        path: PathBuf,
        /// What plotters said.
        why: String,
    },
}

/// Loads the plots' font (DejaVu Sans); an error names the package to install.
pub fn font() -> std::result::Result<(), PlotError> {
    static FONT: std::sync::OnceLock<std::result::Result<(), PlotError>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];
        let path = *candidates.iter().find(|p| Path::new(p).is_file()).ok_or(PlotError::NoFont)?;
        let bytes: &'static [u8] = Box::leak(
            std::fs::read(path).map_err(|e| PlotError::Font { path, why: e.to_string() })?.into_boxed_slice(),
        );
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| PlotError::Font { path, why: "not a font".into() })
    })
    .clone()
}

/// Draws `panels` side by side into the PNG `path`.
pub fn plot(path: &Path, caption: &str, panels: &[Panel]) -> std::result::Result<(), PlotError> {
    use plotters::prelude::*;
    font()?;
    let e = |x: &dyn std::fmt::Display| PlotError::Draw { path: path.to_owned(), why: x.to_string() };
    let root = BitMapBackend::new(path, (560 * panels.len() as u32, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(caption, ("sans-serif", 22)).map_err(|x| e(&x))?;
    // Points a log axis cannot show, or that are not numbers, are left out.
    let panels: Vec<Panel> = panels
        .iter()
        .map(|p| Panel {
            series: p
                .series
                .iter()
                .map(|s| Series {
                    points: s
                        .points
                        .iter()
                        .copied()
                        .filter(|(x, y)| *x > 0.0 && x.is_finite() && y.is_finite())
                        .collect(),
                    ..s.clone()
                })
                .collect(),
            ..p.clone()
        })
        .collect();
    for (area, p) in root.split_evenly((1, panels.len())).iter().zip(&panels) {
        let xs = p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0));
        let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        let (x0, x1) = if x0 > x1 { (1.0, 2.0) } else { (x0 / 1.25, x1 * 1.25) };
        let y1 = p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1)).fold(0.0f64, f64::max).max(1e-9) * 1.12;
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x0..x1).log_scale(), 0f64..y1)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc(p.x_label.as_str())
            .y_desc(p.y_label.as_str())
            .x_label_formatter(&|x| format!("{}", x.round()))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, s) in p.series.iter().enumerate() {
            const COLORS: [(u8, u8, u8); 7] = [
                (220, 50, 47),
                (38, 139, 210),
                (95, 135, 0),
                (0, 0, 0),
                (211, 54, 130),
                (203, 75, 22),
                (108, 113, 196),
            ];
            let (r, g, b) = COLORS[i % COLORS.len()];
            let color = RGBColor(r, g, b).to_rgba();
            let style = color.stroke_width(2);
            let pts = s.points.clone();
            let anno = if s.dashed {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style)).map_err(|x| e(&x))?
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(|x| e(&x))?
            };
            anno.label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&q| Circle::new(q, 3, color.filled()))).map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lower_bound_counts_distinct_content_once_and_digests_for_the_rest() {
        let dir = std::env::temp_dir().join(format!("shrink-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Two "VMs": shared page X, private pages, zero pages; one intra-VM duplicate.
        let page = |b: u8| (0..4096u32).map(|i| (i as u8).wrapping_mul(b) ^ b).collect::<Vec<u8>>();
        let a = [page(3), page(5), page(3), vec![0; 4096]].concat();
        let b = [page(3), page(7), vec![0; 4096], vec![9; 4096]].concat();
        let (pa, pb) = (dir.join("a.img"), dir.join("b.img"));
        std::fs::write(&pa, a).unwrap();
        std::fs::write(&pb, b).unwrap();
        let lb = LowerBound::of(&[pa.clone(), pb.clone()], 4096, 32).unwrap();
        assert_eq!((lb.distinct, lb.nonuniform, lb.uniform), (3, 5, 3));
        assert_eq!(lb.bytes, 3 * (8 + 4096) + 2 * (8 + 32) + 3 * 9);
        assert_eq!(lb.time_ms(8 * 1000), lb.bytes, "bytes at 1000 B/s take bytes ms");
        // Half-page chunks find more duplicates: each of these pages is two identical halves.
        let half = LowerBound::of(&[pa, pb], 2048, 32).unwrap();
        assert_eq!((half.distinct, half.nonuniform, half.uniform), (3, 10, 6));
        assert!(half.bytes < lb.bytes);
        // Content the destination's repository holds is a digest, never full; disk blocks count.
        let repo: HashSet<[u8; 32]> = [page(5)]
            .iter()
            .map(|p| indexd::hash::digest(indexd::hash::Algo::Sha256, p)[..32].try_into().unwrap())
            .collect();
        let raw = dir.join("disk.raw");
        std::fs::write(&raw, [page(11), page(3), page(13)].concat()).unwrap();
        let disk = DiskContent { raw, own: vec![(0, 8192)] };
        let with =
            LowerBound::of_content(&[dir.join("a.img"), dir.join("b.img")], &[disk], Some(&repo), 4096, 32).unwrap();
        assert_eq!((with.distinct, with.in_repository, with.disk_chunks), (3, 1, 2), "{with:?}");
        assert_eq!(with.bytes, 3 * (8 + 4096) + 4 * (8 + 32) + 3 * 9);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plots_are_png_files() {
        let p = std::env::temp_dir().join(format!("shrink-plot-{}.png", std::process::id()));
        let s = |n: &str, k: f64, dashed| Series {
            name: n.into(),
            points: [1.0, 2.0, 4.0, 8.0, 16.0].iter().map(|&x| (x, x * k)).collect(),
            dashed,
        };
        let panel = Panel {
            title: "time".into(),
            x_label: "VMs".into(),
            y_label: "s".into(),
            series: vec![s("shrink", 2.0, false), s("bound", 1.0, true)],
        };
        plot(&p, "test", &[panel.clone(), panel]).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        assert!(b.len() > 5000);
        let _ = std::fs::remove_file(&p);
    }
}
