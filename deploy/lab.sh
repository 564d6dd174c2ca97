#!/usr/bin/env bash
# The local lab on loopback, no Docker: builds Wayfinder, starts wf-control
# with deploy/policy.toml, registers the lab's endpoints, and follows the
# `web` service live with `wfctl watch`. Ctrl-C stops everything.
#
# Until the sidecar (wf-proxy) and lab-app land, the lab's web-1..3 are static
# endpoints; the control plane, its push, leases and policy are all real.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v protoc >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Only etcd-client's build needs protoc; our own protos compile with protox.
  echo "== installing protobuf-compiler"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null || \
    echo "   (could not install protobuf-compiler; not needed yet)"
fi

echo "== building (release)"
cargo build --release --workspace --bins
bin=target/release
data=${WAYFINDER_DATA_DIR:-./wf-data}
export WAYFINDER_CONTROL_PLANE=http://127.0.0.1:15010

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

echo "== starting wf-control (gRPC 127.0.0.1:15010, HTTP 127.0.0.1:15014, data in $data)"
"$bin/wf-control" --grpc 127.0.0.1:15010 --http 127.0.0.1:15014 \
  --data-dir "$data" --policy deploy/policy.toml &
pids+=($!)
for _ in $(seq 50); do
  "$bin/wfctl" services >/dev/null 2>&1 && break
  sleep 0.1
done

for i in 1 2 3; do
  "$bin/wfctl" register web "127.0.0.1:900$i" --instance "web-$i"
done
"$bin/wfctl" services
"$bin/wfctl" endpoints web
echo
echo "== following 'web' (try in another shell: $bin/wfctl deregister web 127.0.0.1:9002,"
echo "   edit deploy/policy.toml, or curl http://127.0.0.1:15014/metrics); Ctrl-C stops"
"$bin/wfctl" watch web
