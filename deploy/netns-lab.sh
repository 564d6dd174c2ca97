#!/usr/bin/env bash
# The netns lab: containers without Docker. Each instance gets its own
# network namespace and address on a bridge, names resolve through a DNS
# server that answers like Docker's embedded one (round-robin A records),
# and every namespace is meshed transparently (`wf-proxy init`): the apps
# call http://web/ by name and know nothing of the mesh.
#
#   wf-lab-hub      bridge 10.77.0.1/24, wf-control :15010, DNS :53 (wfctl lab dns)
#   wf-lab-web1..3  lab-app :80 (web-1..3) + sidecar (uid 1337), 10.77.0.11-13
#   wf-lab-client   sidecar (uid 1337), 10.77.0.50; the app is you:
#                     sudo ip netns exec wf-lab-client curl http://web/
#
# Needs root, iproute2, iptables, setpriv and curl. Ctrl-C removes everything.
#   deploy/netns-lab.sh          start, show a few calls, stay up
#   deploy/netns-lab.sh --once   start, show the calls, tear down (what the tests run)
#   deploy/netns-lab.sh --zones  two zones: web-1, web-2 and the client in zone-a,
#                                web-3 in zone-b behind WAYFINDER_LAB_ZONE_DELAY
#                                (default 20ms; 0 for none) each way (tc netem on
#                                its veth pair: needs the sch_netem module), every
#                                sidecar with --zone, and web's policy prefer_local =
#                                true: the client's calls stay in zone-a. Combines
#                                with --once.
# WAYFINDER_BIN=target/debug skips the release build.
# WAYFINDER_LAB_BALANCER=round-robin (or any --balancer) for the client's
# sidecar; the default is the sidecar's (peak-EWMA), which prefers the
# fastest instance and so may send a short run of calls to one.
set -euo pipefail
cd "$(dirname "$0")/.."
once=false zones=false
for arg in "$@"; do
  case $arg in
    --once) once=true ;;
    --zones) zones=true ;;
    *) echo "netns-lab: unknown option $arg (use --once, --zones)" >&2; exit 2 ;;
  esac
done
zone_delay=${WAYFINDER_LAB_ZONE_DELAY:-20ms}
[ "$(id -u)" = 0 ] || { echo "netns-lab: run as root (network namespaces need CAP_NET_ADMIN)" >&2; exit 1; }
tools="ip iptables setpriv curl"; $zones && tools="$tools tc"
for tool in $tools; do
  command -v "$tool" >/dev/null || { echo "netns-lab: $tool is not installed" >&2; exit 1; }
done

if [ -z "${WAYFINDER_BIN:-}" ]; then
  echo "== building (release)"
  cargo build --release --workspace --bins
  bin=$PWD/target/release
else
  bin=$(cd "$WAYFINDER_BIN" && pwd)
fi
prefix=${WAYFINDER_LAB_PREFIX:-wf-lab}
hub=$prefix-hub
cp=10.77.0.1:15010
logs=${WAYFINDER_LAB_LOGS:-$(mktemp -d)}
# One token per service, good for that service only; off command lines
# (wf-control reads a file, sidecars their environment).
secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
tok_web=$(secret) tok_client=$(secret)
nodes=()
pids=()

cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for ns in "${nodes[@]}" "$hub"; do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
}
trap cleanup EXIT INT TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# start LOG NS CMD...: in the background, in NS; `ip netns exec` execs CMD, so
# the pid kept is CMD's own (backgrounding a function would keep a subshell's).
start() { local log=$1 ns=$2; shift 2; ip netns exec "$ns" "$@" 2>"$log" & pids+=($!); }
# start_proxy LOG NS CMD...: the same as uid 1337, whose connections interception leaves alone.
start_proxy() { local log=$1 ns=$2; shift 2; ip netns exec "$ns" setpriv --reuid=1337 --regid=1337 --clear-groups "$@" 2>"$log" & pids+=($!); }
wait_for() { for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "netns-lab: timeout waiting for '$2' in $1" >&2; cat "$1" >&2; return 1; }

if $zones && [ "$zone_delay" != 0 ]; then
  # Before anything starts: the kernel may lack netem (sch_netem).
  ip netns add "$prefix-netem-check"
  if ! ip netns exec "$prefix-netem-check" tc qdisc add dev lo root netem delay "$zone_delay" 2>/dev/null; then
    ip netns del "$prefix-netem-check"
    echo "netns-lab: --zones needs tc netem (modprobe sch_netem), or WAYFINDER_LAB_ZONE_DELAY=0 for zones without delay" >&2
    exit 1
  fi
  ip netns del "$prefix-netem-check"
fi

echo "== hub $hub: bridge 10.77.0.1/24, wf-control $cp, DNS 10.77.0.1:53 (logs in $logs)"
ip netns add "$hub"
in_ns "$hub" ip link set lo up
in_ns "$hub" ip link add br0 type bridge
in_ns "$hub" ip addr add 10.77.0.1/24 dev br0
in_ns "$hub" ip link set br0 up
chmod 755 "$logs"
(umask 077 && printf '%s:web\n%s:client\n' "$tok_web" "$tok_client" >"$logs/join-tokens")
start "$logs/control.log" "$hub" "$bin/wf-control" --grpc "$cp" --http 127.0.0.1:15014 \
  --data-dir "$logs/control-data" --join-token-file "$logs/join-tokens"
wait_for "$logs/control.log" "wf-control serving"
# The sidecars verify wf-control's TLS with its roots (public); wfctl is the
# operator with the credential it wrote (its owner's only).
install -m 644 "$logs/control-data/ca/bundle.crt" "$logs/bundle.crt"
start "$logs/dns.log" "$hub" "$bin/wfctl" lab dns --listen 10.77.0.1:53 --ttl 5 \
  --record web=10.77.0.11+10.77.0.12+10.77.0.13
wait_for "$logs/dns.log" "answering on"

# zone_of HOST: the zone of the node at 10.77.0.HOST with --zones (web-3 in
# zone-b, everyone else in zone-a); nothing without.
zone_of() { $zones || return 0; if [ "$1" = 13 ]; then echo zone-b; else echo zone-a; fi; }

# node NAME HOST: a namespace on the bridge at 10.77.0.HOST using the lab's DNS.
node() {
  local ns=$prefix-$1 n=$2
  ip netns add "$ns"
  nodes+=("$ns")
  mkdir -p "/etc/netns/$ns"
  printf 'nameserver 10.77.0.1\noptions ndots:0\n' >"/etc/netns/$ns/resolv.conf"
  in_ns "$ns" ip link set lo up
  ip -n "$hub" link add "v$n" type veth peer name eth0 netns "$ns"
  ip -n "$hub" link set "v$n" master br0 up
  in_ns "$ns" ip addr add "10.77.0.$n/24" dev eth0
  in_ns "$ns" ip link set eth0 up
  # zone-b is far away: its link delays each packet, both ways.
  if [ "$(zone_of "$n")" = zone-b ] && [ "$zone_delay" != 0 ]; then
    ip -n "$hub" link set "v$n" up
    tc -n "$hub" qdisc add dev "v$n" root netem delay "$zone_delay"
    tc -n "$ns" qdisc add dev eth0 root netem delay "$zone_delay"
  fi
  # Like an init container: capture the namespace's TCP for the sidecar.
  in_ns "$ns" "$bin/wf-proxy" init --proxy-uid 1337 --control-plane "$cp" >/dev/null
}

for i in 1 2 3; do
  ns=$prefix-web$i; n=$((10 + i)); zone=$(zone_of "$n")
  echo "== $ns: lab-app web-$i on 10.77.0.$n:80, sidecar inbound :15006 (mTLS)${zone:+, $zone}"
  node "web$i" "$n"
  start "$logs/web-$i-app.log" "$ns" "$bin/lab-app" --listen 0.0.0.0:80 --name "web-$i"
  WAYFINDER_JOIN_TOKEN=$tok_web start_proxy "$logs/web-$i.log" "$ns" "$bin/wf-proxy" --control-plane "https://$cp" \
    --ca-bundle "$logs/bundle.crt" --service web --instance "web-$i" \
    --app 127.0.0.1:80 --inbound 0.0.0.0:15006 --advertise "10.77.0.$n:15006" \
    --transparent 127.0.0.1:15001 --admin 127.0.0.1:15000 --health-check /healthz ${zone:+--zone "$zone"}
  wait_for "$logs/web-$i.log" "registered with the control plane"
done

if $zones; then
  echo "== zones: web's policy prefer_local = true; zone-b's link delays packets by $zone_delay each way"
  printf '[services.web.locality]\nprefer_local = true\n' >"$logs/zones.toml"
  in_ns "$hub" "$bin/wfctl" --control-plane "https://$cp" \
    --credentials "$logs/control-data/operator" policy apply "$logs/zones.toml"
fi
zone=$(zone_of 50)
echo "== $prefix-client: sidecar only, 10.77.0.50${zone:+, $zone}"
node client 50
WAYFINDER_JOIN_TOKEN=$tok_client start_proxy "$logs/client.log" "$prefix-client" "$bin/wf-proxy" --control-plane "https://$cp" \
  --ca-bundle "$logs/bundle.crt" --service client --transparent 127.0.0.1:15001 --admin 127.0.0.1:15000 \
  ${WAYFINDER_LAB_BALANCER:+--balancer "$WAYFINDER_LAB_BALANCER"} ${zone:+--zone "$zone"}
wait_for "$logs/client.log" "wf-proxy listening"
sleep 1

echo "== the client app calls http://web/ by name, nine times:"
for _ in $(seq 9); do
  in_ns "$prefix-client" curl -s -m 5 http://web/ || echo "(failed)"
  echo
done
echo "== and http://web-1's address directly: the sidecar still spreads the calls"
for _ in $(seq 3); do
  in_ns "$prefix-client" curl -s -m 5 http://10.77.0.11/ || echo "(failed)"
  echo
done
echo "== a caller outside the mesh (the hub) dials web-1's app port directly:"
# Inbound capture sends it to web-1's sidecar, which takes mTLS only (strict).
if in_ns "$hub" curl -s -m 3 -o /dev/null http://10.77.0.11/; then
  echo "outside caller: answered (inbound not captured!)"
else
  echo "outside caller: refused (inbound captured, strict mTLS)"
fi
$once && exit 0
echo "== up. Try:  sudo ip netns exec $prefix-client curl http://web/"
echo "   endpoints: sudo ip netns exec $hub $bin/wfctl --control-plane https://$cp --credentials $logs/control-data/operator endpoints web"
echo "   Ctrl-C removes every namespace."
wait
