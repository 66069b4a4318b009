//! `shrink-bench`: the evaluation (thesis section 6.5, figures 6.4 to 6.8, and the network
//! timings of section 7.2.1.3) on the two-site testbed, with QEMU's own live migration of the
//! same cluster, plain and with multifd + zstd. Writes `eval.json` and PNG plots.
//!
//! Every point is a fresh testbed: the cluster boots at site A, its memory and disks are read
//! (for the lower bound), shrink moves it to site B with deduplication while clients at both
//! sites probe every VM, then (for the families that compare systems) plain pre-copy
//! (`--no-dedup`) moves the same cluster back over the same link. Last, on a fresh testbed per
//! variant, the same guests with the same workload boot on stock QEMU at site A, and QEMU
//! migrates them live, all at once, to QEMUs started with `-incoming` at site B, their disks
//! mirrored over NBD as libvirt does, the probes running as for shrink (see
//! [`eval::qemu_live`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use shrink_tools::eval::{self, LowerBound, Panel, QemuVariant, Series};
use shrink_tools::testbed::{self, Bins, BootSpec, Options, Site, Testbed};

#[derive(Parser)]
#[command(
    name = "shrink-bench",
    about = "shrink vs --no-dedup vs live QEMU (plain and multifd+zstd) on the two-site testbed: JSON and PNG plots"
)]
struct Cli {
    /// One small point of each family (what `make test` runs).
    #[arg(long)]
    quick: bool,
    /// Where eval.json and the plots go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Families to run: size, workload, bandwidth, granularity, tls, latency (network timings
    /// come with every run).
    #[arg(long, value_delimiter = ',', default_value = "size,workload,bandwidth,granularity,tls,latency")]
    families: Vec<String>,
    /// Workloads of the workload family (`mem`, `io`).
    #[arg(long, value_delimiter = ',', default_value = "mem,io")]
    workloads: Vec<String>,
    /// Cluster sizes (the largest is used by the bandwidth and granularity families).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// WAN rates, Mbit/s (bandwidth family; the others run at 100).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<u64>>,
    /// Chunk sizes (granularity family; the others use 4096).
    #[arg(long, value_delimiter = ',')]
    chunks: Option<Vec<u32>>,
    /// One-way WAN delays, ms (latency family; the others use --wan-delay-ms).
    #[arg(long, value_delimiter = ',')]
    delays: Option<Vec<u64>>,
    /// One-way WAN delay of every family but latency, ms.
    #[arg(long, default_value_t = 0)]
    wan_delay_ms: u64,
    /// Leave QEMU out.
    #[arg(long)]
    no_qemu: bool,
    /// Measure nothing: draw the plots of an existing eval.json (e.g. one merged from several
    /// runs) into --out.
    #[arg(long, value_name = "EVAL_JSON")]
    replot: Option<PathBuf>,
    /// Testbed name (namespaces `<name>-*`).
    #[arg(long, default_value = "bench")]
    name: String,
}

/// One measured configuration.
#[derive(Clone, Debug)]
struct Point {
    family: &'static str,
    workload: &'static str,
    vms: usize,
    rate: u64,
    chunk: u32,
    baselines: bool,
    /// The VMMs migrate in clear text (the tls family's reference points).
    plain_tcp: bool,
    /// One-way WAN delay, ms.
    delay_ms: u64,
}

/// The VM of the runs.
struct Vm {
    mem_mib: u64,
    preload: &'static str,
    private: &'static str,
}

fn spec(vm: &Vm, p: &Point) -> BootSpec {
    let n = p.vms as u64;
    // Like NPB CG: a fixed problem split over the cluster, so each VM's working set and
    // dirtying rate shrink as the cluster grows (half the VM's memory, 4 MB/s, in total). The
    // io workload writes its disk at the same 4 MB/s in total (each VM over its own 16 MB area).
    // At 1 MB/s per VM, 16 VMs would write 16 MB/s into a 12.5 MB/s link: no pre-copy converges
    // then without throttling the guests, and QEMU only ends because its switch-over rule
    // ignores the disk (its mirror finishes the rest inside the downtime).
    let rate_k = (4096 / n).max(256);
    let extra = match p.workload {
        "mem" => format!("mem={}M rate={rate_k}K", (vm.mem_mib / 2 / n).max(1)),
        "io" => format!("iorate={rate_k}K ioarea=16M"),
        _ => String::new(),
    };
    BootSpec {
        vms: p.vms,
        mem: format!("{}M", vm.mem_mib),
        cpus: 1,
        preload: vm.preload.into(),
        private: vm.private.into(),
        workload: p.workload.into(),
        extra,
        plain_tcp: p.plain_tcp,
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn avg(report: &Value, k: &str) -> u64 {
    let v: Vec<u64> = report["vms"].as_array().into_iter().flatten().map(|x| u(&x[k])).collect();
    v.iter().sum::<u64>() / v.len().max(1) as u64
}

/// A shrink leg's figures.
fn leg(tb: &Testbed, dest: Site, extra: &[&str], tag: &str) -> Result<Value, String> {
    let e = |e: testbed::TestbedError| e.to_string();
    tb.start_probes(10).map_err(e)?;
    let probe_bps = eval::probe_rate(tb, dest).map_err(e)?;
    let (a0, b0) = tb.wan_bytes().map_err(e)?;
    let cpu0 = eval::cpu_busy_s().map_err(e)?;
    let t = Instant::now();
    let (ok, r) = tb.migrate(dest, extra, tag, false).map_err(e)?;
    let cpu = eval::cpu_busy_s().map_err(e)? - cpu0;
    let (a1, b1) = tb.wan_bytes().map_err(e)?;
    let (l0, l1) = if dest == Site::B { (a0, a1) } else { (b0, b1) };
    let net = eval::net_link_bytes(l0, l1, probe_bps, t.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    let probes = tb.stop_probes().map_err(e)?;
    let network = tb.network_report(dest, &r, &probes);
    Ok(json!({
        "ok": ok, "total_time_ms": r["total_time_ms"], "wan_bytes": r["wan_bytes"],
        "wan_link_bytes": l1 - l0, "wan_net_bytes": net, "probe_link_bytes_per_s": probe_bps as u64,
        "machine_cpu_s": cpu,
        "full": r["full"], "deduplicated": r["deduplicated"], "uniform": r["uniform"], "local": r["local"],
        "fetched_from_peers": r["fetched_from_peers"], "pulled": r["pulled"], "failed": r["failed"],
        "repository": r["repository"], "disk": r["disk"],
        "avg_vm_time_ms": avg(&r, "total_time_ms"), "avg_downtime_ms": avg(&r, "downtime_ms"),
        "max_downtime_ms": r["vms"].as_array().into_iter().flatten().map(|x| u(&x["downtime_ms"])).max().unwrap_or(0),
        "network": network, "report": r,
    }))
}

/// Each VM's disk as the lower bound sees it (raw copies under `keep`), read from a copy of its
/// overlay taken while the VM is paused (the device flushes on pause).
fn disks_of(tb: &Testbed, keep: &Path) -> Result<Vec<eval::DiskContent>, String> {
    let e = |e: testbed::TestbedError| e.to_string();
    let mut contents = Vec::new();
    for (vm, _, _, api) in tb.locations().map_err(e)? {
        let ov = tb.storage(Site::A).join(format!("{}.qcow2", vm.name));
        let copy = keep.join(format!("{}.qcow2", vm.name));
        let mut c = migrate::client::ApiClient::connect(&api).map_err(|x| format!("{}: {x}", vm.name))?;
        let mut call = |cmd: &str| match c.execute(cmd, json!({})) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(x)) => Err(format!("{}: {cmd}: {x}", vm.name)),
            Err(x) => Err(format!("{}: {cmd}: {x}", vm.name)),
        };
        call("pause")?;
        let copied = std::fs::copy(&ov, &copy);
        call("resume")?;
        copied.map_err(|x| format!("{}: {x}", ov.display()))?;
        contents.push(eval::DiskContent::of(&copy, &keep.join(format!("{}.raw", vm.name))).map_err(e)?);
        let _ = std::fs::remove_file(&copy);
    }
    Ok(contents)
}

fn run_point(cli: &Cli, bins: &Bins, vm: &Vm, p: &Point) -> Result<Value, String> {
    let e = |e: testbed::TestbedError| e.to_string();
    let dir = testbed::default_dir(&cli.name);
    let opts = Options {
        name: cli.name.clone(),
        dir: dir.clone(),
        wan_rate: format!("{}mbit", p.rate),
        hosts_per_site: 2,
        wan_delay_ms: p.delay_ms,
    };
    let bps = p.rate * 1_000_000;
    let mut tb = Testbed::up(opts.clone(), bins.clone()).map_err(e)?;
    if p.chunk != 4096 {
        // (`up` indexes the repositories at 4096-byte chunks.)
        tb.index_repositories_at(&[p.chunk]).map_err(e)?;
    }
    // The WAN's round trip as the moves will see it (rate shaping, delay line), before any
    // traffic.
    let rtt = tb.wan_rtt(200).map_err(e)?;
    let spec = spec(vm, p);
    tb.boot(&spec).map_err(e)?;
    std::thread::sleep(Duration::from_secs(2));
    let images = tb.memory_images().map_err(e)?;
    // The VMs' memory and their disks' own blocks, less what site B's repository holds.
    let keep = shrink_testutil::fs::TempDir::new("bench-images").map_err(|x| x.to_string())?;
    let disks = disks_of(&tb, keep.path())?;
    let repo = eval::repository_digests(&tb.repository(Site::B), &keep.path().join("base.raw"), p.chunk as usize)
        .map_err(e)?;
    let bound = LowerBound::of_content(&images, &disks, Some(&repo), p.chunk as usize, 32).map_err(e)?;
    drop(keep);
    for img in &images {
        let _ = std::fs::remove_file(img);
    }
    let shrink = leg(&tb, Site::B, &["--chunk", &p.chunk.to_string()], "dedup")?;
    let plain = if p.baselines { Some(leg(&tb, Site::A, &["--no-dedup"], "plain")?) } else { None };
    testbed::down(&opts.name, &dir).map_err(e)?;
    // QEMU, live, on a fresh testbed per variant (the same link, guests and workload).
    let mut qemu = serde_json::Map::new();
    if p.baselines && !cli.no_qemu && shrink_testutil::qemu::binary().is_some() {
        for variant in QemuVariant::ALL {
            let mut tb = Testbed::up(opts.clone(), bins.clone()).map_err(e)?;
            let r = eval::qemu_live(&mut tb, &spec, variant);
            testbed::down(&opts.name, &dir).map_err(e)?;
            qemu.insert(variant.key().into(), r.map_err(e)?);
        }
    }
    let (q, qz) = (qemu.get("qemu"), qemu.get("qemu_zstd"));
    let ratio = |a: &Value, b: Option<&Value>, k: &str| b.map(|b| u(&a[k]) as f64 / u(&b[k]).max(1) as f64);
    Ok(json!({
        "family": p.family, "workload": p.workload, "vms": p.vms, "rate_mbit": p.rate, "chunk": p.chunk,
        "transport": if p.plain_tcp { "plain" } else { "tls" }, "wan_delay_ms": p.delay_ms,
        "wan_rtt_ms": {"min": rtt[0], "avg": rtt[1], "max": rtt[2], "mdev": rtt[3]},
        "vm": {"mem": spec.mem, "preload": spec.preload, "private": spec.private, "cmdline_extra": spec.extra},
        "lower_bound": {"bytes": bound.bytes, "time_ms": bound.time_ms(bps), "distinct_chunks": bound.distinct, "nonuniform_chunks": bound.nonuniform, "uniform_chunks": bound.uniform,
                        "in_repository_chunks": bound.in_repository, "disk_chunks": bound.disk_chunks},
        "ratios": {
            // Bytes against QEMU as both put them on the link (less the probes): QEMU's own
            // counters do not see what zstd saves.
            "wan_bytes_shrink_over_qemu": ratio(&shrink, q, "wan_net_bytes"),
            "time_shrink_over_qemu": ratio(&shrink, q, "total_time_ms"),
            "max_downtime_shrink_over_qemu": ratio(&shrink, q, "max_downtime_ms"),
            "wan_bytes_shrink_over_qemu_zstd": ratio(&shrink, qz, "wan_net_bytes"),
            "time_shrink_over_qemu_zstd": ratio(&shrink, qz, "total_time_ms"),
            "max_downtime_shrink_over_qemu_zstd": ratio(&shrink, qz, "max_downtime_ms"),
            "wan_bytes_shrink_over_no_dedup": ratio(&shrink, plain.as_ref(), "wan_bytes"),
            "time_shrink_over_no_dedup": ratio(&shrink, plain.as_ref(), "total_time_ms"),
            "wan_bytes_shrink_over_lower_bound": u(&shrink["wan_bytes"]) as f64 / bound.bytes.max(1) as f64,
            "pulled_fraction": u(&shrink["pulled"]) as f64 / u(&shrink["deduplicated"]).max(1) as f64,
        },
        "shrink": shrink, "no_dedup": plain, "qemu": q, "qemu_zstd": qz,
    }))
}

fn matrix(cli: &Cli) -> Vec<Point> {
    let sizes = cli.sizes.clone().unwrap_or(if cli.quick { vec![2] } else { vec![1, 2, 4, 8, 16] });
    let rates = cli.rates.clone().unwrap_or(if cli.quick { vec![250] } else { vec![250, 500, 1000] });
    let chunks = cli.chunks.clone().unwrap_or(if cli.quick { vec![1024] } else { vec![512, 1024, 2048] });
    let nmax = sizes.iter().copied().max().unwrap_or(2);
    let want = |f: &str| cli.families.iter().any(|x| x == f);
    let mut pts = Vec::new();
    let p = |family, workload, vms, rate, chunk, baselines| Point {
        family,
        workload,
        vms,
        rate,
        chunk,
        baselines,
        plain_tcp: false,
        delay_ms: cli.wan_delay_ms,
    };
    // The size family's largest point is also the bandwidth family's 100 Mbit/s point and the
    // granularity family's 4096-byte point.
    if want("size") || want("bandwidth") || want("granularity") {
        for &n in &sizes {
            if want("size") || n == nmax {
                pts.push(p("size", "idle", n, 100, 4096, true));
            }
        }
    }
    if want("workload") {
        for w in ["mem", "io"].into_iter().filter(|w| cli.workloads.iter().any(|x| x == w)) {
            for &n in &sizes {
                pts.push(p("workload", w, n, 100, 4096, true));
            }
        }
    }
    if want("bandwidth") {
        for &r in rates.iter().filter(|&&r| r != 100) {
            pts.push(p("bandwidth", "idle", nmax, r, 4096, true));
        }
    }
    if want("granularity") {
        for &c in chunks.iter().filter(|&&c| c != 4096) {
            pts.push(p("granularity", "idle", nmax, 100, c, false));
        }
    }
    if want("latency") {
        // The WAN's one-way delay, at 100 Mbit/s (0 ms is the size family's point, when the
        // others run without delay).
        let delays = cli.delays.clone().unwrap_or(if cli.quick { vec![20] } else { vec![0, 10, 50, 100] });
        let size_point = want("size") || want("bandwidth") || want("granularity");
        for d in delays.into_iter().filter(|&d| d != cli.wan_delay_ms || !size_point) {
            pts.push(Point { delay_ms: d, ..p("latency", "idle", nmax, 100, 4096, true) });
        }
    }
    if want("tls") {
        // What TLS costs: the same move over TLS (every other point's transport too) and in
        // clear text, at a WAN rate and at 1 Gbit/s, where the CPU is the limit.
        let tls_rates: Vec<u64> = if cli.quick { vec![250] } else { vec![100, 1000] };
        for r in tls_rates {
            for plain_tcp in [false, true] {
                pts.push(Point { plain_tcp, ..p("tls", "idle", nmax, r, 4096, false) });
            }
        }
    }
    pts
}

fn mb(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64 / 1e6
}

fn secs(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64 / 1e3
}

/// Series of `y(point)` over `x(point)` for the points `sel` keeps, one per system.
fn systems(
    points: &[&Value],
    x: &dyn Fn(&Value) -> f64,
    y: &dyn Fn(&Value) -> Option<f64>,
    bound: Option<&dyn Fn(&Value) -> f64>,
) -> Vec<Series> {
    let mut out = Vec::new();
    // A run where a VM failed is not a measurement of the system.
    let valid = |v: &Value| v["ok"] != false && v["failed"].as_u64().unwrap_or(0) == 0;
    let qemus = QemuVariant::ALL.map(|v| (v.label(), v.key()));
    for (name, key) in [("shrink", "shrink"), ("shrink --no-dedup", "no_dedup")].into_iter().chain(qemus) {
        let pts: Vec<(f64, f64)> =
            points.iter().filter(|p| valid(&p[key])).filter_map(|p| Some((x(p), y(&p[key])?))).collect();
        if !pts.is_empty() {
            out.push(Series { name: name.into(), points: pts, dashed: false });
        }
    }
    if let Some(b) = bound {
        out.push(Series {
            name: "dedup lower bound".into(),
            points: points.iter().map(|p| (x(p), b(p))).collect(),
            dashed: true,
        });
    }
    out
}

fn plots(out: &Path, points: &[Value]) -> Result<Vec<String>, String> {
    let mut made = Vec::new();
    let sel = |f: &dyn Fn(&Value) -> bool| -> Vec<&Value> {
        let mut v: Vec<&Value> = points.iter().filter(|p| p.get("error").is_none() && f(p)).collect();
        v.sort_by_key(|p| (u(&p["vms"]), u(&p["rate_mbit"]), u(&p["chunk"]), u(&p["wan_delay_ms"])));
        v
    };
    fn some(v: &Value) -> Option<&Value> {
        (!v.is_null()).then_some(v)
    }
    let time = |v: &Value| some(v).map(|v| secs(&v["total_time_ms"]));
    // Every system's bytes as the link carried them, less the probes (QEMU's own counters do
    // not see what zstd saves); older documents have only the streams' own counts.
    let bytes = |v: &Value| some(v).map(|v| mb(v.get("wan_net_bytes").unwrap_or(&v["wan_bytes"])));
    let btime = |p: &Value| secs(&p["lower_bound"]["time_ms"]);
    let bbytes = |p: &Value| mb(&p["lower_bound"]["bytes"]);
    let vms = |p: &Value| u(&p["vms"]) as f64;
    let mut fig = |file: &str, caption: &str, panels: Vec<Panel>| -> Result<(), String> {
        if panels.iter().any(|p| p.series.iter().any(|s| !s.points.is_empty())) {
            eval::plot(&out.join(file), caption, &panels).map_err(|e| e.to_string())?;
            made.push(file.to_owned());
        }
        Ok(())
    };
    let panel = |title: &str, x: &str, y: &str, series: Vec<Series>| Panel {
        title: title.into(),
        x_label: x.into(),
        y_label: y.into(),
        series,
    };

    // Figure 6.4: cluster size.
    let size = sel(&|p| p["family"] == "size");
    let chunks = |p: &Value, k: &str| Some(u(&p["shrink"][k]) as f64);
    fig(
        "fig-size.png",
        "Idle clusters, 100 Mbit/s WAN (thesis fig. 6.4)",
        vec![
            panel("total migration time", "VMs", "s", systems(&size, &vms, &time, Some(&btime))),
            panel("bytes over the WAN", "VMs", "MB", systems(&size, &vms, &bytes, Some(&bbytes))),
            panel(
                "shrink: where chunks came from",
                "VMs",
                "chunks (thousands)",
                ["full", "deduplicated", "fetched_from_peers", "pulled"]
                    .iter()
                    .map(|k| Series {
                        name: k.replace('_', " "),
                        points: size.iter().map(|p| (vms(p), chunks(p, k).unwrap_or(0.0) / 1e3)).collect(),
                        dashed: false,
                    })
                    .collect(),
            ),
        ],
    )?;
    // Figures 6.5 and 6.6: workloads (idle from the size family).
    let mut wt = Vec::new();
    let mut wb = Vec::new();
    for w in ["idle", "mem", "io"] {
        let pts = sel(&|p| p["workload"] == w && p["family"] != "bandwidth" && p["family"] != "granularity");
        wt.push(panel(&format!("{w}: total time"), "VMs", "s", systems(&pts, &vms, &time, Some(&btime))));
        wb.push(panel(&format!("{w}: bytes over the WAN"), "VMs", "MB", systems(&pts, &vms, &bytes, Some(&bbytes))));
    }
    fig("fig-workload-time.png", "Workloads, 100 Mbit/s WAN (thesis figs. 6.5, 6.6)", wt)?;
    fig("fig-workload-bytes.png", "Workloads, 100 Mbit/s WAN (thesis figs. 6.5, 6.6)", wb)?;
    // Figure 6.7: bandwidth, at the largest cluster.
    let nmax = points.iter().map(|p| u(&p["vms"])).max().unwrap_or(0);
    let bw = sel(&|p| {
        u(&p["vms"]) == nmax
            && p["workload"] == "idle"
            && u(&p["chunk"]) == 4096
            && (p["family"] == "bandwidth" || p["family"] == "size")
    });
    let rate = |p: &Value| u(&p["rate_mbit"]) as f64;
    fig(
        "fig-bandwidth.png",
        &format!("{nmax} idle VMs, WAN rate (thesis fig. 6.7)"),
        vec![
            panel("total migration time", "WAN Mbit/s", "s", systems(&bw, &rate, &time, Some(&btime))),
            panel("bytes over the WAN", "WAN Mbit/s", "MB", systems(&bw, &rate, &bytes, Some(&bbytes))),
        ],
    )?;
    // The WAN's delay, at the largest cluster and 100 Mbit/s.
    let lat = sel(&|p| {
        u(&p["vms"]) == nmax
            && p["workload"] == "idle"
            && u(&p["chunk"]) == 4096
            && u(&p["rate_mbit"]) == 100
            && p["transport"] != "plain"
            && (p["family"] == "latency" || p["family"] == "size")
    });
    let delay = |p: &Value| u(&p["wan_delay_ms"]) as f64;
    fig(
        "fig-latency.png",
        &format!("{nmax} idle VMs, 100 Mbit/s, one-way WAN delay"),
        vec![
            panel("total migration time", "one-way delay, ms", "s", systems(&lat, &delay, &time, Some(&btime))),
            panel("bytes over the WAN", "one-way delay, ms", "MB", systems(&lat, &delay, &bytes, Some(&bbytes))),
        ],
    )?;
    // What TLS costs: the same move over TLS and in clear text, at each rate.
    let tls = sel(&|p| p["family"] == "tls");
    let by_transport = |y: &dyn Fn(&Value) -> Option<f64>| -> Vec<Series> {
        [("shrink, TLS", "tls"), ("shrink, plain TCP", "plain")]
            .into_iter()
            .map(|(name, t)| Series {
                name: name.into(),
                points: tls
                    .iter()
                    .filter(|p| p["transport"] == t && p["shrink"]["ok"] == true)
                    .filter_map(|p| Some((rate(p), y(&p["shrink"])?)))
                    .collect(),
                dashed: false,
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let cpu = |v: &Value| v["machine_cpu_s"].as_f64();
    fig(
        "fig-tls.png",
        &format!("{} idle VMs: TLS against plain TCP", tls.first().map_or(0, |p| u(&p["vms"]))),
        vec![
            panel("total migration time", "WAN Mbit/s", "s", by_transport(&time)),
            panel("bytes over the WAN", "WAN Mbit/s", "MB", by_transport(&bytes)),
            panel("machine CPU during the move", "WAN Mbit/s", "CPU-seconds", by_transport(&cpu)),
        ],
    )?;
    // Figure 6.8: granularity, at the largest cluster; --no-dedup and QEMU do not depend on it.
    let gr = sel(&|p| {
        u(&p["vms"]) == nmax
            && p["workload"] == "idle"
            && u(&p["rate_mbit"]) == 100
            && (p["family"] == "granularity" || p["family"] == "size")
    });
    let chunk = |p: &Value| u(&p["chunk"]) as f64;
    let reference = |key: &str, name: &str, f: &dyn Fn(&Value) -> Option<f64>| -> Option<Series> {
        let base = gr.iter().find(|p| !p[key].is_null())?;
        let y = f(&base[key])?;
        Some(Series {
            name: format!("{name} (any chunk)"),
            points: gr.iter().map(|p| (chunk(p), y)).collect(),
            dashed: true,
        })
    };
    let mut gb = vec![Series {
        name: "shrink".into(),
        points: gr.iter().filter_map(|p| Some((chunk(p), bytes(&p["shrink"])?))).collect(),
        dashed: false,
    }];
    gb.push(Series {
        name: "dedup lower bound".into(),
        points: gr.iter().map(|p| (chunk(p), bbytes(p))).collect(),
        dashed: true,
    });
    gb.extend(reference("no_dedup", "--no-dedup", &bytes));
    let mut gt = vec![Series {
        name: "shrink".into(),
        points: gr.iter().map(|p| (chunk(p), secs(&p["shrink"]["total_time_ms"]))).collect(),
        dashed: false,
    }];
    gt.extend(reference("no_dedup", "--no-dedup", &time));
    for v in QemuVariant::ALL {
        gt.extend(reference(v.key(), v.label(), &time));
    }
    fig(
        "fig-granularity.png",
        &format!("{nmax} idle VMs, 100 Mbit/s, chunk size (thesis fig. 6.8)"),
        vec![
            panel("bytes over the WAN", "chunk bytes", "MB", gb),
            panel("total migration time", "chunk bytes", "s", gt),
        ],
    )?;
    // Network: detection, reconfiguration, downtime and gaps, per cluster size.
    let stat = |p: &Value, sys: &str, k: &str, max: bool| {
        let v: Vec<f64> = p[sys]["network"].as_array().into_iter().flatten().filter_map(|n| n[k].as_f64()).collect();
        if v.is_empty() {
            None
        } else if max {
            Some(v.iter().copied().fold(0.0, f64::max))
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let sys_ser = |name: &str, sys: &str, k: &str, max: bool| Series {
        name: name.into(),
        points: size.iter().filter_map(|p| Some((vms(p), stat(p, sys, k, max)?))).collect(),
        dashed: max,
    };
    let ser = |name: &str, k: &str, max: bool| sys_ser(name, "shrink", k, max);
    let mut against = Vec::new();
    for (label, sys) in std::iter::once(("shrink", "shrink")).chain(QemuVariant::ALL.map(|v| (v.label(), v.key()))) {
        against.push(sys_ser(&format!("{label}: downtime (max)"), sys, "downtime_ms", true));
        against.push(sys_ser(&format!("{label}: gap at site B (mean)"), sys, "gap_b_ms", false));
    }
    against.retain(|s| !s.points.is_empty());
    fig(
        "fig-network.png",
        "Moving idle clusters to site B: what the VMs' peers see (probes every 10 ms)",
        vec![
            panel(
                "downtime and connectivity gap",
                "VMs",
                "ms",
                vec![
                    ser("downtime (mean)", "downtime_ms", false),
                    ser("gap at site A (mean)", "gap_a_ms", false),
                    ser("gap at site B (mean)", "gap_b_ms", false),
                    ser("gap at site A (max)", "gap_a_ms", true),
                ],
            ),
            panel("shrink and QEMU: downtime and gap", "VMs", "ms", against),
            panel(
                "vnetd: from the VM's first RARP",
                "VMs",
                "ms",
                vec![
                    ser("detection (mean)", "detection_ms", false),
                    ser("reconfiguration (mean)", "reconfiguration_ms", false),
                    ser("reconfiguration (max)", "reconfiguration_ms", true),
                ],
            ),
        ],
    )?;
    Ok(made)
}

/// The results so far (`complete` once every point ran).
fn document(cli: &Cli, vm: &Vm, points: &[Value], pipeline: Option<&Value>, t0: Instant, complete: bool) -> Value {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // This program as run from the repository (`target/release/shrink-bench` under `make bench`).
    let root = shrink_testutil::util::repo_root();
    let exe = std::env::current_exe()
        .ok()
        .map(|p| p.strip_prefix(&root).map(Path::to_owned).unwrap_or(p))
        .unwrap_or_else(|| PathBuf::from("shrink-bench"));
    json!({
        "benchmark": "shrink-bench",
        "date": shrink_testutil::util::utc_now(),
        "command": format!("{} {}", exe.display(), args.join(" ")),
        "quick": cli.quick,
        "machine": shrink_testutil::util::machine(),
        "complete": complete,
        "testbed": "two sites in network namespaces, 2 compute hosts each, vnetd gateways, WAN shaped with tc tbf (50 ms queue); one-way delay per point (wan_delay_ms, a user-space delay line between the border routers; wan_rtt_ms: ping's min/avg/max/mdev between them, 200 pings before the moves)",
        "vm": {"memory_mib": vm.mem_mib, "preload": vm.preload, "private": vm.private,
            "mix": "preload = the first bytes of the Debian base image read into memory (OS content shared by the VMs of the image); private = pseudo-random memory of the VM's own"},
        "qemu": "live: the same guest, command line and disk on qemu-system-x86_64 -M microvm -accel kvm -kernel (PVH) at site-A hosts, taps on the hosts' br0, migrated all at once to QEMUs started with -incoming at site-B hosts; qemu = plain pre-copy (QEMU's defaults, 300 ms downtime limit), qemu_zstd = multifd, 2 channels, multifd-compression zstd; max-bandwidth unlimited; disks moved as libvirt does without shared storage (NBD export of a new overlay on site B's base, blockdev-mirror sync=top, migrate when ready with pause-before-switchover, the mirror completed while the guest is paused, the destination started with -S and resumed then); a move ends when the destination runs, and its downtime runs until then; wan_net_bytes = link bytes less the probes' own traffic (calibrated over 2 s before each move), for every system",
        "points": points,
        "source_pipeline": pipeline,
        "seconds": t0.elapsed().as_secs(),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let t0 = Instant::now();
    if let Some(f) = &cli.replot {
        let r = std::fs::read_to_string(f)
            .map_err(|e| format!("{}: {e}", f.display()))
            .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| format!("{}: {e}", f.display())))
            .and_then(|doc| {
                let points = doc["points"].as_array().cloned().ok_or_else(|| format!("{}: no points", f.display()))?;
                eval::font().map_err(|e| e.to_string())?;
                std::fs::create_dir_all(&cli.out).map_err(|e| format!("{}: {e}", cli.out.display()))?;
                plots(&cli.out, &points)
            });
        return match r {
            Ok(made) => {
                eprintln!("wrote {} in {}", made.join(", "), cli.out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shrink-bench: error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let r = (|| -> Result<usize, String> {
        for f in &cli.families {
            const FAMILIES: [&str; 6] = ["size", "workload", "bandwidth", "granularity", "tls", "latency"];
            if !FAMILIES.contains(&f.as_str()) {
                return Err(format!("--families: '{f}' is not one of {}", FAMILIES.join(", ")));
            }
        }
        if let Some(w) = cli.workloads.iter().find(|w| !["mem", "io"].contains(&w.as_str())) {
            return Err(format!("--workloads: '{w}' is not one of mem, io"));
        }
        if cli.sizes.as_ref().is_some_and(|s| s.contains(&0)) || cli.rates.as_ref().is_some_and(|r| r.contains(&0)) {
            return Err("--sizes and --rates take positive numbers".into());
        }
        let max_delay = testbed::MAX_WAN_DELAY_MS;
        if let Some(d) = cli.delays.iter().flatten().chain([&cli.wan_delay_ms]).find(|&&d| d > max_delay) {
            return Err(format!("WAN delay {d} ms: at most {max_delay} ms one way"));
        }
        let sizes = migrate::protocol::CHUNK_SIZES;
        if let Some(c) = cli.chunks.as_ref().and_then(|c| c.iter().find(|&&c| !sizes.contains(&(c as usize)))) {
            return Err(format!("--chunks: {c} is not one of {sizes:?}"));
        }
        // Before hours of measuring: everything the plots and the runs need is there.
        eval::font().map_err(|e| e.to_string())?;
        let bins = Bins::find(None, None).map_err(|e| e.to_string())?;
        let vm = if cli.quick {
            Vm { mem_mib: 128, preload: "16M", private: "2M" }
        } else {
            Vm { mem_mib: 256, preload: "64M", private: "28M" }
        };
        std::fs::create_dir_all(&cli.out).map_err(|e| format!("{}: {e}", cli.out.display()))?;
        let f = cli.out.join("eval.json");
        let write = |doc: &Value| {
            std::fs::write(&f, serde_json::to_string_pretty(doc).unwrap_or_default())
                .map_err(|e| format!("{}: {e}", f.display()))
        };
        let pts = matrix(&cli);
        let mut done = Vec::new();
        let mut failed = 0;
        for (i, p) in pts.iter().enumerate() {
            eprintln!(
                "[{}/{}] {} family: {} VMs, {} workload, {} Mbit/s, {} ms one way, {}-byte chunks, {}{} ({:.0} s so far)",
                i + 1,
                pts.len(),
                p.family,
                p.vms,
                p.workload,
                p.rate,
                p.delay_ms,
                p.chunk,
                if p.plain_tcp { "plain TCP" } else { "TLS" },
                if p.baselines { ", with --no-dedup and QEMU" } else { "" },
                t0.elapsed().as_secs_f64()
            );
            match run_point(&cli, &bins, &vm, p) {
                Ok(v) => {
                    eprintln!(
                        "    shrink {:.1} s {:.1} MB | no-dedup {} | QEMU {} | bound {:.1} MB",
                        secs(&v["shrink"]["total_time_ms"]),
                        mb(&v["shrink"]["wan_bytes"]),
                        if v["no_dedup"].is_null() {
                            "-".into()
                        } else {
                            format!(
                                "{:.1} s {:.1} MB",
                                secs(&v["no_dedup"]["total_time_ms"]),
                                mb(&v["no_dedup"]["wan_bytes"])
                            )
                        },
                        [&v["qemu"], &v["qemu_zstd"]]
                            .map(|q| if q.is_null() {
                                "-".to_owned()
                            } else {
                                format!("{:.1} s {:.1} MB", secs(&q["total_time_ms"]), mb(&q["wan_bytes"]))
                            })
                            .join(" | zstd "),
                        mb(&v["lower_bound"]["bytes"]),
                    );
                    done.push(v);
                }
                Err(e) => {
                    // Recorded, and the matrix goes on.
                    eprintln!("    failed: {e}");
                    failed += 1;
                    let _ = testbed::down(&cli.name, &testbed::default_dir(&cli.name));
                    done.push(json!({"family": p.family, "workload": p.workload, "vms": p.vms, "rate_mbit": p.rate, "chunk": p.chunk, "wan_delay_ms": p.delay_ms, "error": e}));
                }
            }
            write(&document(&cli, &vm, &done, None, t0, false))?;
        }
        let pipeline = eval::source_pipeline().map_err(|e| e.to_string())?;
        let doc = document(&cli, &vm, &done, Some(&pipeline), t0, true);
        write(&doc)?;
        let made = plots(&cli.out, &done)?;
        eprintln!("wrote {} and {} in {:.0} s", f.display(), made.join(", "), t0.elapsed().as_secs_f64());
        Ok(failed)
    })();
    match r {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("shrink-bench: {n} point(s) failed (their errors are in eval.json)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("shrink-bench: error: {e}");
            let _ = testbed::down(&cli.name, &testbed::default_dir(&cli.name));
            ExitCode::FAILURE
        }
    }
}
