#!/usr/bin/env bash
# Control-plane push benchmark: 10,000 endpoints in 100 services, 1,000 watch
# streams on loopback; time from a change to its receipt by all watchers, and
# wf-control's RSS. Writes bench/results/push-<date>.md and .svg.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== building release binaries"
bash deploy/setup.sh build   # protoc for etcd-client
cargo build --release -p wayfinder-control -p wayfinder-bench
timeout 600 target/release/push-bench "$@"
