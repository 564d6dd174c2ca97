#!/usr/bin/env bash
# Installs, idempotently, the Debian packages Wayfinder needs:
#   bash deploy/setup.sh build   what building needs (deploy/lab.sh calls this)
#   bash deploy/setup.sh test    that and what the tests use (.ci/run calls this)
# build:
#   protobuf-compiler libprotobuf-dev
#                      etcd-client's build script (our own protos compile with
#                      protox); libprotobuf-dev holds the well-known types
#                      (descriptor.proto) it imports, only recommended by protoc
# test, in addition:
#   etcd-server        the control-plane replica tests run a real etcd
#   iproute2 iptables util-linux curl
#                      the network-namespace labs and transparent interception tests
#   nginx-light        what `wfctl lab compare` measures the mesh against
#   chromium           loads the dashboard headless in its test
#   busybox-static     the classic lab's web and client image (deploy/lab-images.sh)
#   python3-venv       then grpcio and grpcio-health-checking from PyPI in
#                      target/grpc-venv: a gRPC client and server the project
#                      did not write, for tests/tests/grpc_interop.rs
# More packages: WAYFINDER_CI_PACKAGES="a b". Not root or no apt-get: says what is missing.
set -euo pipefail

packages="protobuf-compiler libprotobuf-dev"
case "${1:-test}" in
  build) ;;
  test) packages="$packages etcd-server iproute2 iptables util-linux curl nginx-light chromium busybox-static python3-venv ${WAYFINDER_CI_PACKAGES:-}" ;;
  *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac
need=()
for pkg in $packages; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: please install ${need[*]} (tests that need them say \"skipped\")" >&2
  else
    echo "== installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
fi

# Debian's python refuses system-wide pip installs: a venv of our own.
if [ "${1:-test}" = test ]; then
  venv="$(cd "$(dirname "$0")/.." && pwd)/target/grpc-venv"
  if ! "$venv/bin/python3" -c 'import grpc, grpc_health' 2>/dev/null; then
    echo "== grpcio into $venv"
    { python3 -m venv "$venv" &&
      "$venv/bin/pip" install -q grpcio==1.85.3 grpcio-health-checking==1.85.1; } ||
      echo "setup: no grpcio (the gRPC interop tests say \"skipped\")" >&2
  fi
fi
