#!/usr/bin/env bash
# Soak: mixed traffic (HTTP/1.1, HTTP/2, gRPC, TCP; mTLS between sidecars)
# through the loopback lab with chaos every minute, for an hour by default:
# every process's RSS, descriptors and CPU sampled, every failed call kept.
# Writes bench/results/soak-<date>.md, its plots and the failed calls' CSV.
# With etcd installed (Debian's etcd-server) the control plane is two
# replicas over three etcd members; without it, one wf-control.
# Extra arguments go to soak-bench (e.g. --duration 600 --chaos-every 30;
# see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
command -v etcd >/dev/null || echo "== no etcd (Debian: etcd-server): one wf-control on its embedded store"
echo "== building release binaries"
bash deploy/setup.sh build   # protoc for etcd-client
cargo build --release -p wayfinder-control -p wayfinder-proxy -p lab-app -p wayfinder-cli -p wayfinder-bench
bin=${CARGO_TARGET_DIR:-target}/release
# --bin-dir defaults to target/release; a build elsewhere is named.
dir=()
[ -z "${CARGO_TARGET_DIR:-}" ] || dir=(--bin-dir "$bin")
exec "$bin/soak-bench" "${dir[@]}" "$@"
