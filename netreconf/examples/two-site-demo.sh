#!/usr/bin/env bash
# Two gateways running vnetd, a VM namespace that "migrates" from site A to site B and
# back. Run as root from the repository root after
#   cargo build --release -p netreconf
# Usage: netreconf/examples/two-site-demo.sh [up|move-b|move-a|status|down]
# The namespaces are demo-{swa,swb,ra,rb,a1,b1,vm}; the configs are
# netreconf/examples/site-{a,b}.toml (control sockets /run/vnetd-{A,B}.sock).
set -euo pipefail
BIN=${BIN:-target/release}
EX=$(dirname "$0")
P=demo
ns() { echo "$P-$1"; }
x() { ip netns exec "$(ns "$1")" "${@:2}"; }

up() {
  for r in swa swb ra rb a1 b1 vm; do
    ip netns add "$(ns $r)"; x $r ip link set lo up
    x $r sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  done
  x swa ip link add brA type bridge stp_state 0; x swa ip link set brA up
  x swb ip link add brB type bridge stp_state 0; x swb ip link set brB up
  attach() { # role ifname mac port switch bridge
    ip -n "$(ns $1)" link add "$2" address "$3" type veth peer name "$4" netns "$(ns $5)"
    x $5 ip link set "$4" master "$6" up; x $1 ip link set "$2" up
  }
  attach a1 eth0 02:00:0a:01:00:01 pa1 swa brA; x a1 ip addr add 10.1.0.1/16 dev eth0
  attach vm eth0 52:54:00:12:34:56 pvm swa brA; x vm ip addr add 10.1.0.10/16 dev eth0
  attach b1 eth0 02:00:0a:01:01:01 pb1 swb brB; x b1 ip addr add 10.1.1.1/16 dev eth0
  x vm sysctl -qw net.ipv4.conf.eth0.arp_evict_nocarrier=0   # a migrated VM keeps its ARP cache
  attach ra lan0 02:00:0a:01:00:fe pra swa brA
  attach rb lan0 02:00:0a:01:01:fe prb swb brB
  for s in swa:pra swb:prb; do x ${s%:*} ethtool -K ${s#*:} tx off tso off gso off sg off >/dev/null; done
  x ra sysctl -qw net.ipv4.ip_forward=0; x rb sysctl -qw net.ipv4.ip_forward=0
  ip -n "$(ns ra)" link add wan0 mtu 1600 type veth peer name wan0 netns "$(ns rb)" mtu 1600
  x ra ip addr add 192.168.100.1/24 dev wan0; x ra ip link set wan0 up
  x rb ip addr add 192.168.100.2/24 dev wan0; x rb ip link set wan0 up
  x ra "$BIN/vnetd" --config "$EX/site-a.toml" --pcap-out /tmp/vnetd-A.pcap 2>/tmp/vnetd-A.log &
  x rb "$BIN/vnetd" --config "$EX/site-b.toml" --pcap-out /tmp/vnetd-B.pcap 2>/tmp/vnetd-B.log &
  sleep 1
  x a1 ping -c1 -W1 10.1.0.10 >/dev/null && echo "A1 -> VM ok (direct)"
  x b1 ping -c1 -W1 10.1.0.10 >/dev/null && echo "B1 -> VM ok (through the tunnel)"
}

move() { # to-site: a|b
  local from to br
  if [ "$1" = b ]; then from=swa; to=swb; br=brB; else from=swb; to=swa; br=brA; fi
  ip -n "$(ns $from)" link set pvm netns "$(ns $to)"
  x $to ip link set pvm master $br up
  # What QEMU sends when the VM resumes: five RARP rounds at 0, 50, 200, 450, 800 ms.
  x vm "$BIN/vnet-probe" rarp --iface eth0 --mac 52:54:00:12:34:56 >/dev/null
  sleep 0.5
  x a1 ping -c1 -W1 10.1.0.10 >/dev/null && echo "A1 -> VM ok"
  x b1 ping -c1 -W1 10.1.0.10 >/dev/null && echo "B1 -> VM ok"
  echo "A1 neighbour for the VM: $(x a1 ip neigh show 10.1.0.10 dev eth0)"
  echo "VM neighbour for A1:     $(x vm ip neigh show 10.1.0.1 dev eth0)"
  echo "VM neighbour for B1:     $(x vm ip neigh show 10.1.1.1 dev eth0)"
}

down() {
  for r in ra rb; do
    for pid in $(ip netns pids "$(ns $r)" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  done
  for r in swa swb ra rb a1 b1 vm; do ip netns del "$(ns $r)" 2>/dev/null || true; done
  rm -f /run/vnetd-A.sock /run/vnetd-B.sock
}

case "${1:-up}" in
  up) up ;;
  move-b) move b ;;
  move-a) move a ;;
  status) "$BIN/vnetd" --status /run/vnetd-A.sock; "$BIN/vnetd" --status /run/vnetd-B.sock ;;
  down) down ;;
  *) echo "usage: $0 [up|move-b|move-a|status|down]" >&2; exit 2 ;;
esac
