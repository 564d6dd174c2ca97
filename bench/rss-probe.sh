#!/usr/bin/env bash
# Where a one-hop sidecar's memory goes: VmRSS split into heap (RssAnon) and code
# pages (RssFile) at start, after 5 s of wrk load (at once, once quiet, and once the pooled upstream
# connections have timed out), and with 1,000 idle keep-alive connections. Loopback only; needs wrk
# and python3. Usage: bench/rss-probe.sh [BIN_DIR] (default: the static build of
# deploy/build-static.sh, as bench/run.sh measures).
set -u
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "rss-probe: install wrk (apt-get install wrk)" >&2; exit 1; }
B=${1:-target/$(rustc -vV | sed -n 's/^host: //p')/release}
pkill -f "127.0.0.1:2501" 2>/dev/null; sleep 0.3
rm -rf /tmp/wfc-rss
$B/wf-control --grpc 127.0.0.1:25010 --http 127.0.0.1:25014 --data-dir /tmp/wfc-rss --insecure 2>/dev/null &
$B/lab-app --listen 127.0.0.1:25011 --name web-1 2>/dev/null &
sleep 1
$B/wfctl --control-plane http://127.0.0.1:25010 register web 127.0.0.1:25011 >/dev/null
$B/wf-proxy --control-plane http://127.0.0.1:25010 --admin 127.0.0.1:25000 --upstream web=127.0.0.1:25012 2>/dev/null &
sleep 1.5
pid=$(pgrep -f "wf-proxy --control-plane http://127.0.0.1:25010")
show() { echo "$1: $(grep -E 'VmRSS|RssAnon|RssFile' /proc/$pid/status | tr -s ' \t' ' ' | tr '\n' ' ')"; }
show start
wrk -t2 -c32 -d5s http://127.0.0.1:25012/ | grep Requests/sec
sleep 1; show after-load
# The sidecar trims its heap once it has been quiet for a whole 5 s interval.
sleep 11; show after-load-quiet
# Pooled upstream connections close after the idle timeout (90 s by default;
# the pool's sweep runs every 45 s, so by 135 s), then the heap is trimmed.
sleep 135; show after-idle-timeout
python3 - <<'PY' &
import socket, time
cs=[]
for i in range(1000):
    s=socket.create_connection(("127.0.0.1",25012)); s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"); s.recv(512); cs.append(s)
time.sleep(4)
PY
sleep 3; show 1000-conns
wait $!
pkill -f "127.0.0.1:2501"
