#!/usr/bin/env python3
"""Writes bench/results/README.md from the JSON results: machine, date, command, headline figures."""
import json, os, platform, subprocess

R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

def load(name):
    try:
        with open(os.path.join(R, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def cpu():
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                return l.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()

out = ["# Benchmark results", "",
       f"Machine: {cpu()}, {os.cpu_count()} cores, Linux {platform.release()} (KVM nested on PVM). "
       "Produced by `make bench` (`bench/run.sh`); each section names its command and date.", ""]

v = load("vmm.json")
if v:
    out += ["## VMM (`cargo bench -p hypervisor --bench vmm`)", f"Date: {v['date']}", "",
            "| measure | value |", "|---|---|",
            f"| boot to `shrink-guest ready` (median of {len(v['boot_to_ready_ms']['runs'])}) | {v['boot_to_ready_ms']['median']:.0f} ms |",
            f"| idle VM CPU | {v['idle_vm_cpu_percent_of_one_core']:.2f} % of a core |",
            f"| VMM memory beyond guest memory | {v['vmm_rss_beyond_guest_memory_kib'] / 1024:.1f} MiB |",
            f"| fetch + clear the dirty log of a 1 GiB guest | {v['dirty_log_1gib']['fetch_and_clear_ms_median']:.2f} ms median, {v['dirty_log_1gib']['fetch_and_clear_ms_max']:.2f} ms max |",
            f"| snapshot write ({v['snapshot']['nonzero_bytes_written'] / 1e6:.0f} MB non-zero of 1 GiB, fsync) | {v['snapshot']['write_mb_per_s']:.0f} MB/s |",
            f"| restore | {v['snapshot']['restore_mb_per_s']:.0f} MB/s |", ""]

p = load("precopy.json")
if p:
    out += ["## Pre-copy live migration, shrink vs QEMU (`cargo bench -p hypervisor --bench precopy`)", f"Date: {p['date']}. {p['note']}.", "",
            "| link | workload | shrink time | shrink downtime | shrink MB | passes | QEMU time | QEMU MB |", "|---|---|---|---|---|---|---|---|"]
    for r in p["runs"]:
        s, q = r["shrink"], r.get("qemu", {})
        out.append(f"| {r['link']} | {r['workload']} | {s['total_time_ms']} ms | {s['downtime_ms']} ms | {s['transferred_bytes'] / 1e6:.1f} | {s['iterations']} | {q.get('total_time_ms', '-')} ms | {(q.get('transferred_bytes') or 0) / 1e6:.1f} |")
    out.append("")

d = load("devices.json")
if d:
    out += ["## Devices (`cargo bench -p hypervisor --bench devices`)", f"Date: {d['date']}", "",
            "| measure | value |", "|---|---|",
            f"| UDP echo round trip through virtio-net, tap and bridge | p50 {d['udp_echo_rtt_us']['p50']:.0f} µs, min {d['udp_echo_rtt_us']['min']:.0f} µs, p99 {d['udp_echo_rtt_us']['p99']:.0f} µs |",
            f"| UDP guest → host (1472-byte payloads) | {d['udp_guest_to_host']['payload_mbit_per_s']:.0f} Mbit/s |",
            f"| preload from the qcow2 overlay | {d['preload_from_qcow2_overlay']['mb_per_s']:.0f} MB/s |", ""]

s = load("shrinker.json")
if s:
    out += ["## Shrinker: virtual clusters at 100 Mbit/s (`cargo bench -p shrink-tests --bench shrinker`)", f"Date: {s['date']}. VM: {s['vm']['memory']}, `{s['vm']['cmdline']}` — {s['vm']['shared_os_content']} shared, {s['vm']['private']}.", "",
            "| VMs | shrink time | shrink WAN MB | no-dedup time | no-dedup WAN MB | QEMU time | QEMU WAN MB | lower bound MB | deduplicated | from peers | pulled | avg downtime |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        a, b, q, lb = r["shrink"], r["shrink_no_dedup"], r["qemu"], r["lower_bound"]
        out.append(f"| {r['vms']} | {a['total_time_ms'] / 1e3:.1f} s | {a['wan_bytes'] / 1e6:.0f} | {b['total_time_ms'] / 1e3:.1f} s | {b['wan_bytes'] / 1e6:.0f} | {q['total_time_ms'] / 1e3:.1f} s | {q['wan_bytes'] / 1e6:.0f} | {lb['bytes'] / 1e6:.0f} | {a['deduplicated']} | {a['fetched_from_peers']} | {a['pulled']} | {a['avg_downtime_ms']} ms |")
    sp = s.get("source_pipeline", {})
    if sp:
        out += ["", f"Source pipeline (one thread, SHA-256 + pipelined SET NX): {sp['hash_and_coordination_pages_per_s']:.0f} pages/s, {sp['fraction_of_hash_limit'] * 100:.0f} % of the hash-only limit ({sp['hash_only_pages_per_s']:.0f} pages/s)."]
    out.append("")

n = load("vnetd.json")
if n:
    out += ["## vnetd (`vnetd-bench bench/results/vnetd.json --moves 6`)", "", "See `vnetd.json`: detection-to-reconfigured times from pcap timestamps, the connectivity gap, and tunnel throughput and latency against plain routing.", ""]

with open(os.path.join(R, "README.md"), "w") as f:
    f.write("\n".join(out) + "\n")
print("wrote", os.path.join(R, "README.md"))
