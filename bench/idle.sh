#!/usr/bin/env bash
# What noticing dead peers costs an idle mesh: wf-control, three web
# sidecars (each with its lab-app) and a client sidecar, measured idle twice
# for SECONDS: before the client has any connection to the web sidecars,
# and after 300 calls left it 3 pooled HTTP/2 connections (pinged by hyper while
# requests wait, by the sidecar every 13 s when idle; TCP keepalive probes
# from the kernel). The difference is
# what keeping those connections checked costs. Per process: CPU time and
# wake-ups (voluntary context switches of all its threads); for the machine:
# TCP segments sent (loopback only). Loopback only.
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
start "$B/wf-control" --grpc 127.0.0.1:26010 --http 127.0.0.1:26014 --data-dir "$data/cp" --insecure
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
sleep 3

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
hz=$(getconf CLK_TCK)
declare -A before cpu wake
# One idle window: per process CPU ms and wake-ups per minute into
# cpu[$1,pid] and wake[$1,pid]; segments per minute into segments_$1.
window() {
  for p in "${pids[@]}"; do before[$p]=$(usage "$p"); done
  local s0 s1
  s0=$(segs)
  sleep "$T"
  s1=$(segs)
  for p in "${pids[@]}"; do
    read -r t0 w0 <<<"${before[$p]}"
    read -r t1 w1 <<<"$(usage "$p")"
    cpu[$1,$p]=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v T="$T" 'BEGIN { printf "%.0f", d * 1000 / hz * 60 / T }')
    wake[$1,$p]=$(awk -v d=$((w1 - w0)) -v T="$T" 'BEGIN { printf "%.0f", d * 60 / T }')
  done
  eval "segments_$1=$(awk -v d=$((s1 - s0)) -v T="$T" 'BEGIN { printf "%.0f", d * 60 / T }')"
}
echo "idle: window 1 ($T s), no pooled connections" >&2
window cold
for _ in $(seq 300); do curl -s -o /dev/null -H 'Host: web' http://127.0.0.1:26051/; done
pooled=$(ss -Htn state established "( dport >= :26031 and dport <= :26033 )" | wc -l)
sleep 3
echo "idle: window 2 ($T s), $pooled pooled connections" >&2
window warm

out=bench/results/idle-$(date +%F).md
names=(wf-control "lab-app web-1" "lab-app web-2" "lab-app web-3" "web-1 sidecar" "web-2 sidecar" "web-3 sidecar" "client sidecar")
{
  echo "# An idle mesh, before and after it pooled connections"
  echo
  echo "$(date -u '+%F %H:%M UTC'), $(nproc) cores, binaries from \`$B\`, $T s per window. wf-control,"
  echo "three web instances (lab-app + sidecar: TCP app check every 1 s, heartbeat every 3.3 s) and a"
  echo "client sidecar, idle; in the second window the client sidecar holds $pooled pooled HTTP/2"
  echo "connections to the web sidecars (left by 300 calls). Those are pinged by hyper while a"
  echo "request waits and by the sidecar's idle ping (IdlePing) every 13 s while idle; their TCP"
  echo "keepalive probes (after 10 s idle, every 3 s) are the kernel's, so the difference between"
  echo "the windows is what checking them costs. What remains is timers"
  echo "(heartbeats, app checks, traffic reports, the control-plane channel's keepalive)."
  echo
  echo "| process | CPU ms/min, no pooled connections | with | wake-ups/min, no pooled connections | with |"
  echo "|---|---:|---:|---:|---:|"
  i=0
  for p in "${pids[@]}"; do
    echo "| ${names[$i]} | ${cpu[cold,$p]} | ${cpu[warm,$p]} | ${wake[cold,$p]} | ${wake[warm,$p]} |"
    i=$((i + 1))
  done
  echo
  echo "TCP segments sent on the machine per minute: $segments_cold without, $segments_warm with the pooled connections."
} >"$out"
cat "$out"
echo "idle: wrote $out" >&2
