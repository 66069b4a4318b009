#!/usr/bin/env bash
# make bench: every benchmark of the project; JSON results in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
echo ">> VMM: boot, memory overhead, idle cost, dirty log, snapshot/restore"
cargo bench -q -p hypervisor --bench vmm -- bench/results/vmm.json
echo ">> vnetd: detection, reconfiguration, connectivity gap, tunnel cost"
target/release/vnetd-bench bench/results/vnetd.json --moves 6
echo ">> results in bench/results/"
