#!/usr/bin/env bash
# make demo: a live virtual cluster moves from site A to site B over a shaped WAN and keeps
# talking. Builds the two-site testbed in network namespaces, boots 4 VMs at site A, probes
# them from a client at each site, migrates them to B with deduplication and back with plain
# pre-copy, prints the report and tears everything down.
#
# Arguments go to `shrink-testbed demo` (see `target/release/shrink-testbed demo --help`),
# e.g. `./scripts/demo.sh --vms 8 --wan-rate 250mbit`. The report is also written to
# target/demo/report.txt and target/demo/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/demo
# Only standard output goes through tee: the progress bars stay on the terminal (stderr).
target/release/shrink-testbed demo --report target/demo/report.json "$@" | tee target/demo/report.txt
exit "${PIPESTATUS[0]}"
