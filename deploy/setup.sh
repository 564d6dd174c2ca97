#!/usr/bin/env bash
# Installs, idempotently, the Debian packages that building and testing
# Wayfinder need. The lab (deploy/lab.sh) and CI (.ci/run) both call it.
#   protobuf-compiler  etcd-client's build script (our own protos compile with protox)
#   etcd-server        the control-plane replica tests run a real etcd
#   iproute2 iptables util-linux curl
#                      the network-namespace labs and transparent interception tests
#   nginx-light        what `wfctl lab compare` measures the mesh against
#   chromium           loads the dashboard headless in its test
# More packages: WAYFINDER_CI_PACKAGES="a b". Not root or no apt-get: says what is missing.
set -euo pipefail

packages="protobuf-compiler etcd-server iproute2 iptables util-linux curl nginx-light chromium ${WAYFINDER_CI_PACKAGES:-}"
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
