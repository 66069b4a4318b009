//! The evaluation's measuring instruments, apart from the testbed itself: the dedup lower bound
//! of a cluster's memory, QEMU's own live migration of the same memory as the baseline, and
//! PNG plots.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::testbed::{Result, Site, Testbed, TestbedError};
use shrink_testutil::qemu::{self, Qemu, QemuError};
use shrink_testutil::util::WaitTimeout;

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

/// The baseline a user would otherwise pick: for every memory image, a paused QEMU
/// (`-M microvm -accel kvm -S`, memory loaded with `-device loader`) on a site-A host, migrated
/// with QEMU's own `migrate` to a QEMU on a site-B host, all at once over the testbed's WAN.
/// With `disks` (each VM's overlay, backed by site A's base image), each QEMU has it on
/// virtio-blk and moves it as libvirt does without shared storage: the destination exports a
/// new overlay on site B's own base image over NBD, the source mirrors its top layer into it
/// (`blockdev-mirror sync=top`), migrates once the mirror is ready, and completes the mirror
/// after the switch-over. Returns QEMU's figures per VM and the cluster's total time.
pub fn qemu_cluster(tb: &Testbed, images: &[PathBuf], disks: &[PathBuf], mem: &str) -> Result<Value> {
    let q = qemu::binary().ok_or(QemuError::NotInstalled)?;
    let q = q.to_str().unwrap_or("qemu-system-x86_64");
    let hosts = tb.state.opts.hosts_per_site;
    let mut qmps = Vec::new();
    // The destinations, kept alive until the migrations end.
    let mut dests = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let k = i % hosts + 1;
        let (dq, sq) = (tb.path(&format!("qemu{i}-dst.qmp")), tb.path(&format!("qemu{i}-src.qmp")));
        let uri = format!("tcp:{}:{}", Testbed::host_addr(Site::B, k), 8100 + i);
        let mut d: Vec<String> = vec![q.into()];
        d.extend(qemu::microvm_args(mem));
        d.extend(["-incoming".into(), uri.clone()]);
        d.extend(qemu::qmp_arg(&dq));
        let mut s: Vec<String> = vec![q.into()];
        s.extend(qemu::microvm_args(mem));
        s.extend(["-S".into(), "-device".into(), format!("loader,file={},addr=0,force-raw=on", img.display())]);
        s.extend(qemu::qmp_arg(&sq));
        if let Some(ov) = disks.get(i) {
            // The destination's disk: a new overlay on site B's base image.
            let new = tb.storage(Site::B).join(format!("qemu{i}.qcow2"));
            let base = tb.repository(Site::B);
            run_tool(&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                base.to_str().unwrap_or(""),
                new.to_str().unwrap_or(""),
            ])?;
            let blockdev =
                |file: &Path| format!("driver=qcow2,node-name=d0,file.driver=file,file.filename={}", file.display());
            for (v, file) in [(&mut s, ov.as_path()), (&mut d, new.as_path())] {
                v.extend(["-blockdev".into(), blockdev(file), "-device".into(), "virtio-blk-device,drive=d0".into()]);
            }
        }
        let (dt, st) = (format!("qemu{i}-dst"), format!("qemu{i}-src"));
        let dc = tb.spawn(&dt, &tb.host_ns(Site::B, k), &d.iter().map(String::as_str).collect::<Vec<_>>())?;
        let sc = tb.spawn(&st, &tb.host_ns(Site::A, k), &s.iter().map(String::as_str).collect::<Vec<_>>())?;
        dests.push(Qemu::attach(&dt, dc, &tb.path(&format!("{dt}.log")), &dq)?);
        let mut sqmp = Qemu::attach(&st, sc, &tb.path(&format!("{st}.log")), &sq)?;
        // No cap of QEMU's own (its default is 32 MiB/s... per VM): the link is the limit.
        sqmp.cmd("migrate-set-parameters", json!({"max-bandwidth": 10_000_000_000u64}))?;
        if disks.get(i).is_some() {
            let host = Testbed::host_addr(Site::B, k);
            let port = (10900 + i).to_string();
            let dqmp = dests.last_mut().expect("just pushed");
            dqmp.cmd("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": host, "port": port}}}))?;
            dqmp.cmd("block-export-add", json!({"type": "nbd", "id": "d0", "node-name": "d0", "writable": true}))?;
            sqmp.cmd(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "t0", "export": "d0",
                       "server": {"type": "inet", "host": host, "port": port}}),
            )?;
        }
        qmps.push((sqmp, uri));
    }
    let (a0, _) = tb.wan_bytes()?;
    let start = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(1800);
    // libvirt: mirror every disk, wait until each mirror is ready, then migrate.
    if !disks.is_empty() {
        for (q, _) in qmps.iter_mut() {
            q.cmd("blockdev-mirror", json!({"job-id": "m0", "device": "d0", "target": "t0", "sync": "top"}))?;
        }
        for (q, _) in qmps.iter_mut() {
            loop {
                if Instant::now() > deadline {
                    return Err(TestbedError::Timeout(WaitTimeout { what: "QEMU's disk mirrors".into(), secs: 1800 }));
                }
                let jobs = q.cmd("query-block-jobs", json!({}))?;
                if jobs.as_array().and_then(|j| j.first()).is_some_and(|j| j["ready"] == true) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for (q, uri) in qmps.iter_mut() {
        q.cmd("migrate", json!({"uri": uri}))?;
    }
    let mut vms = Vec::new();
    for (q, _) in qmps.iter_mut() {
        loop {
            if Instant::now() > deadline {
                return Err(TestbedError::Timeout(WaitTimeout { what: "QEMU's migrations".into(), secs: 1800 }));
            }
            let r = q.cmd("query-migrate", json!({}))?;
            match r["status"].as_str().unwrap_or("") {
                "completed" => {
                    let mut disk_bytes = 0;
                    if !disks.is_empty() {
                        // The switch-over happened with the mirror in sync: complete it (the
                        // destination's disk is then the source's at the switch-over).
                        let jobs = q.cmd("query-block-jobs", json!({}))?;
                        disk_bytes =
                            jobs.as_array().and_then(|j| j.first()).map_or(0, |j| j["offset"].as_u64().unwrap_or(0));
                        q.cmd("block-job-cancel", json!({"device": "m0"}))?;
                        while q.cmd("query-block-jobs", json!({}))?.as_array().is_some_and(|j| !j.is_empty()) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    // A VM's time runs from the start of its move (its mirror first, then the
                    // memory) until its disk is complete at the destination, as shrink's does.
                    let total = if disks.is_empty() {
                        r["total-time"].as_u64().unwrap_or(0)
                    } else {
                        start.elapsed().as_millis() as u64
                    };
                    vms.push(json!({"status": "completed", "total_time_ms": total, "downtime_ms": r["downtime"],
                                    "wan_bytes": r["ram"]["transferred"].as_u64().unwrap_or(0) + disk_bytes,
                                    "memory_bytes": r["ram"]["transferred"], "disk_bytes": disk_bytes}));
                    break;
                }
                "failed" | "cancelled" => {
                    vms.push(json!({"status": r["status"], "error": r["error-desc"]}));
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    let total = start.elapsed().as_millis() as u64;
    let (a1, _) = tb.wan_bytes()?;
    let sum = |k: &str| vms.iter().map(|v| v[k].as_u64().unwrap_or(0)).sum::<u64>();
    let n = vms.len().max(1) as u64;
    Ok(json!({
        "total_time_ms": total, "wan_bytes": sum("wan_bytes"), "wan_link_bytes": a1 - a0,
        "avg_vm_time_ms": sum("total_time_ms") / n, "avg_downtime_ms": sum("downtime_ms") / n,
        "failed": vms.iter().filter(|v| v["status"] != "completed").count(), "vms": vms,
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
