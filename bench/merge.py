#!/usr/bin/env python3
"""Merge eval.json files of several `shrink-bench` runs into one.

Usage: bench/merge.py OUT.json IN1.json IN2.json ...

A point (family, workload, VMs, rate, chunk, WAN delay; and transport in the tls family) measured in a later file
replaces the same point of an earlier one; a point that failed never replaces one that was measured. The result keeps every
run's command, date and duration under "runs", and `command` says it was merged. Then draw the
plots with `target/release/shrink-bench --replot OUT.json --out DIR`.
"""
import json
import sys


def key(p):
    # A later measurement of a point replaces an earlier one whatever its transport (points
    # before the tls family have none: they ran in clear text), except in the tls family, which
    # measures both transports on purpose.
    transport = p.get("transport", "plain") if p["family"] == "tls" else None
    return (p["family"], p["workload"], p["vms"], p["rate_mbit"], p["chunk"], p.get("wan_delay_ms", 0), transport)


def main(out, inputs):
    docs = [json.load(open(f)) for f in inputs]
    points, order = {}, []
    for d in docs:
        for p in d["points"]:
            k = key(p)
            if k not in points:
                order.append(k)
            elif "error" in p and "error" not in points[k]:
                continue
            points[k] = p
    merged = dict(docs[-1])
    merged["runs"] = [{"command": d["command"], "date": d["date"], "seconds": d["seconds"], "complete": d["complete"]} for d in docs]
    suffix = " (merged by bench/merge.py)"
    merged["command"] = " + ".join(d["command"].removesuffix(suffix) for d in docs) + suffix
    merged["seconds"] = sum(d["seconds"] for d in docs)
    merged["complete"] = all(d["complete"] for d in docs)
    merged["points"] = [points[k] for k in order]
    merged["source_pipeline"] = next((d["source_pipeline"] for d in reversed(docs) if d.get("source_pipeline")), None)
    with open(out, "w") as f:
        json.dump(merged, f, indent=2)
    print(f"wrote {out}: {len(order)} points from {len(docs)} runs")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
