//! `shrink-testbed`: two data-centre sites in network namespaces on this machine, with a shaped
//! WAN between their gateways, vnetd on the gateways and Redis at both sites; boots a virtual
//! cluster at site A; and `demo` moves it to site B and back while clients at both sites probe
//! every VM. See `shrink_tools::testbed` for the topology.
//!
//! `shrink-testbed isolate --hide DIR... -- CMD [ARGS...]` (not in `--help`: the testbed's own
//! plumbing) runs CMD in a mount namespace of its own where every DIR is an empty read-only
//! tmpfs; the testbed starts every process on a host of a site that way, hiding the other
//! site's storage. It exits 125 if it cannot hide a DIR and 127 if it cannot run CMD.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use shrink_tools::testbed::{self, default_dir, Bins, BootSpec, Options, Site, Testbed};

#[derive(Parser)]
#[command(name = "shrink-testbed", about = "two sites, a WAN, vnetd and a virtual cluster, in network namespaces")]
struct Cli {
    /// Testbed name: every namespace is `<name>-*`.
    #[arg(long, global = true, default_value = "shrink")]
    name: String,
    /// Working directory (state, configs, logs, disks); default /tmp/shrink-testbed-<name>.
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Net {
    /// WAN rate between the sites (tc syntax: 100mbit, 1gbit).
    #[arg(long, default_value = "100mbit")]
    wan_rate: String,
    /// One-way WAN delay, ms (0 to 1000), added in user space between the border routers.
    #[arg(long, default_value_t = 0)]
    wan_delay_ms: u64,
    /// Compute hosts per site.
    #[arg(long, default_value_t = 2)]
    hosts: usize,
    /// Directory of the shrink binaries (default: $SHRINK_BIN_DIR, else the one this program is in).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory of shrink-guest and base.qcow2 (default: images/out).
    #[arg(long)]
    images: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct Cluster {
    /// Number of VMs.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Memory per VM.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// vCPUs per VM (1 to 32).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    cpus: u8,
    /// Bytes of the base image each guest reads into memory (OS content shared by the VMs).
    #[arg(long, default_value = "64M")]
    preload: String,
    /// Bytes of pseudo-random memory private to each VM.
    #[arg(long, default_value = "28M")]
    private: String,
    /// Guest workload: idle, mem or io.
    #[arg(long, default_value = "idle")]
    workload: String,
    /// Migrate in clear text (`shrink-vmm --plain-tcp`, `plain_tcp = true` in vc.toml) instead
    /// of over TLS on <dir>/cluster.key.
    #[arg(long)]
    plain_tcp: bool,
}

impl Cluster {
    fn spec(&self) -> BootSpec {
        BootSpec {
            vms: self.vms,
            mem: self.mem.clone(),
            cpus: self.cpus,
            preload: self.preload.clone(),
            private: self.private.clone(),
            workload: self.workload.clone(),
            // Every guest writes its disk at boot (and checks it, `disktest=`): its overlay holds
            // blocks of its own, which move with it.
            extra: "disktest=write:40000".into(),
            plain_tcp: self.plain_tcp,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Build both sites and start vnetd and Redis (removing leftovers of an earlier run first).
    Up(Net),
    /// Boot the virtual cluster at site A and write <dir>/vc.toml.
    Boot(Cluster),
    /// Start (or stop, printing their report) UDP probes from a client at each site to every VM.
    Probes {
        /// start or stop.
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        /// Interval between probes to each VM.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
    },
    /// What runs, where the VMs are, vnetd's host routes, WAN bytes (JSON).
    Status,
    /// Remove everything: processes, namespaces (with their bridges, veths, taps), files.
    Down,
    /// The whole story: up, boot, probe, migrate A→B with dedup, back B→A with --no-dedup, report, down.
    Demo {
        #[command(flatten)]
        net: Net,
        #[command(flatten)]
        cluster: Cluster,
        /// Also write the report as JSON to FILE.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Leave the testbed up at the end (`shrink-testbed down` removes it).
        #[arg(long)]
        keep: bool,
    },
    /// The WAN's delay line (how the testbed adds `--wan-delay-ms`): frames read on interface A
    /// go out on B after the delay, and the other way round.
    #[command(hide = true)]
    DelayLine {
        /// One-way delay.
        #[arg(long)]
        delay_ms: u64,
        /// Most bytes held in each direction (more is dropped).
        #[arg(long)]
        limit_bytes: usize,
        a: String,
        b: String,
    },
    /// Run CMD in a mount namespace of its own, with every DIR hidden under an empty read-only
    /// tmpfs (how the testbed runs processes on a site's hosts).
    #[command(hide = true)]
    Isolate {
        /// A directory to hide; repeat for several.
        #[arg(long, value_name = "DIR", required = true)]
        hide: Vec<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
}

/// `shrink-testbed isolate`: hides `hide`, then becomes `cmd` (returns only if it cannot).
fn isolate(hide: &[PathBuf], cmd: &[OsString]) -> ExitCode {
    if let Err(e) = testbed::isolate(hide) {
        eprintln!("shrink-testbed isolate: {e}");
        return ExitCode::from(125);
    }
    let Some((prog, args)) = cmd.split_first() else {
        eprintln!("shrink-testbed isolate: no command to run");
        return ExitCode::from(125);
    };
    let err = std::process::Command::new(prog).args(args).exec();
    eprintln!("shrink-testbed isolate: cannot run {}: {err}", prog.to_string_lossy());
    ExitCode::from(127)
}

fn bins(net: &Net) -> Result<Bins, String> {
    Bins::find(net.bin_dir.as_deref(), net.images.as_deref()).map_err(|e| e.to_string())
}

fn opts(cli: &Cli, net: &Net) -> Options {
    Options {
        name: cli.name.clone(),
        dir: dir(cli),
        wan_rate: net.wan_rate.clone(),
        hosts_per_site: net.hosts,
        wan_delay_ms: net.wan_delay_ms,
    }
}

fn dir(cli: &Cli) -> PathBuf {
    cli.dir.clone().unwrap_or_else(|| default_dir(&cli.name))
}

fn step(msg: &str) {
    println!("\n== {msg}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Up(net) => bins(net).and_then(|b| Testbed::up(opts(&cli, net), b).map_err(|e| e.to_string())).map(|tb| {
            println!(
                "testbed '{}' is up: {} namespaces, vnetd and Redis at both sites; WAN {}, {} ms one way",
                cli.name,
                testbed::namespaces(&cli.name).len(),
                net.wan_rate,
                net.wan_delay_ms
            );
            println!(
                "next: shrink-testbed --name {} boot   (then shrink-migrate --cluster {} --dest siteB)",
                cli.name,
                tb.vc_path().display()
            );
        }),
        Cmd::Boot(c) => Testbed::open(&cli.name, &dir(&cli))
            .and_then(|mut tb| tb.boot(&c.spec()).map(|()| tb))
            .map_err(|e| e.to_string())
            .map(|tb| {
                println!("{} VMs run at site A; cluster description: {}", c.vms, tb.vc_path().display());
                println!("move it: shrink-migrate --cluster {} --dest siteB", tb.vc_path().display());
            }),
        Cmd::Probes { action, interval_ms } => {
            Testbed::open(&cli.name, &dir(&cli)).map_err(|e| e.to_string()).and_then(|tb| {
                if action == "start" {
                    tb.start_probes(*interval_ms)
                        .map_err(|e| e.to_string())
                        .map(|()| println!("probing every VM every {interval_ms} ms from both sites' clients"))
                } else {
                    tb.stop_probes().map_err(|e| e.to_string()).map(|r| {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&json!({"siteA": r[0], "siteB": r[1]})).unwrap_or_default()
                        )
                    })
                }
            })
        }
        Cmd::Status => Testbed::open(&cli.name, &dir(&cli))
            .map_err(|e| e.to_string())
            .map(|tb| println!("{}", serde_json::to_string_pretty(&tb.status()).unwrap_or_default())),
        Cmd::Down => testbed::down(&cli.name, &dir(&cli)).map_err(|e| e.to_string()).map(|r| {
            println!(
                "testbed '{}' removed: {} namespaces, {} processes{}",
                cli.name,
                r.namespaces.len(),
                r.processes,
                if r.dir { ", working directory" } else { "" }
            );
        }),
        Cmd::Demo { net, cluster, report, keep } => demo(&cli, net, cluster, report.as_deref(), *keep),
        Cmd::Isolate { hide, cmd } => return isolate(hide, cmd),
        Cmd::DelayLine { delay_ms, limit_bytes, a, b } => {
            shrink_tools::delayline::run(a, b, Duration::from_millis(*delay_ms), *limit_bytes)
                .map_err(|e| e.to_string())
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shrink-testbed: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One direction of the demo: the migration report, probes and vnetd's timings.
struct Leg {
    title: String,
    dest: Site,
    ok: bool,
    report: Value,
    probes: [Value; 2],
    wan_bytes: u64,
    network: Vec<Value>,
}

fn demo(cli: &Cli, net: &Net, cluster: &Cluster, report_file: Option<&Path>, keep: bool) -> Result<(), String> {
    let t0 = Instant::now();
    let b = bins(net)?;
    step(&format!(
        "1. two sites in network namespaces '{}-*': LANs, gateways with vnetd, Redis, a {} WAN",
        cli.name, net.wan_rate
    ));
    let mut tb = Testbed::up(opts(cli, net), b).map_err(|e| e.to_string())?;
    let r = demo_run(&mut tb, net, cluster, t0);
    if let Ok(legs) = &r {
        let j = report_json(&tb, net, cluster, legs);
        if let Some(f) = report_file {
            if let Some(d) = f.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            match std::fs::write(f, serde_json::to_string_pretty(&j).unwrap_or_default()) {
                Ok(()) => println!("\nreport (JSON): {}", f.display()),
                Err(e) => eprintln!("shrink-testbed: warning: {}: {e}", f.display()),
            }
        }
    }
    if keep {
        println!(
            "\nthe testbed stays up (vc.toml: {}); remove it with: shrink-testbed --name {} down",
            tb.vc_path().display(),
            cli.name
        );
    } else {
        step("tear down");
        match testbed::down(&cli.name, tb.dir()) {
            Ok(removed) => {
                println!("removed {} namespaces and {} processes", removed.namespaces.len(), removed.processes)
            }
            // The run's own error (if any) matters more; this one is reported beside it.
            Err(e) if r.is_err() => eprintln!("shrink-testbed: tear down: {e}"),
            Err(e) => return Err(e.to_string()),
        }
    }
    let legs = r?;
    let bad: Vec<String> = legs.iter().flat_map(problems).collect();
    println!("\ndemo finished in {:.0} s", t0.elapsed().as_secs_f64());
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("the demo found problems:\n  {}", bad.join("\n  ")))
    }
}

fn demo_run(tb: &mut Testbed, net: &Net, cluster: &Cluster, t0: Instant) -> Result<Vec<Leg>, String> {
    let e = |e: testbed::TestbedError| e.to_string();
    step(&format!(
        "2. boot {} VMs at site A from base.qcow2 ({} each, preload={} of OS content, private={}), on {} hosts",
        cluster.vms, cluster.mem, cluster.preload, cluster.private, net.hosts
    ));
    tb.boot(&cluster.spec()).map_err(e)?;
    for (vm, _, host, _) in tb.locations().map_err(e)? {
        println!("  {} {} {} on {host}", vm.name, vm.ip, vm.mac);
    }
    println!("  booted in {:.1} s; cluster description: {}", t0.elapsed().as_secs_f64(), tb.vc_path().display());
    let mut legs = Vec::new();
    for (dest, extra, title) in
        [(Site::B, &[][..], "A→B, shrink (dedup)"), (Site::A, &["--no-dedup"][..], "B→A, --no-dedup")]
    {
        step(&format!(
            "{}. clients at 10.1.0.100 (site A) and 10.1.1.100 (site B) probe every VM over UDP every 10 ms; shrink-migrate --cluster vc.toml --dest {}{}",
            legs.len() + 3,
            dest.name(),
            extra.iter().map(|a| format!(" {a}")).collect::<String>()
        ));
        tb.start_probes(10).map_err(e)?;
        std::thread::sleep(Duration::from_secs(2));
        let (a0, b0) = tb.wan_bytes().map_err(e)?;
        let (ok, report) = tb.migrate(dest, extra, &format!("to-{}", dest.letter()), true).map_err(e)?;
        let (a1, b1) = tb.wan_bytes().map_err(e)?;
        // Let the network settle and show that every VM answers from its new site.
        std::thread::sleep(Duration::from_secs(3));
        let probes = tb.stop_probes().map_err(e)?;
        let wan_bytes = if dest == Site::B { a1 - a0 } else { b1 - b0 };
        let network = tb.network_report(dest, &report, &probes);
        let leg = Leg { title: title.into(), dest, ok, report, probes, wan_bytes, network };
        print_connectivity(&leg);
        legs.push(leg);
        if !ok {
            break;
        }
    }
    step("report");
    print_report(net, cluster, &legs);
    Ok(legs)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn print_connectivity(leg: &Leg) {
    println!("\n  connectivity during {} (probes every 10 ms; lost = never answered)", leg.title);
    println!(
        "  {:<6} {:>8} | {:>7} {:>9} {:>7} | {:>7} {:>9} {:>7} | {:>9} {:>11}",
        "vm", "down ms", "lost A", "gap A ms", "now A", "lost B", "gap B ms", "now B", "detect ms", "routers ms"
    );
    let f = |x: &Value| x.as_f64().map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    for n in &leg.network {
        println!(
            "  {:<6} {:>8} | {:>7} {:>9.0} {:>7} | {:>7} {:>9.0} {:>7} | {:>9} {:>11}",
            n["vm"].as_str().unwrap_or(""),
            u(&n["downtime_ms"]),
            u(&n["lost_a"]),
            n["gap_a_ms"].as_f64().unwrap_or(0.0),
            n["answers_a_now"].as_str().unwrap_or(""),
            u(&n["lost_b"]),
            n["gap_b_ms"].as_f64().unwrap_or(0.0),
            n["answers_b_now"].as_str().unwrap_or(""),
            f(&n["detection_ms"]),
            f(&n["reconfiguration_ms"]),
        );
    }
    println!("  (gap = longest time without an answer; now = answered/sent in the last 2 s; detect = vnetd at {} from the VM's RARP to its IP known, routers = to every router holding its /32)", leg.dest.name());
}

fn print_report(net: &Net, cluster: &Cluster, legs: &[Leg]) {
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "{} VMs × {} (preload {} shared OS content, {} private each), {} WAN, {} hosts per site; {}",
        cluster.vms,
        cluster.mem,
        cluster.preload,
        cluster.private,
        net.wan_rate,
        net.hosts,
        shrink_testutil::util::utc_now()
    );
    println!("shrink {} on {}", env!("CARGO_PKG_VERSION"), shrink_testutil::util::machine());
    let row = |name: &str, f: &dyn Fn(&Leg) -> String| {
        let mut s = format!("  {name:<34}");
        for l in legs {
            s += &format!(" {:>22}", f(l));
        }
        println!("{s}");
    };
    row("", &|l| l.title.clone());
    row("chunks sent in full", &|l| u(&l.report["full"]).to_string());
    row("  of which compressed (zstd)", &|l| u(&l.report["compressed"]).to_string());
    row("deduplicated (digest only)", &|l| u(&l.report["deduplicated"]).to_string());
    row("  found locally at the destination", &|l| u(&l.report["local"]).to_string());
    row("  fetched from peer hypervisors", &|l| u(&l.report["fetched_from_peers"]).to_string());
    row("  read from the site's repository", &|l| u(&l.report["repository"]).to_string());
    row("  pulled back from the source", &|l| u(&l.report["pulled"]).to_string());
    row("uniform (one byte each)", &|l| u(&l.report["uniform"]).to_string());
    row("of these, disk blocks full/digest/unif.", &|l| {
        let d = &l.report["disk"];
        format!("{}/{}/{}", u(&d["full"]), u(&d["deduplicated"]), u(&d["uniform"]))
    });
    row("  disk entries on the stream, MB", &|l| format!("{:.1}", mb(u(&l.report["disk"]["wan_bytes"]))));
    row("disks removed at the old site", &|l| {
        let n: usize = l.report["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["removed"].as_array().map_or(0, |a| a.len()))
            .sum();
        n.to_string()
    });
    row("migration stream, MB", &|l| format!("{:.1}", mb(u(&l.report["wan_bytes"]))));
    row("bytes into the WAN link, MB", &|l| format!("{:.1}", mb(l.wan_bytes)));
    row("total time, s", &|l| format!("{:.1}", u(&l.report["total_time_ms"]) as f64 / 1000.0));
    row("downtime per VM, ms (max)", &|l| {
        let d: Vec<u64> = l.report["vms"].as_array().into_iter().flatten().map(|v| u(&v["downtime_ms"])).collect();
        format!("{}", d.iter().max().unwrap_or(&0))
    });
    row("probes lost per VM, site A/B (max)", &|l| {
        let m = |k: &str| l.network.iter().map(|n| u(&n[k])).max().unwrap_or(0);
        format!("{}/{}", m("lost_a"), m("lost_b"))
    });
    row("longest gap, ms (max)", &|l| {
        let g = l
            .network
            .iter()
            .flat_map(|n| [&n["gap_a_ms"], &n["gap_b_ms"]].map(|g| g.as_f64().unwrap_or(0.0)))
            .fold(0.0, f64::max);
        format!("{g:.0}")
    });
    row("VMs failed", &|l| u(&l.report["failed"]).to_string());
    if legs.len() == 2 {
        let r = |k: &str| u(&legs[0].report[k]) as f64 / u(&legs[1].report[k]).max(1) as f64;
        println!(
            "\n  shrink moved the cluster with {:.2}× the WAN bytes and {:.2}× the time of plain pre-copy.",
            r("wan_bytes"),
            r("total_time_ms")
        );
    }
    for l in legs {
        for v in l.report["vms"].as_array().into_iter().flatten() {
            if v["status"] != "completed" {
                println!(
                    "  {}: {} {}: {}",
                    l.title,
                    v["vm"].as_str().unwrap_or(""),
                    v["status"].as_str().unwrap_or(""),
                    v["error"].as_str().unwrap_or("")
                );
            }
        }
    }
}

/// What went wrong in a leg (empty if nothing).
fn problems(l: &Leg) -> Vec<String> {
    let mut out = Vec::new();
    if !l.ok {
        out.push(format!("{}: shrink-migrate failed ({} VMs failed)", l.title, u(&l.report["failed"])));
    }
    for n in &l.network {
        if n["answering"] != true {
            out.push(format!(
                "{}: {} does not answer both clients after the migration (site A {}, site B {})",
                l.title,
                n["vm"].as_str().unwrap_or(""),
                n["answers_a_now"].as_str().unwrap_or(""),
                n["answers_b_now"].as_str().unwrap_or("")
            ));
        }
    }
    out
}

fn report_json(tb: &Testbed, net: &Net, cluster: &Cluster, legs: &[Leg]) -> Value {
    json!({
        "date": shrink_testutil::util::utc_now(),
        "testbed": {"wan_rate": net.wan_rate, "hosts_per_site": net.hosts},
        "cluster": {"vms": cluster.vms, "mem": cluster.mem, "preload": cluster.preload, "private": cluster.private, "workload": cluster.workload,
            "addresses": tb.state.vms.iter().map(|v| json!({"vm": v.name, "ip": v.ip, "mac": v.mac})).collect::<Vec<_>>()},
        "legs": legs.iter().map(|l| json!({"title": l.title, "dest": l.dest.name(), "ok": l.ok, "migration": l.report,
            "wan_link_bytes": l.wan_bytes, "probes": {"siteA": l.probes[0], "siteB": l.probes[1]}, "network": l.network})).collect::<Vec<_>>(),
    })
}
