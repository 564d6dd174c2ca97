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
# More packages: WAYFINDER_CI_PACKAGES="a b". Not root or no apt-get: says what is missing.
set -euo pipefail

packages="protobuf-compiler libprotobuf-dev"
case "${1:-test}" in
  build) ;;
  test) packages="$packages etcd-server iproute2 iptables util-linux curl nginx-light chromium busybox-static ${WAYFINDER_CI_PACKAGES:-}" ;;
  *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac
need=()
for pkg in $packages; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
((${#need[@]})) || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup: please install ${need[*]} (tests that need them say \"skipped\")" >&2
  exit 0
fi
echo "== installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
