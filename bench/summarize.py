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

def machine():
    """The machine line recorded by the evaluation (shrink-bench reads it off the machine it ran
    on), else this machine's, read the same way."""
    e = load("eval.json")
    if e and e.get("machine"):
        return e["machine"]
    fields = {}
    try:
        for l in open("/proc/cpuinfo"):
            k, _, v = l.partition(":")
            fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    kvm = "nested KVM" if "hypervisor" in fields.get("flags", "").split() else "KVM"
    return (f"{fields.get('model name', platform.processor())} ({fields.get('vendor_id', '?')}), "
            f"{os.cpu_count()} cores, Linux {platform.release()}, {kvm}")

out = ["# Benchmark results", "",
       f"Machine: {machine()}. "
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
            "| link | workload | shrink time | shrink downtime | shrink MB | passes | QEMU time | QEMU downtime | QEMU MB | QEMU multifd+zstd time | downtime |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["runs"]:
        s, q, z = r["shrink"], r.get("qemu", {}), r.get("qemu_zstd", {})
        out.append(f"| {r['link']} | {r['workload']} | {s['total_time_ms']} ms | {s['downtime_ms']} ms | {s['transferred_bytes'] / 1e6:.1f} | {s['iterations']} | {q.get('total_time_ms', '-')} ms | {q.get('downtime_ms', '-')} ms | {(q.get('transferred_bytes') or 0) / 1e6:.1f} | {z.get('total_time_ms', '-')} ms | {z.get('downtime_ms', '-')} ms |")
    out.append("")

d = load("devices.json")
if d:
    out += ["## Devices (`cargo bench -p hypervisor --bench devices`)", f"Date: {d['date']}", "",
            "| measure | value |", "|---|---|",
            f"| UDP echo round trip through virtio-net, tap and bridge | p50 {d['udp_echo_rtt_us']['p50']:.0f} µs, min {d['udp_echo_rtt_us']['min']:.0f} µs, p99 {d['udp_echo_rtt_us']['p99']:.0f} µs |",
            f"| UDP guest → host (1472-byte payloads) | {d['udp_guest_to_host']['payload_mbit_per_s']:.0f} Mbit/s |",
            f"| preload from the qcow2 overlay | {d['preload_from_qcow2_overlay']['mb_per_s']:.0f} MB/s |", ""]

e = load("eval.json")
if e:
    pts = [p for p in e["points"] if "error" not in p]
    failed = [p for p in e["points"] if "error" in p]
    mb = lambda v: (v or 0) / 1e6
    sec = lambda v: (v or 0) / 1e3
    def cell(p, k):
        v = p.get(k)
        if not v:
            return "-"
        # Bytes on the link less the probes, where measured (every system since the live QEMU baseline).
        return f"{sec(v['total_time_ms']):.1f} s, {mb(v.get('wan_net_bytes', v['wan_bytes'])):.0f} MB"
    def down(p, k):
        v = p.get(k)
        return "-" if not v else f"{v.get('avg_downtime_ms', 0)} / {v.get('max_downtime_ms', 0)} ms"
    def ratio(x):
        return "-" if x is None else f"{x:.2f}"
    out += ["## The evaluation: shrink vs `--no-dedup` vs QEMU on the two-site testbed", "",
            f"Date: {e['date']}. Command: `{e['command']}` ({e['seconds'] // 60} min). {e['testbed']}.", "",
            f"VM: {e['vm']['memory_mib']} MiB, `preload={e['vm']['preload']} private={e['vm']['private']}` — {e['vm']['mix']}.", "",
            f"QEMU: {e['qemu']}. The lower bound is the distinct content site B's repository does not hold, plus digest records (stream bytes, no TCP/IP headers).", "",
            "Plots: `fig-size.png`, `fig-workload-time.png`, `fig-workload-bytes.png`, `fig-bandwidth.png`, `fig-granularity.png`, `fig-network.png`"
            + (", `fig-tls.png`." if any(p["family"] == "tls" for p in pts) else
               ". What TLS costs (another machine, Intel Xeon, 2026-12-02, `target/release/shrink-bench --families tls --sizes 16`): `eval-tls.json`, `fig-tls.png`, and the table in the top-level README's Encryption section.")
            + " The transport column says how shrink's VMMs migrated: `tls` as deployed, `plain` for the points measured before TLS existed, in clear text (TLS costs 12–19 % in time on 2 cores; QEMU runs in clear text in every point).", "",
            "| family | workload | VMs | Mbit/s | one-way delay | chunk | transport | shrink | --no-dedup | QEMU | QEMU multifd+zstd | lower bound | shrink/QEMU bytes, time | shrink/QEMU-zstd bytes, time | shrink/no-dedup bytes, time | downtime mean / max: shrink, QEMU, QEMU-zstd | deduplicated | from peers | from repository | pulled | shrink disk MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tls = [p for p in pts if p["family"] == "tls"]
    pts = [p for p in pts if p["family"] != "tls"]
    for p in pts:
        s_, r = p["shrink"], p["ratios"]
        lb = p["lower_bound"]
        out.append(f"| {p['family']} | {p['workload']} | {p['vms']} | {p['rate_mbit']} | {p.get('wan_delay_ms', 0)} ms | {p['chunk']} | {p.get('transport', 'plain')} | {cell(p, 'shrink')} | {cell(p, 'no_dedup')} | {cell(p, 'qemu')} | {cell(p, 'qemu_zstd')} | "
                   f"{sec(lb['time_ms']):.1f} s, {mb(lb['bytes']):.0f} MB | {ratio(r['wan_bytes_shrink_over_qemu'])}, {ratio(r['time_shrink_over_qemu'])} | "
                   f"{ratio(r.get('wan_bytes_shrink_over_qemu_zstd'))}, {ratio(r.get('time_shrink_over_qemu_zstd'))} | "
                   f"{ratio(r['wan_bytes_shrink_over_no_dedup'])}, {ratio(r['time_shrink_over_no_dedup'])} | {down(p, 'shrink')}, {down(p, 'qemu')}, {down(p, 'qemu_zstd')} | {s_['deduplicated']} | {s_['fetched_from_peers']} | {s_.get('repository', 0)} | {s_['pulled']} | {mb((s_.get('disk') or {}).get('wan_bytes', 0)):.1f} |")
    out += ["", "### Network: what the moved VMs' peers saw (each system's move to site B; probes every 10 ms from a client on each site's LAN)", "",
            "| family | workload | VMs | Mbit/s | one-way delay | chunk | system | downtime mean / max | gap at A mean / max | gap at B mean / max | lost probes max (A/B) | vnetd detection mean | reconfiguration mean / max | all answering after |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, system in [(p, k) for p in pts for k in ("shrink", "qemu", "qemu_zstd") if (p.get(k) or {}).get("network")]:
        net = p[system]["network"]
        def st(k):
            v = [x[k] for x in net if isinstance(x.get(k), (int, float))]
            return (sum(v) / len(v), max(v)) if v else (0, 0)
        d, ga, gb, det, rec = st("downtime_ms"), st("gap_a_ms"), st("gap_b_ms"), st("detection_ms"), st("reconfiguration_ms")
        la, lbb = st("lost_a")[1], st("lost_b")[1]
        ok = all(x.get("answering") for x in net)
        out.append(f"| {p['family']} | {p['workload']} | {p['vms']} | {p['rate_mbit']} | {p.get('wan_delay_ms', 0)} ms | {p['chunk']} | {system} | {d[0]:.0f} / {d[1]:.0f} ms | {ga[0]:.0f} / {ga[1]:.0f} ms | {gb[0]:.0f} / {gb[1]:.0f} ms | {la:.0f} / {lbb:.0f} | {det[0]:.2f} ms | {rec[0]:.2f} / {rec[1]:.2f} ms | {'yes' if ok else 'NO'} |")
    if tls:
        out += ["", "### What TLS costs (`tls` family: the same cluster moved over TLS and with `--plain-tcp`)", "",
                "| VMs | Mbit/s | transport | time | bytes on the link | machine CPU during the move | downtime mean / max |",
                "|---|---|---|---|---|---|---|"]
        for p in sorted(tls, key=lambda p: (p["rate_mbit"], p["transport"] != "tls")):
            s_ = p["shrink"]
            out.append(f"| {p['vms']} | {p['rate_mbit']} | {p['transport']} | {sec(s_['total_time_ms']):.1f} s | {mb(s_.get('wan_net_bytes')):.1f} MB | "
                       f"{s_.get('machine_cpu_s', 0):.1f} CPU-s | {down(p, 'shrink')} |")
    for p in failed:
        out.append(f"\nFailed: {p['family']} family, {p['vms']} VMs, {p['workload']}, {p['rate_mbit']} Mbit/s: {p['error']}")
    lat = [p for p in pts if p.get("wan_rtt_ms") and p.get("wan_delay_ms")]
    if lat:
        out += ["", "WAN round trip between the border routers (ping, 200 × 10 ms apart, before the moves): what the delay line adds beyond twice its delay.", "",
                "| one-way delay | RTT min / avg / max | mdev | added to 2 × delay (avg) |", "|---|---|---|---|"]
        for p in sorted(lat, key=lambda p: p["wan_delay_ms"]):
            r, d = p["wan_rtt_ms"], p["wan_delay_ms"]
            out.append(f"| {d} ms | {r['min']:.3f} / {r['avg']:.3f} / {r['max']:.3f} ms | {r['mdev']:.3f} ms | {r['avg'] - 2 * d:.3f} ms |")
    sp = e.get("source_pipeline") or {}
    if sp:
        out += ["", f"Source pipeline (one thread, SHA-256 + pipelined SET NX): {sp['hash_and_coordination_pages_per_s']:.0f} pages/s, {sp['fraction_of_hash_limit'] * 100:.0f} % of the hash-only limit ({sp['hash_only_pages_per_s']:.0f} pages/s)."]
    out.append("")

n = load("vnetd.json")
if n:
    out += ["## vnetd (`vnetd-bench bench/results/vnetd.json --moves 6`)", "", "See `vnetd.json`: detection-to-reconfigured times from pcap timestamps, the connectivity gap, tunnel throughput and latency against plain routing, repair after a gateway crash, and the cost of probing.", ""]
    rs = (n.get("restart") or {}).get("by_restarted_gateway") or {}
    if rs:
        out += ["Repair after `kill -9` of vnetd and an immediate restart (site A's VM at B, site B's VM at A; 1 kHz streams to both):", "",
                "| restarted | new vnetd answers (median / max) | both /32s agree (median / max) | stream outage from the kill (median / max) |", "|---|---|---|---|"]
        for who in ("A", "B", "both"):
            r = rs.get(who) or {}
            f = lambda k: f"{r[k]['median']:.0f} / {r[k]['max']:.0f} ms" if r.get(k) else "?"
            out.append(f"| {who} | {f('control_socket_up_ms')} | {f('routes_agree_ms')} | {f('stream_outage_ms')} |")
        out.append("")
    pr = n.get("probe") or {}
    if pr and pr.get("periodic_sweeps"):
        st, ps = pr.get("sweep_at_start") or {}, pr["periodic_sweeps"][0]
        out += [f"Probing (counted in vnetd's pcap): {ps['frames']} ARP requests per periodic sweep of a /24, sent in {ps['duration_ms'] / 1000:.1f} s, i.e. {pr['frames_per_minute_per_24_at_default_interval']:.0f} frames per minute per /24 at the default 60 s interval; the sweep at start: {st.get('frames')} frames ({st.get('peer_prefix_frames')} for the peer's prefix first) in {st.get('duration_ms', 0):.0f} ms.", ""]

x = load("indexd.json")
if x:
    out += ["## indexd (`target/release/indexd-bench --cluster > bench/results/indexd.json`)", f"Date: {x.get('date', '?')}", "",
            "| measurement | figure |", "|---|---|"]
    for target in ("single", "cluster3"):
        rows = [r for r in x.get("redis", []) if r["target"] == target]
        if rows:
            name = "single server" if target == "single" else "3-node cluster"
            batches = " / ".join(str(r["batch"]) for r in rows)
            k = lambda key: " / ".join(f"{r[key] / 1000:.0f} k" for r in rows)
            out += [f"| `SET NX`, {name}, batch {batches} | {k('set_nx_ops_per_s')} ops/s |",
                    f"| `SADD`, {name}, batch {batches} | {k('sadd_ops_per_s')} ops/s |",
                    f"| `SRANDMEMBER`, {name}, batch {batches} | {k('srandmember_ops_per_s')} ops/s |"]
    for f_ in x.get("peer_fetch", []):
        what = "server re-hashes (SHA-256)" if f_["server_verifies"] else "protocol only"
        what += f", {f_.get('transport', 'plain')}"
        out.append(f"| peer fetch, {f_['batch']} × {f_['chunk_bytes'] // 1024} KiB, {what} | {f_['median_ms']:.2f} ms per batch (median), {f_['mib_per_s']} MiB/s |")
    c = x.get("content_index")
    if c:
        out.append(f"| `ContentIndex`, {c['chunks'] // 1000} k chunks / {c['distinct'] // 1000} k digests | insert {c['insert_ns']} ns, lookup {c['lookup_ns']} ns, {c['resident_kib'] * 1024 / c['chunks']:.0f} B per chunk |")
    out.append("")

with open(os.path.join(R, "README.md"), "w") as f:
    f.write("\n".join(out) + "\n")
print("wrote", os.path.join(R, "README.md"))
