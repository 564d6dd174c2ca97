#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (repeatable to a few
# hundredths of a percent, whatever else the machine is doing): one wf-proxy
# hop to a lab-app registered with `wfctl register`, N keep-alive GETs from
# one Python client. Run it for two N and divide the difference:
#   bench/instructions.sh 500; bench/instructions.sh 2500   # (b - a) / 2000
# Needs valgrind, curl and python3; loopback only. BIN_DIR: target/release.
set -u
cd "$(dirname "$0")/.."
B=${BIN_DIR:-target/release}
N=${1:?usage: bench/instructions.sh N}
pkill -f "127.0.0.1:2601" 2>/dev/null; sleep 0.3
rm -rf /tmp/wfc-ir
$B/wf-control --grpc 127.0.0.1:26010 --http 127.0.0.1:26014 --data-dir /tmp/wfc-ir --insecure 2>/dev/null &
$B/lab-app --listen 127.0.0.1:26011 --name web-1 2>/dev/null &
sleep 1
$B/wfctl --control-plane http://127.0.0.1:26010 register web 127.0.0.1:26011 >/dev/null
valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$N.out $B/wf-proxy --control-plane http://127.0.0.1:26010 --admin 127.0.0.1:26000 --upstream web=127.0.0.1:26012 2>/dev/null &
vp=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:26012/ -H 'Host: web' && break; sleep 0.2; done
python3 - "$N" <<'PY'
import http.client, sys
n=int(sys.argv[1])
c=http.client.HTTPConnection("127.0.0.1",26012)
for i in range(n):
    c.request("GET","/",headers={"Host":"web"}); r=c.getresponse(); r.read()
PY
kill -TERM $vp; wait $vp
pkill -f "127.0.0.1:2601"
grep -E "^summary|^totals" /tmp/cg.$N.out | head -1
