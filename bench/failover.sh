#!/usr/bin/env bash
# Failover benchmark: the same kill-a-backend run through the mesh, HAProxy
# and nginx (installed from Debian when missing). Prints failed requests and
# latency percentiles for each; writes bench/results/failover-<date>.md and
# .svg. Extra arguments go to failover-bench (e.g. --requests 5000).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]} from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts the packaged services; the benchmark runs its own.
    systemctl stop haproxy nginx 2>/dev/null || service haproxy stop 2>/dev/null || true
    service nginx stop 2>/dev/null || true
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== building release binaries"
bash deploy/setup.sh build   # protoc for etcd-client
cargo build --release -p wayfinder-control -p wayfinder-proxy -p lab-app -p wayfinder-bench
timeout 900 target/release/failover-bench --haproxy "$(command -v haproxy || echo /usr/sbin/haproxy)" "$@"
