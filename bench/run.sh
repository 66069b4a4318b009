#!/usr/bin/env bash
# make bench: every benchmark of the project; JSON results in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
echo ">> VMM: boot, memory overhead, idle cost, dirty log, snapshot/restore"
cargo bench -q -p hypervisor --bench vmm -- bench/results/vmm.json
if [ -x netreconf/bench/vnetd-bench.sh ]; then
	echo ">> vnetd: detection, reconfiguration, connectivity gap, tunnel cost"
	netreconf/bench/vnetd-bench.sh bench/results/vnetd.json
fi
echo ">> results in bench/results/"
