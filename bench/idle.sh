#!/usr/bin/env bash
# What noticing dead peers costs an idle mesh: a client sidecar with pooled
# HTTP/2 connections to three web sidecars (each with its lab-app), warmed
# with 300 calls, then left idle for a minute. Per process: CPU time and
# wake-ups (voluntary context switches of all its threads); for the machine:
# TCP segments sent (loopback only, so that is the lab's keepalive probes,
# heartbeats and reports, plus whatever else runs). Loopback only.
# Usage: bench/idle.sh [BIN_DIR] [SECONDS]   (BIN_DIR default: the static
# release build of deploy/build-static.sh; SECONDS default 60)
# Writes bench/results/idle-<date>.md.
set -u
cd "$(dirname "$0")/.."
B=${1:-target/$(rustc -vV | sed -n 's/^host: //p')/release}
T=${2:-60}
for bin in wf-control wf-proxy wfctl lab-app; do
  [ -x "$B/$bin" ] || { echo "idle: $B/$bin missing (bash deploy/build-static.sh release)" >&2; exit 1; }
done
command -v curl >/dev/null || { echo "idle: needs curl" >&2; exit 1; }
data=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$data"; }
trap cleanup EXIT
start() { "$@" 2>>"$data/log" & pids+=($!); }
start "$B/wf-control" --grpc 127.0.0.1:26010 --http 127.0.0.1:26014 --data-dir "$data/cp"
for i in 1 2 3; do
  start "$B/lab-app" --listen 127.0.0.1:2602$i --name web-$i
done
sleep 1
for i in 1 2 3; do
  start "$B/wf-proxy" --control-plane http://127.0.0.1:26010 --service web --instance web-$i \
    --app 127.0.0.1:2602$i --inbound 127.0.0.1:2603$i --admin 127.0.0.1:2604$i
done
start "$B/wf-proxy" --control-plane http://127.0.0.1:26010 --admin 127.0.0.1:26050 \
  --upstream web=127.0.0.1:26051
client=${pids[-1]}
sleep 2
for _ in $(seq 300); do curl -s -o /dev/null -H 'Host: web' http://127.0.0.1:26051/; done
pooled=$(ss -Htn state established "( dport >= :26031 and dport <= :26033 )" | wc -l)
echo "idle: warmed; $pooled pooled connections from the client sidecar; idle for $T s" >&2
sleep 2

# CPU ticks (user + system) and voluntary context switches of every thread.
usage() {
  local pid=$1 ticks=0 wakes=0
  ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  for t in /proc/"$pid"/task/*; do
    wakes=$((wakes + $(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status")))
  done
  echo "$ticks $wakes"
}
segs() { awk '/^Tcp:/ { if (n++) print $12 }' /proc/net/snmp; }
declare -A before
for p in "${pids[@]}"; do before[$p]=$(usage "$p"); done
s0=$(segs)
sleep "$T"
s1=$(segs)
hz=$(getconf CLK_TCK)
out=bench/results/idle-$(date +%F).md
{
  echo "# An idle mesh for $T s"
  echo
  echo "$(date -u '+%F %H:%M UTC'), $(nproc) cores, binaries from \`$B\`. wf-control, three web"
  echo "instances (lab-app + sidecar: TCP app check every 1 s, heartbeat every 3.3 s), and a client"
  echo "sidecar holding $pooled pooled HTTP/2 connections to them after 300 calls. Nothing is sent"
  echo "during the window; what the processes do is timers: heartbeats, app checks, traffic reports,"
  echo "the control-plane channel's HTTP/2 keepalive. Requests' HTTP/2 pings are sent only while a"
  echo "request waits, and TCP keepalive probes are sent by the kernel, so neither wakes a sidecar."
  echo
  echo "| process | CPU ms per minute | wake-ups per minute |"
  echo "|---|---:|---:|"
  i=0
  names=(wf-control "lab-app web-1" "lab-app web-2" "lab-app web-3" "web-1 sidecar" "web-2 sidecar" "web-3 sidecar" "client sidecar")
  for p in "${pids[@]}"; do
    read -r t0 w0 <<<"${before[$p]}"
    read -r t1 w1 <<<"$(usage "$p")"
    awk -v n="${names[$i]}" -v dt=$((t1 - t0)) -v dw=$((w1 - w0)) -v hz="$hz" -v T="$T" \
      'BEGIN { printf "| %s | %.1f | %.0f |\n", n, dt * 1000 / hz * 60 / T, dw * 60 / T }'
    i=$((i + 1))
  done
  echo
  echo "TCP segments sent on the machine during the window: $((s1 - s0)) ($(awk -v d=$((s1 - s0)) -v T="$T" 'BEGIN { printf "%.0f", d * 60 / T }') per minute)."
} >"$out"
cat "$out"
echo "idle: wrote $out" >&2
