//! `make bench` for Shrinker: idle virtual clusters of 1, 2, 4, 8 and 16 VMs move from site A to
//! site B over a 100 Mbit/s WAN (`tc tbf`), with deduplication, without it (`--no-dedup`) and
//! with QEMU (each VM's memory image, paused, migrated with QEMU's own `migrate`, all at once over
//! the same link), side by side in one run. Also the dedup lower bound, and the source
//! pipeline's throughput (hash + coordination) against the single-core hash limit.
//!
//! The idle VM mirrors the one measured in the Shrinker paper: about 80 MB of non-zero memory,
//! of which about 50 MB is OS content shared by the VMs of the image (`preload=64M` of the Debian
//! base image: 12810 non-zero pages) and 28 MB private to the VM.
//!
//! Usage: `cargo bench -p shrink-tests --bench shrinker -- [OUT.json] [--sizes 1,2,4]`

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use migrate::client::ApiClient;
use serde_json::{json, Value};
use shrink_tests::netns;
use shrink_tests::world::{release_bin, Bg, World};

const A1: &str = "10.78.0.11";
const B1: &str = "10.78.0.21";
const B2: &str = "10.78.0.22";
const CMDLINE: &str = "preload=64M private=28M";

use shrink_tests::util::{bench_output, repo_root as repo, utc_now};

fn image(n: &str) -> PathBuf {
    repo().join("images/out").join(n)
}

fn wait_text(p: &Path, needle: &str) {
    shrink_tests::util::wait_text(p, needle, Duration::from_secs(120));
}

fn api(sock: &Path, cmd: &str, args: Value) -> Value {
    ApiClient::connect(sock).unwrap().execute(cmd, args).unwrap().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

struct Run<'a> {
    world: &'a World,
    dir: PathBuf,
}

impl Run<'_> {
    fn boot(&self, names: &[String]) -> Vec<Bg> {
        let a1 = self.world.host("a1");
        let mut procs = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let mut cmd = a1.ns.command(release_bin("shrink-vmm").to_str().unwrap());
            cmd.args(["--kernel", image("shrink-guest").to_str().unwrap(), "--mem", "256M"]);
            cmd.args(["--cmdline", &format!("{CMDLINE} seed={}", 100 + i), "--name", n]);
            cmd.args(["--image", image("base.qcow2").to_str().unwrap()]);
            cmd.arg("--disk").arg(self.dir.join(format!("{n}.qcow2")));
            cmd.arg("--api").arg(self.dir.join(format!("{n}.sock")));
            cmd.arg("--serial").arg(self.dir.join(format!("{n}.serial")));
            procs.push(Bg::spawn(cmd, &self.dir.join(format!("{n}.log"))));
        }
        for n in names {
            wait_text(&self.dir.join(format!("{n}.serial")), "heartbeat 1\n");
        }
        procs
    }

    fn vc(&self, file: &str, names: &[String]) -> PathBuf {
        let host = |n: &str| self.world.host(n).ns.name().to_owned();
        let mut t = format!(
            "vmm = \"{}\"\nworkdir = \"{}\"\n\n[[sites]]\nname = \"siteA\"\ncoordination = \"redis://{A1}:6379\"\nindex = \"redis://{A1}:6380\"\nlaunch = \"ip netns exec {{host}} {{cmd}}\"\n\n[[sites.hosts]]\nname = \"{}\"\naddress = \"{A1}\"\n\n[[sites]]\nname = \"siteB\"\ncoordination = \"redis://{B1}:6379\"\nindex = \"redis://{B1}:6380\"\nlaunch = \"ip netns exec {{host}} {{cmd}}\"\n\n[[sites.hosts]]\nname = \"{}\"\naddress = \"{B1}\"\n\n[[sites.hosts]]\nname = \"{}\"\naddress = \"{B2}\"\n\n",
            release_bin("shrink-vmm").display(),
            self.dir.display(),
            host("a1"),
            host("b1"),
            host("b2")
        );
        for n in names {
            t += &format!("[[vms]]\nname = \"{n}\"\nhost = \"{}\"\napi = \"{}\"\n\n", host("a1"), self.dir.join(format!("{n}.sock")).display());
        }
        let p = self.dir.join(file);
        std::fs::write(&p, t).unwrap();
        p
    }

    fn migrate(&self, vc: &Path, extra: &[&str]) -> Value {
        let out = Command::new(release_bin("shrink-migrate"))
            .args(["--cluster", vc.to_str().unwrap(), "--dest", "siteB", "--json"])
            .args(extra)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("shrink-migrate: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Distinct non-uniform 4 KiB pages across memory images, and how many pages those are.
fn lower_bound(images: &[PathBuf]) -> (u64, u64, u64) {
    let mut seen = HashSet::new();
    let (mut nonuniform, mut uniform) = (0u64, 0u64);
    for img in images {
        let data = std::fs::read(img).unwrap();
        for p in data.chunks(4096) {
            if p.iter().all(|&b| b == p[0]) {
                uniform += 1;
            } else {
                nonuniform += 1;
                seen.insert(indexd::hash::digest(indexd::hash::Algo::Sha256, p));
            }
        }
    }
    (seen.len() as u64, nonuniform, uniform)
}

/// A QMP connection.
struct Qmp(BufReader<UnixStream>, UnixStream);
impl Qmp {
    fn connect(sock: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("QMP {}: {e}", sock.display()),
            }
        };
        let mut q = Qmp(BufReader::new(s.try_clone().unwrap()), s);
        let mut l = String::new();
        q.0.read_line(&mut l).unwrap();
        q.cmd("qmp_capabilities", json!({}));
        q
    }
    fn cmd(&mut self, c: &str, a: Value) -> Value {
        writeln!(self.1, "{}", json!({"execute": c, "arguments": a})).unwrap();
        loop {
            let mut l = String::new();
            self.0.read_line(&mut l).unwrap();
            let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }
}

/// All VMs' memory images migrated by QEMU at once over the same link; (time ms, bytes).
fn qemu_cluster(world: &World, dir: &Path, images: &[PathBuf]) -> (u64, u64) {
    let q = "/usr/bin/qemu-system-x86_64";
    let common = ["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none"];
    let mut procs = Vec::new();
    let mut qmps = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let (dhost, daddr) = if i % 2 == 0 { ("b1", B1) } else { ("b2", B2) };
        let port = 8100 + i;
        let dq = dir.join(format!("q{i}d.qmp"));
        let sq = dir.join(format!("q{i}s.qmp"));
        let mut d = world.host(dhost).ns.command(q);
        d.args(common).args(["-incoming", &format!("tcp:{daddr}:{port}"), "-qmp", &format!("unix:{},server=on,wait=off", dq.display())]);
        procs.push(Bg::spawn(d, &dir.join(format!("q{i}d.log"))));
        let mut s = world.host("a1").ns.command(q);
        s.args(common).args(["-S", "-device", &format!("loader,file={},addr=0,force-raw=on", img.display()), "-qmp", &format!("unix:{},server=on,wait=off", sq.display())]);
        procs.push(Bg::spawn(s, &dir.join(format!("q{i}s.log"))));
        let _ = Qmp::connect(&dq);
        let mut sqmp = Qmp::connect(&sq);
        sqmp.cmd("migrate-set-parameters", json!({"max-bandwidth": 10_000_000_000u64}));
        qmps.push((sqmp, format!("tcp:{daddr}:{port}")));
    }
    let start = Instant::now();
    for (q, uri) in qmps.iter_mut() {
        q.cmd("migrate", json!({"uri": uri}));
    }
    let mut bytes = 0;
    for (q, _) in qmps.iter_mut() {
        loop {
            let r = q.cmd("query-migrate", json!({}));
            let st = r["return"]["status"].as_str().unwrap_or("").to_owned();
            if st == "completed" || st == "failed" {
                bytes += r["return"]["ram"]["transferred"].as_u64().unwrap_or(0);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    (start.elapsed().as_millis() as u64, bytes)
}

/// Source pipeline: chunks/s through hash + pipelined SET NX on a real Redis, against hashing alone.
fn pipeline_throughput(world: &World) -> Value {
    // The coordination Redis of site A, reached from the bench process through the switch.
    let pages: Vec<Vec<u8>> = (0..16384u32).map(|i| {
        let mut p = vec![0u8; 4096];
        for (j, b) in p.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2654435761).wrapping_add(j as u32 * 40503) >> 13) as u8;
        }
        p
    }).collect();
    let t = Instant::now();
    for p in &pages {
        std::hint::black_box(indexd::hash::digest(indexd::hash::Algo::Sha256, p));
    }
    let hash_only = pages.len() as f64 / t.elapsed().as_secs_f64();
    let _ = world;
    // The bench process is outside the namespaces: measure against a local Redis on loopback.
    let port = 16379;
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut dedup = migrate::dedup::RedisDedup::new(&migrate::dedup::DedupConfig {
        coordination: format!("redis://127.0.0.1:{port}"),
        migration_id: "bench".into(),
        dest_site: "B".into(),
        algo: indexd::hash::Algo::Sha256,
        ttl_s: 60,
    });
    use migrate::precopy::Dedup;
    let t = Instant::now();
    for group in pages.chunks(1024) {
        let chunks: Vec<(u64, &[u8])> = group.iter().enumerate().map(|(i, p)| (i as u64 * 4096, p.as_slice())).collect();
        std::hint::black_box(dedup.decide(&chunks).unwrap());
    }
    let with_redis = pages.len() as f64 / t.elapsed().as_secs_f64();
    let _ = redis.kill();
    let _ = redis.wait();
    json!({
        "hash_only_pages_per_s": hash_only,
        "hash_and_coordination_pages_per_s": with_redis,
        "fraction_of_hash_limit": with_redis / hash_only,
        "note": "one source thread, SHA-256, groups of 1024 chunks per pipelined SET NX round trip, Redis on loopback",
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let out = bench_output("bench/results/shrinker.json");
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16]);
    netns::available().unwrap();
    let dir = std::env::temp_dir().join(format!("shrink-bench-shrinker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut world = World::new("bs", &[("a1", A1), ("b1", B1), ("b2", B2)], &["a1"], "100mbit").unwrap();
    world.redis("a1", 6379, &dir, false);
    world.redis("b1", 6380, &dir, false);
    let mut runs = Vec::new();
    for &n in &sizes {
        eprintln!("shrinker bench: {n} VM(s) ...");
        let run_dir = dir.join(format!("n{n}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let run = Run { world: &world, dir: run_dir.clone() };
        // With dedup (and memory images for QEMU and the lower bound, taken just before).
        let names: Vec<String> = (0..n).map(|i| format!("d{n}v{i}")).collect();
        let _vms = run.boot(&names);
        let mut images = Vec::new();
        for nm in &names {
            let sock = run_dir.join(format!("{nm}.sock"));
            let snap = run_dir.join(format!("{nm}.snap"));
            api(&sock, "pause", json!({}));
            api(&sock, "snapshot", json!({"path": snap.to_str().unwrap()}));
            api(&sock, "resume", json!({}));
            images.push(snap.join("memory.img"));
        }
        let vc = run.vc("vc-dedup.toml", &names);
        let dedup = run.migrate(&vc, &["--port-base", &format!("{}", 20000 + n * 300)]);
        // Plain pre-copy, a fresh identical cluster.
        let pnames: Vec<String> = (0..n).map(|i| format!("p{n}v{i}")).collect();
        let _pvms = run.boot(&pnames);
        let vcp = run.vc("vc-plain.toml", &pnames);
        let plain = run.migrate(&vcp, &["--no-dedup", "--port-base", &format!("{}", 40000 + n * 300)]);
        // QEMU on the same memory images.
        let (qemu_ms, qemu_bytes) = if Path::new("/usr/bin/qemu-system-x86_64").exists() { qemu_cluster(&world, &run_dir, &images) } else { (0, 0) };
        let (distinct, nonuniform, uniform) = lower_bound(&images);
        let bound_bytes = distinct * 4096 + (nonuniform - distinct) * 40 + uniform * 9;
        let link = 100e6 / 8.0;
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let row = json!({
            "vms": n,
            "shrink": {"total_time_ms": u(&dedup["total_time_ms"]), "wan_bytes": u(&dedup["wan_bytes"]), "full": u(&dedup["full"]),
                       "deduplicated": u(&dedup["deduplicated"]), "pulled": u(&dedup["pulled"]), "fetched_from_peers": u(&dedup["fetched_from_peers"]),
                       "local": u(&dedup["local"]), "uniform": u(&dedup["uniform"]), "failed": u(&dedup["failed"]),
                       "avg_vm_time_ms": dedup["vms"].as_array().map(|v| v.iter().map(|x| u(&x["total_time_ms"])).sum::<u64>() / n as u64),
                       "avg_downtime_ms": dedup["vms"].as_array().map(|v| v.iter().map(|x| u(&x["downtime_ms"])).sum::<u64>() / n as u64)},
            "shrink_no_dedup": {"total_time_ms": u(&plain["total_time_ms"]), "wan_bytes": u(&plain["wan_bytes"]), "full": u(&plain["full"]), "failed": u(&plain["failed"]),
                       "avg_downtime_ms": plain["vms"].as_array().map(|v| v.iter().map(|x| u(&x["downtime_ms"])).sum::<u64>() / n as u64)},
            "qemu": {"total_time_ms": qemu_ms, "wan_bytes": qemu_bytes},
            "lower_bound": {"distinct_pages": distinct, "nonuniform_pages": nonuniform, "bytes": bound_bytes, "time_ms_at_link": (bound_bytes as f64 / link * 1e3) as u64},
            "ratios": {
                "wan_bytes_shrink_over_qemu": u(&dedup["wan_bytes"]) as f64 / qemu_bytes.max(1) as f64,
                "time_shrink_over_qemu": u(&dedup["total_time_ms"]) as f64 / qemu_ms.max(1) as f64,
                "wan_bytes_shrink_over_no_dedup": u(&dedup["wan_bytes"]) as f64 / u(&plain["wan_bytes"]).max(1) as f64,
                "time_shrink_over_no_dedup": u(&dedup["total_time_ms"]) as f64 / u(&plain["total_time_ms"]).max(1) as f64,
                "pulled_fraction": u(&dedup["pulled"]) as f64 / u(&dedup["deduplicated"]).max(1) as f64,
                "wan_bytes_over_lower_bound": u(&dedup["wan_bytes"]) as f64 / bound_bytes.max(1) as f64,
            },
        });
        eprintln!("{row}");
        for v in dedup["vms"].as_array().into_iter().flatten() {
            eprintln!("  {}: peers {} pulled {} corrupt {} peer errors {} index errors {} warnings {}", v["vm"], v["fetched_from_peers"], v["pulled"], v["corrupt_from_peers"], v["peer_errors"], v["index_errors"], v["warnings"]);
        }
        runs.push(row);
        // Free the hosts for the next size: stop the migrated VMs (and QEMUs) in the site-B
        // namespaces — only those: the index Redis runs there too.
        for ns in [world.host("b1").ns.name().to_owned(), world.host("b2").ns.name().to_owned()] {
            if let Ok(pids) = netns::run(&["ip", "netns", "pids", &ns]) {
                for p in pids.split_whitespace() {
                    let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                    if comm.starts_with("shrink-vmm") || comm.starts_with("qemu-system") {
                        let _ = netns::run(&["kill", p]);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        if std::env::var("SHRINK_BENCH_KEEP").is_err() {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
    }
    let pipeline = pipeline_throughput(&world);
    let date = utc_now();
    let doc = json!({
        "benchmark": "shrinker",
        "date": date,
        "command": "cargo bench -p shrink-tests --bench shrinker -- bench/results/shrinker.json",
        "host": {"cores": 2, "kvm": "nested (PVM)"},
        "wan": "100 Mbit/s, tc tbf on the source site's link",
        "vm": {"memory": "256 MiB", "cmdline": CMDLINE, "shared_os_content": "first 64 MiB of the Debian base image: 12810 non-zero pages (~50 MB)", "private": "28 MiB per VM"},
        "runs": runs,
        "source_pipeline": pipeline,
    });
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&doc).unwrap());
    drop(world);
    let _ = std::fs::remove_dir_all(&dir);
}
