#!/usr/bin/env bash
# mTLS versus plaintext between two sidecars, and mTLS handshakes per second.
# Writes bench/results/mtls-<date>.md and .svg. Extra arguments go to
# mtls-bench (e.g. --requests 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== building release binaries"
bash deploy/setup.sh build   # protoc for etcd-client
cargo build --release -p wayfinder-control -p wayfinder-proxy -p lab-app -p wayfinder-bench
timeout 600 target/release/mtls-bench "$@"
