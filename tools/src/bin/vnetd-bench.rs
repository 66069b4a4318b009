//! `vnetd-bench OUT.json`: the vnetd benchmark on the two-site namespace testbed (root).
//!
//! - detection-to-reconfigured time for several moves (first RARP of the move captured at
//!   the destination → its IP resolved → every router holds the /32 → first gratuitous
//!   ARP out at the source), from the routers' migration records and `--pcap-out`
//!   timestamps. Every time is measured from the kernel's capture timestamp of the first
//!   RARP (its pcap header `ts`, which vnetd records as `detected_us`), so the time the
//!   frame waited in the capture path counts; all timestamps are CLOCK_REALTIME µs
//!   (pcap host timestamps and `SystemTime`), one clock on this one host;
//! - the connectivity gap of a 1 kHz UDP stream A1 → VM across each move;
//! - repair after a gateway crash: with site A's VM at site B and site B's VM at site A,
//!   `kill -9` of vnetd A, of vnetd B, and of both, each restarted at once, with 1 kHz UDP
//!   streams A1 → VM and B1 → VM2 across the other site: when the new vnetd answered, when
//!   both /32s agreed again (from its start), and each stream's outage (from the kill);
//! - the cost of active probing, counted in vnetd's `--pcap-out` (frames per sweep, the
//!   sweeps' period and duration, hence frames per minute per /24);
//! - TCP throughput and UDP round-trip latency A1 → B1 through the vnetd tunnel and
//!   through a plain kernel-routed path between the same namespaces, with an unlimited
//!   WAN link and with `tc tbf` at 100 Mbit/s.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use netreconf::frames::{self, Frame};
use serde_json::{json, Value};
use shrink_testutil::process::{bin_dir, build_hint};
use shrink_tools::vnet::*;

struct Bins {
    vnetd: PathBuf,
    probe: String,
}

/// vnetd and vnet-probe of this build ([`bin_dir`]: the directory of this program).
fn bins() -> R<Bins> {
    let dir = bin_dir();
    let (vnetd, probe) = (dir.join("vnetd"), dir.join("vnet-probe"));
    for p in [&vnetd, &probe] {
        if !p.is_file() {
            return Err(format!("{} not found: {}", p.display(), build_hint(&dir)).into());
        }
    }
    Ok(Bins { vnetd, probe: probe.to_string_lossy().into_owned() })
}

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// (timestamp µs, frame) of every frame in a pcap file.
fn read_pcap(p: &Path) -> R<Vec<(u64, Vec<u8>)>> {
    let mut cap = pcap::Capture::from_file(p)?;
    let mut out = Vec::new();
    while let Ok(pk) = cap.next_packet() {
        let ts = pk.header.ts.tv_sec as u64 * 1_000_000 + pk.header.ts.tv_usec as u64;
        out.push((ts, pk.data.to_vec()));
    }
    Ok(out)
}

fn first_after(frames_: &[(u64, Vec<u8>)], after: u64, pred: impl Fn(&frames::Arp, bool) -> bool) -> Option<u64> {
    frames_.iter().find_map(|(ts, f)| {
        if *ts < after {
            return None;
        }
        match frames::parse(f) {
            Ok(Frame::Arp(a)) if pred(&a, false) => Some(*ts),
            Ok(Frame::Rarp(a)) if pred(&a, true) => Some(*ts),
            _ => None,
        }
    })
}

fn stats(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    json!({
        "n": s.len(),
        "min": s[0],
        "median": s[s.len() / 2],
        "max": s[s.len() - 1],
        "mean": s.iter().sum::<f64>() / s.len() as f64,
    })
}

fn migrate(tb: &mut TwoSites, b: &Bins, to: Site, seq: u64) -> R<Value> {
    let (dest, src, dest_name, src_mac) = match to {
        Site::A => (Site::A, Site::B, "A", RB_MAC),
        Site::B => (Site::B, Site::A, "B", RA_MAC),
    };
    let stream = start_stream(tb, "a1", "vm", VM_IP, 9000, &format!("mig{seq}"))?;
    std::thread::sleep(Duration::from_millis(500));
    // The RARP sender is started first and waits for the "resume" signal, as QEMU
    // announces right when the VM resumes.
    let go = tb.dir.join(format!("go{seq}"));
    let mut announcer = Proc::spawn(
        "rarp",
        &tb.ns("vm"),
        &[&b.probe, "rarp", "--iface", "eth0", "--mac", &VM_MAC.to_string(), "--wait-file", go.to_str().unwrap_or("")],
        tb.dir.join(format!("rarp{seq}.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let t_move = netreconf::router::wall_us();
    tb.move_vm(to)?;
    std::fs::write(&go, b"go")?;
    let t_resume = netreconf::router::wall_us();
    announcer.wait(10)?;
    let route_seq = wait_route(tb, dest_name, t_move)?;
    let (a1_expect, vm_expect) = match to {
        Site::B => (RA_MAC, RB_MAC),
        Site::A => (VM_MAC, A1_MAC),
    };
    tb.wait_neigh("a1", VM_IP, a1_expect, 10)?;
    tb.wait_neigh("vm", A1_IP, vm_expect, 10)?;
    tb.ping("a1", VM_IP, 10)?;
    std::thread::sleep(Duration::from_millis(500));
    let udp = stop_stream(stream)?;
    // Let the repeated announcements finish before the next move.
    std::thread::sleep(Duration::from_millis(2600));

    let st = tb.status(dest)?;
    let rec = st["migrations"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|r| r["role"] == "destination" && r["seq"] == route_seq))
        .cloned()
        .unwrap_or(Value::Null);
    let dp = read_pcap(&tb.pcap(dest))?;
    let sp = read_pcap(&tb.pcap(src))?;
    // The first RARP of the move in the destination's --pcap-out: the frame vnetd timed
    // the move from (same capture timestamp as the record's `detected_us`).
    let t_rarp_file = first_after(&dp, t_move, |a, rarp| rarp && a.sha == VM_MAC);
    let t_garp = first_after(&sp, t_move, |a, _| a.is_gratuitous() && a.spa == VM_IP && a.sha == src_mac);
    let t_vm_update =
        first_after(&dp, t_move, |a, _| a.eth_dst == VM_MAC && a.tpa == VM_IP && a.op == frames::OP_REQUEST);
    let ms = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => json!((a as f64 - b as f64) / 1000.0),
        _ => Value::Null,
    };
    let detected = rec["detected_us"].as_u64();
    let t_rarp = detected.or(t_rarp_file);
    Ok(json!({
        "to": dest_name,
        "move": seq,
        "route_seq": route_seq,
        "detected_at_first_rarp_capture": detected.is_some() && detected == t_rarp_file,
        "rarp_captured_to_vnetd_read_ms": ms(rec["detection_read_us"].as_u64(), detected),
        "rarp_seen_to_ip_resolved_ms": ms(rec["resolved_us"].as_u64(), detected),
        "rarp_seen_to_all_routers_ms": ms(rec["all_acked_us"].as_u64(), detected),
        "rarp_seen_to_first_garp_out_ms": ms(t_garp, t_rarp),
        "rarp_seen_to_first_vm_update_out_ms": ms(t_vm_update, t_rarp),
        "link_move_to_rarp_seen_ms": ms(t_rarp, Some(t_move)),
        "link_move_ms": (t_resume as f64 - t_move as f64) / 1000.0,
        "udp_gap_ms": udp["max_gap_ms"],
        "udp_restored_after_rarp_ms": ms(udp["max_gap_end_us"].as_u64(), t_rarp),
        "udp_lost": udp["lost"],
        "udp_received": udp["received"],
    }))
}

fn throughput_latency(tb: &TwoSites, b: &Bins, label: &str) -> R<Value> {
    let stop = tb.dir.join(format!("{label}.stop"));
    let _ = std::fs::remove_file(&stop);
    let mut sink = Proc::spawn(
        "tcp-sink",
        &tb.ns("b1"),
        &[&b.probe, "tcp-sink", "--bind", "10.1.1.1:5201", "--stop-file", stop.to_str().unwrap_or("")],
        tb.dir.join(format!("{label}-sink.log")),
    )?;
    let mut echo = Proc::spawn(
        "udp-echo",
        &tb.ns("b1"),
        &[&b.probe, "udp-echo", "--bind", "10.1.1.1:5202", "--stop-file", stop.to_str().unwrap_or("")],
        tb.dir.join(format!("{label}-echo.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    tb.ping("a1", B1_IP, 10)?;
    let rtt: Value = serde_json::from_str(
        nsrun(
            &tb.ns("a1"),
            &[&b.probe, "udp-rtt", "--to", "10.1.1.1:5202", "--count", "1000", "--interval-us", "1000"],
        )?
        .trim(),
    )?;
    let tcp: Value = serde_json::from_str(
        nsrun(&tb.ns("a1"), &[&b.probe, "tcp-send", "--to", "10.1.1.1:5201", "--seconds", "5"])?.trim(),
    )?;
    std::fs::write(&stop, b"stop")?;
    let _ = sink.wait(10);
    let _ = echo.wait(10);
    Ok(json!({"tcp": tcp, "udp_rtt": rtt}))
}

fn plain_routing(tb: &TwoSites, on: bool) -> R<()> {
    for (r, addr, peer, remote) in [
        ("ra", "10.1.0.254/24", "192.168.100.2", "10.1.1.0/24"),
        ("rb", "10.1.1.254/24", "192.168.100.1", "10.1.0.0/24"),
    ] {
        let ns = tb.ns(r);
        if on {
            run(&["ip", "-n", &ns, "addr", "add", addr, "dev", "lan0"])?;
            run(&["ip", "-n", &ns, "route", "add", remote, "via", peer])?;
            nsrun(&ns, &["sysctl", "-qw", "net.ipv4.conf.lan0.proxy_arp=1"])?;
            nsrun(&ns, &["sysctl", "-qw", "net.ipv4.neigh.lan0.proxy_delay=0"])?;
            nsrun(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        } else {
            nsrun(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
            nsrun(&ns, &["sysctl", "-qw", "net.ipv4.conf.lan0.proxy_arp=0"])?;
            let _ = run(&["ip", "-n", &ns, "route", "del", remote]);
            let _ = run(&["ip", "-n", &ns, "addr", "del", addr, "dev", "lan0"]);
        }
    }
    Ok(())
}

fn wan_tbf(tb: &TwoSites, on: bool) -> R<()> {
    for r in ["ra", "rb"] {
        let ns = tb.ns(r);
        if on {
            run(&[
                "ip", "netns", "exec", &ns, "tc", "qdisc", "replace", "dev", "wan0", "root", "tbf", "rate", "100mbit",
                "burst", "256kb", "latency", "50ms",
            ])?;
        } else {
            let _ = run(&["ip", "netns", "exec", &ns, "tc", "qdisc", "del", "dev", "wan0", "root"]);
        }
    }
    Ok(())
}

/// Both VMs' /32s agree at both routers, to their current sites, with a sequence number of
/// at least the given ones; returns the sequence numbers.
fn routes_agree(tb: &TwoSites, min: (u64, u64)) -> R<(u64, u64)> {
    let a = wait_host_route(tb, VM_IP, "B", min.0)?;
    let b = wait_host_route(tb, VM2_IP, "A", min.1)?;
    Ok((a, b))
}

/// Crash-and-restart rounds of the gateways (see the module comment).
fn restarts(tb: &mut TwoSites, b: &Bins, rounds: u32) -> R<Value> {
    for (mv, vm, mac) in [(Site::B, "vm", VM_MAC), (Site::A, "vm2", VM2_MAC)] {
        if vm == "vm" {
            tb.move_vm(mv)?;
        } else {
            tb.move_vm2(mv)?;
        }
        nsrun(&tb.ns(vm), &[&b.probe, "rarp", "--iface", "eth0", "--mac", &mac.to_string()])?;
    }
    let mut seqs = routes_agree(tb, (1, 1))?;
    let mut out = Vec::new();
    let mut port = 9300;
    for round in 0..rounds {
        for (what, sites) in [("A", vec![Site::A]), ("B", vec![Site::B]), ("both", vec![Site::A, Site::B])] {
            let s1 = start_stream(tb, "a1", "vm", VM_IP, port, &format!("rs-vm-{port}"))?;
            let s2 = start_stream(tb, "b1", "vm2", VM2_IP, port + 1, &format!("rs-vm2-{port}"))?;
            port += 2;
            std::thread::sleep(Duration::from_millis(500));
            for s in &sites {
                tb.kill_vnetd(*s);
            }
            let t0 = std::time::Instant::now();
            for s in &sites {
                tb.restart_vnetd(&b.vnetd, *s)?;
            }
            for s in &sites {
                tb.wait_vnetd(*s)?;
            }
            let up_ms = t0.elapsed().as_secs_f64() * 1e3;
            seqs = routes_agree(tb, seqs)?;
            let routes_ms = t0.elapsed().as_secs_f64() * 1e3;
            std::thread::sleep(Duration::from_millis(1000));
            let (r1, r2) = (stop_stream(s1)?, stop_stream(s2)?);
            let m = json!({
                "round": round + 1, "restarted": what,
                "control_socket_up_ms": up_ms, "routes_agree_ms": routes_ms,
                "outage_a1_to_vm_ms": r1["max_gap_ms"], "outage_b1_to_vm2_ms": r2["max_gap_ms"],
                "lost_a1_to_vm": r1["lost"], "lost_b1_to_vm2": r2["lost"],
            });
            eprintln!("restart: {m}");
            out.push(m);
        }
    }
    // Home again.
    tb.move_vm(Site::A)?;
    nsrun(&tb.ns("vm"), &[&b.probe, "rarp", "--iface", "eth0", "--mac", &VM_MAC.to_string()])?;
    tb.move_vm2(Site::B)?;
    nsrun(&tb.ns("vm2"), &[&b.probe, "rarp", "--iface", "eth0", "--mac", &VM2_MAC.to_string()])?;
    wait_host_route(tb, VM_IP, "A", seqs.0 + 1)?;
    wait_host_route(tb, VM2_IP, "B", seqs.1 + 1)?;
    let col = |k: &str, who: &str| -> Vec<f64> {
        out.iter().filter(|m| who.is_empty() || m["restarted"] == who).filter_map(|m| m[k].as_f64()).collect()
    };
    let mut by = serde_json::Map::new();
    for who in ["A", "B", "both"] {
        let outage: Vec<f64> =
            col("outage_a1_to_vm_ms", who).into_iter().chain(col("outage_b1_to_vm2_ms", who)).collect();
        by.insert(
            who.into(),
            json!({
                "control_socket_up_ms": stats(&col("control_socket_up_ms", who)),
                "routes_agree_ms": stats(&col("routes_agree_ms", who)),
                "stream_outage_ms": stats(&outage),
            }),
        );
    }
    Ok(json!({
        "rounds": out,
        "by_restarted_gateway": by,
        "note": "site A's VM at site B, site B's VM (vm2) at site A; `kill -9` of vnetd, restarted at once; control_socket_up and routes_agree are from the restart (spawn) of the new vnetd, routes_agree = both VMs' /32s equal at both routers and pointing to the VMs' sites; stream outage = longest inter-arrival gap of the 1 kHz streams A1 -> VM and B1 -> VM2, which includes the time from the kill to the restart",
    }))
}

/// The cost of probing, measured: vnetd A restarted with sweeps every `interval_s` (the
/// defaults otherwise) for `secs`; its probe frames counted in its `--pcap-out` file.
fn probe_cost(tb: &mut TwoSites, b: &Bins, interval_s: u64, secs: u64) -> R<Value> {
    tb.extra_config = format!("\n[probe]\ninterval_s = {interval_s}\n");
    tb.kill_vnetd(Site::A);
    let t0 = netreconf::router::wall_us();
    tb.restart_vnetd(&b.vnetd, Site::A)?;
    tb.wait_vnetd(Site::A)?;
    std::thread::sleep(Duration::from_secs(secs));
    let router_ip: std::net::Ipv4Addr = "10.1.0.254".parse()?;
    let sent: Vec<(u64, std::net::Ipv4Addr)> = read_pcap(&tb.pcap(Site::A))?
        .into_iter()
        .filter(|(ts, _)| *ts >= t0)
        .filter_map(|(ts, f)| match frames::parse(&f) {
            Ok(Frame::Arp(a)) if a.op == frames::OP_REQUEST && a.sha == RA_MAC && a.spa == router_ip => {
                Some((ts, a.tpa))
            }
            _ => None,
        })
        .collect();
    tb.extra_config.clear();
    // Sweeps: runs of frames without a pause of a second.
    let mut sweeps: Vec<Vec<(u64, std::net::Ipv4Addr)>> = Vec::new();
    for f in sent {
        match sweeps.last_mut() {
            Some(s) if f.0 - s.last().map(|x| x.0).unwrap_or(f.0) < 1_000_000 => s.push(f),
            _ => sweeps.push(vec![f]),
        }
    }
    let describe = |s: &Vec<(u64, std::net::Ipv4Addr)>| {
        let own = s.iter().filter(|(_, ip)| ip.octets()[2] == 0).count();
        json!({
            "frames": s.len(), "own_prefix_frames": own, "peer_prefix_frames": s.len() - own,
            "duration_ms": (s.last().map(|x| x.0).unwrap_or(0) - s.first().map(|x| x.0).unwrap_or(0)) as f64 / 1000.0,
        })
    };
    let periodic: Vec<&Vec<(u64, std::net::Ipv4Addr)>> = sweeps.iter().skip(1).filter(|s| s.len() > 1).collect();
    let starts: Vec<f64> = periodic.iter().map(|s| s[0].0 as f64 / 1000.0).collect();
    let period_ms: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    let per_sweep = periodic.first().map(|s| s.len()).unwrap_or(0);
    let default_interval = netreconf::config::Probe::default().interval.as_secs_f64();
    Ok(json!({
        "interval_s": interval_s, "observed_s": secs,
        "sweep_at_start": sweeps.first().map(describe),
        "periodic_sweeps": periodic.iter().map(|s| describe(s)).collect::<Vec<_>>(),
        "periodic_sweep_period_ms": period_ms,
        "frames_per_periodic_sweep": per_sweep,
        "frames_per_minute_per_24_at_default_interval": per_sweep as f64 * 60.0 / default_interval,
        "note": "counted in vnetd A's --pcap-out: ARP requests from the router's MAC and address; the LNDT of site A is one /24 (253 addresses to ask besides the gateway's); sweeps start interval_s apart, so at the default interval a /24 costs frames_per_periodic_sweep x 60 / default interval (s) frames per minute; each frame is a 42-byte broadcast (60 bytes on the wire)",
    }))
}

fn bench(out: &Path, moves: u32) -> R<()> {
    let b = bins()?;
    let mut tb = TwoSites::build("bench")?;
    tb.start_vnetd(&b.vnetd)?;
    for (from, to) in [("a1", VM_IP), ("vm", A1_IP), ("b1", VM_IP), ("a1", B1_IP)] {
        tb.ping(from, to, 10)?;
    }
    let mut migrations = Vec::new();
    for i in 0..moves {
        let to = if i % 2 == 0 { Site::B } else { Site::A };
        let m = migrate(&mut tb, &b, to, u64::from(i) + 1)?;
        eprintln!("move {}: {m}", i + 1);
        migrations.push(m);
    }
    if tb.vm_site == Site::B {
        tb.move_vm(Site::A)?;
        nsrun(&tb.ns("vm"), &[&b.probe, "rarp", "--iface", "eth0", "--mac", &VM_MAC.to_string()])?;
        std::thread::sleep(Duration::from_millis(1500));
    }
    let col = |k: &str| -> Vec<f64> { migrations.iter().filter_map(|m| m[k].as_f64()).collect() };
    eprintln!("gateway crash and restart rounds...");
    let restart = restarts(&mut tb, &b, 3)?;
    eprintln!("probing cost (vnetd A restarted with a sweep every 20 s, watched for 45 s)...");
    let probe = probe_cost(&mut tb, &b, 20, 45)?;

    eprintln!("throughput/latency through vnetd (unlimited WAN)...");
    let v_unl = throughput_latency(&tb, &b, "vnetd-unl")?;
    wan_tbf(&tb, true)?;
    eprintln!("throughput/latency through vnetd (WAN tbf 100 Mbit/s)...");
    let v_tbf = throughput_latency(&tb, &b, "vnetd-tbf")?;
    wan_tbf(&tb, false)?;
    let status_a = tb.status(Site::A)?;
    tb.stop_vnetd();
    plain_routing(&tb, true)?;
    eprintln!("throughput/latency plain kernel routing (unlimited WAN)...");
    let p_unl = throughput_latency(&tb, &b, "plain-unl")?;
    wan_tbf(&tb, true)?;
    eprintln!("throughput/latency plain kernel routing (WAN tbf 100 Mbit/s)...");
    let p_tbf = throughput_latency(&tb, &b, "plain-tbf")?;
    wan_tbf(&tb, false)?;
    plain_routing(&tb, false)?;

    let cmp = |v: &Value, p: &Value| {
        let vt = v["tcp"]["mbit_s"].as_f64().unwrap_or(0.0);
        let pt = p["tcp"]["mbit_s"].as_f64().unwrap_or(0.0);
        let vl = v["udp_rtt"]["p50_us"].as_f64().unwrap_or(0.0);
        let pl = p["udp_rtt"]["p50_us"].as_f64().unwrap_or(0.0);
        json!({
            "vnetd_tcp_mbit_s": vt, "plain_tcp_mbit_s": pt,
            "vnetd_over_plain_throughput": if pt > 0.0 { vt / pt } else { 0.0 },
            "vnetd_rtt_p50_us": vl, "plain_rtt_p50_us": pl,
            "added_rtt_p50_us": vl - pl,
            "vnetd_rtt_min_us": v["udp_rtt"]["min_us"], "plain_rtt_min_us": p["udp_rtt"]["min_us"],
            "added_rtt_min_us": v["udp_rtt"]["min_us"].as_f64().unwrap_or(0.0) - p["udp_rtt"]["min_us"].as_f64().unwrap_or(0.0),
            "vnetd_rtt_p99_us": v["udp_rtt"]["p99_us"], "plain_rtt_p99_us": p["udp_rtt"]["p99_us"],
            "raw": {"vnetd": v, "plain": p},
        })
    };
    let uname = run(&["uname", "-r"]).unwrap_or_default().trim().to_string();
    let result = json!({
        "benchmark": "vnetd",
        "command": format!("vnetd-bench {} --moves {moves}", out.display()),
        "timestamp_unix": netreconf::router::wall_us() / 1_000_000,
        "kernel": uname,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "testbed": "network namespaces: bridge per site, vnetd per router namespace (libpcap on a veth into the bridge), veth WAN link (MTU 1600); hosts A1 10.1.0.1, VM 10.1.0.10, B1 10.1.1.1 in 10.1.0.0/16",
        "migration": {
            "moves": migrations,
            "rarp_captured_to_vnetd_read_ms": stats(&col("rarp_captured_to_vnetd_read_ms")),
            "rarp_seen_to_ip_resolved_ms": stats(&col("rarp_seen_to_ip_resolved_ms")),
            "rarp_seen_to_all_routers_ms": stats(&col("rarp_seen_to_all_routers_ms")),
            "rarp_seen_to_first_garp_out_ms": stats(&col("rarp_seen_to_first_garp_out_ms")),
            "rarp_seen_to_first_vm_update_out_ms": stats(&col("rarp_seen_to_first_vm_update_out_ms")),
            "udp_gap_a1_to_vm_ms": stats(&col("udp_gap_ms")),
            "udp_restored_after_rarp_ms": stats(&col("udp_restored_after_rarp_ms")),
            "link_move_ms": stats(&col("link_move_ms")),
            "note": "udp gap = longest inter-arrival gap of a 1 kHz UDP stream A1 -> VM; it includes the simulated move itself (two `ip link` commands moving the VM's veth between bridges, link_move_ms); udp_restored_after_rarp = first datagram after the gap minus first RARP seen at the destination router; \"rarp_seen\" = the kernel's capture timestamp of the move's first RARP at the destination (pcap header ts, recorded by vnetd as detected_us), so capture queueing is included (rarp_captured_to_vnetd_read = the part spent before vnetd read the frame)",
        },
        "tunnel_vs_plain_routing": {
            "unlimited_wan": cmp(&v_unl, &p_unl),
            "wan_tbf_100mbit": cmp(&v_tbf, &p_tbf),
            "note": "A1 -> B1: TCP bulk send for 5 s; UDP echo RTT, 1000 probes at 1 ms (p50 is sensitive to other load on the 2-core machine; min is the steadier figure). Plain = same namespaces, kernel IP forwarding + proxy ARP on the routers, vnetd stopped",
        },
        "restart": restart,
        "probe": probe,
        "vnetd_counters_site_a": status_a["counters"],
        "vnetd_daemon_site_a": status_a["daemon"],
    });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "restart": result["restart"]["by_restarted_gateway"],
            "probe_frames_per_minute_per_24": result["probe"]["frames_per_minute_per_24_at_default_interval"],
            "migration": {
                "rarp_seen_to_all_routers_ms": result["migration"]["rarp_seen_to_all_routers_ms"],
                "rarp_seen_to_first_garp_out_ms": result["migration"]["rarp_seen_to_first_garp_out_ms"],
                "udp_gap_a1_to_vm_ms": result["migration"]["udp_gap_a1_to_vm_ms"],
                "udp_restored_after_rarp_ms": result["migration"]["udp_restored_after_rarp_ms"],
                "link_move_ms": result["migration"]["link_move_ms"],
            },
            "unlimited_wan": {
                "vnetd_tcp_mbit_s": result["tunnel_vs_plain_routing"]["unlimited_wan"]["vnetd_tcp_mbit_s"],
                "plain_tcp_mbit_s": result["tunnel_vs_plain_routing"]["unlimited_wan"]["plain_tcp_mbit_s"],
                "added_rtt_p50_us": result["tunnel_vs_plain_routing"]["unlimited_wan"]["added_rtt_p50_us"],
                "added_rtt_min_us": result["tunnel_vs_plain_routing"]["unlimited_wan"]["added_rtt_min_us"],
            },
            "wan_tbf_100mbit": {
                "vnetd_tcp_mbit_s": result["tunnel_vs_plain_routing"]["wan_tbf_100mbit"]["vnetd_tcp_mbit_s"],
                "plain_tcp_mbit_s": result["tunnel_vs_plain_routing"]["wan_tbf_100mbit"]["plain_tcp_mbit_s"],
                "added_rtt_p50_us": result["tunnel_vs_plain_routing"]["wan_tbf_100mbit"]["added_rtt_p50_us"],
                "added_rtt_min_us": result["tunnel_vs_plain_routing"]["wan_tbf_100mbit"]["added_rtt_min_us"],
            },
        }))?
    );
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let mut out = None;
    let mut moves = 6u32;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--moves" => {
                moves = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(6);
                i += 1;
            }
            "-h" | "--help" => {
                println!("usage: vnetd-bench OUT.json [--moves N]   (root; builds a namespace testbed)");
                return ExitCode::SUCCESS;
            }
            s => out = Some(PathBuf::from(s)),
        }
        i += 1;
    }
    let Some(out) = out else {
        eprintln!("usage: vnetd-bench OUT.json [--moves N]");
        return ExitCode::FAILURE;
    };
    match bench(&out, moves.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vnetd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
