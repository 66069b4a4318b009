#!/usr/bin/env bash
# make bench: every benchmark of the project; JSON results in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
echo ">> VMM: boot, memory overhead, idle cost, dirty log, snapshot/restore"
cargo bench -q -p hypervisor --bench vmm -- bench/results/vmm.json
echo ">> pre-copy live migration, side by side with QEMU"
cargo bench -q -p hypervisor --bench precopy -- bench/results/precopy.json
echo ">> devices: UDP through the tap, preload from qcow2"
cargo bench -q -p hypervisor --bench devices -- bench/results/devices.json
echo ">> the evaluation on the two-site testbed: cluster size, workloads, bandwidth, granularity,"
echo "   network timings; shrink vs --no-dedup vs QEMU; JSON and PNG plots (about 45 minutes)"
target/release/shrink-bench --out bench/results "$@"
echo ">> indexd: Redis pipelines (single server and a three-node cluster), peer fetches, content index"
target/release/indexd-bench --cluster > bench/results/indexd.json
echo ">> vnetd: detection, reconfiguration, connectivity gap, tunnel cost"
target/release/vnetd-bench bench/results/vnetd.json --moves 6
python3 bench/summarize.py
echo ">> results in bench/results/ (summary: bench/results/README.md)"
