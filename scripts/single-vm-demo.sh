#!/usr/bin/env bash
# A single VM on one host: boot, API, pause, snapshot, restore, live migration.
#
# Boots the project's guest under shrink-vmm, talks to its control API, pauses it,
# snapshots it, restores it in a new VMM process where the guest carries on, and
# live-migrates it to a third VMM with shrink-migrate.
# (`make demo` runs the two-site cluster demo, scripts/demo.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
VMM=target/release/shrink-vmm
GUEST=images/out/shrink-guest
work=$(mktemp -d /tmp/shrink-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# The key the VMMs' migration TLS is made from (steps 4 and 5).
target/release/shrink-migrate --new-cluster-key $work/cluster.key >/dev/null

api() { # api SOCKET JSON -> reply line
	python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile().readline().strip())
PY
}
wait_for() { # wait_for FILE TEXT
	for _ in $(seq 1 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
	echo "timed out waiting for '$2' in $1" >&2; exit 1
}

echo "== 1. boot the guest (256 MiB, mem workload dirtying 4 MB/s)"
$VMM --kernel $GUEST --mem 256M --cmdline "workload=mem mem=32M rate=4M" \
	--api $work/vm1.sock --name vm1 --serial $work/vm1.serial & pids+=($!)
wait_for $work/vm1.serial "heartbeat 3"
sed 's/^/   guest| /' $work/vm1.serial | head -8
echo "== 2. status through the API"
api $work/vm1.sock '{"execute":"status"}'
echo "== 3. pause, digest memory, snapshot"
api $work/vm1.sock '{"execute":"pause"}'
before=$(api $work/vm1.sock '{"execute":"memory-digest"}')
echo "   memory: $before"
api $work/vm1.sock "{\"execute\":\"snapshot\",\"arguments\":{\"path\":\"$work/snap\"}}"
last=$(grep -o "heartbeat [0-9]*" $work/vm1.serial | tail -1)
api $work/vm1.sock '{"execute":"quit"}' >/dev/null
echo "   snapshot: $(du -sh --apparent-size $work/snap | cut -f1) apparent, $(du -sh $work/snap | cut -f1) on disk; last $last"
echo "== 4. restore in a new VMM process"
$VMM --restore $work/snap --paused --cluster-key $work/cluster.key --api $work/vm2.sock --serial $work/vm2.serial & pids+=($!)
for _ in $(seq 1 100); do [ -S $work/vm2.sock ] && break; sleep 0.1; done
after=$(api $work/vm2.sock '{"execute":"memory-digest"}')
[ "$before" = "$after" ] && echo "   memory identical after restore" || { echo "   MEMORY DIFFERS"; exit 1; }
api $work/vm2.sock '{"execute":"resume"}' >/dev/null
wait_for $work/vm2.serial "heartbeat"
echo "   before: $last; after restore: $(grep -o 'heartbeat [0-9]*' $work/vm2.serial | head -1)"
echo "== 5. live-migrate the running guest to a new VMM (over loopback, TLS on a new cluster key)"
echo "   (--verify: both ends hash all 256 MiB during the pause to prove the copy exact; it adds"
echo "    that hashing to the downtime — without it, an idle guest pauses for a few milliseconds)"
$VMM --incoming tcp:127.0.0.1:4444 --cluster-key $work/cluster.key --api $work/vm3.sock --serial $work/vm3.serial & pids+=($!)
for _ in $(seq 1 100); do [ -S $work/vm3.sock ] && break; sleep 0.1; done
target/release/shrink-migrate --vm $work/vm2.sock --to tcp:127.0.0.1:4444 --verify | sed 's/^/   /'
wait_for $work/vm3.serial "heartbeat"
echo "   the source's last: $(grep -o 'heartbeat [0-9]*' $work/vm2.serial | tail -1); the destination's first: $(grep -o 'heartbeat [0-9]*' $work/vm3.serial | head -1)"
api $work/vm3.sock '{"execute":"quit"}' >/dev/null
echo "== done"
