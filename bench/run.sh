#!/usr/bin/env bash
# Proxy benchmark: direct, one wf-proxy hop, two sidecar hops (plaintext and
# mTLS), HAProxy and nginx, measured in one run. Installs wrk, h2load
# (nghttp2-client), haproxy and nginx from Debian when missing. Writes
# bench/results/proxies-<date>.md and .svg. Extra arguments go to
# proxy-bench (e.g. --secs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || need+=(haproxy)
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]} from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts the packaged services; the benchmark runs its own.
    service haproxy stop 2>/dev/null || true
    service nginx stop 2>/dev/null || true
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# The binaries measured are the ones the lab image ships: static, not PIE.
bins=$(bash deploy/build-static.sh release)
echo "== building the benchmark driver"
cargo build --release -p wayfinder-bench
timeout 900 target/release/proxy-bench --bin-dir "$bins" "$@"
