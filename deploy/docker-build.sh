#!/usr/bin/env bash
# Builds the lab image: static binaries (deploy/build-static.sh) copied into a
# context of their own, then `docker build`.
#   deploy/docker-build.sh                      release binaries, image wayfinder:lab
#   WAYFINDER_PROFILE=image deploy/docker-build.sh   quicker unoptimised build (the tests use it)
#   WAYFINDER_IMAGE=name:tag  BASE=debian:12-slim    other tag / base image
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${WAYFINDER_PROFILE:-release}
image=${WAYFINDER_IMAGE:-wayfinder:lab}
dir=$(bash deploy/build-static.sh "$profile")
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$dir/wf-control" "$dir/wf-proxy" "$dir/wfctl" "$dir/lab-app" "$ctx/"
mkdir -p "$ctx/data/trust"
# iptables from Debian's package (its nft flavour, as Debian 12's Docker
# uses), with its libraries and match/target modules, for `wf-proxy
# --capture` in the sidecar's namespace. No shell comes with it.
xt=/usr/sbin/xtables-nft-multi
[ -x "$xt" ] || { echo "docker-build: $xt missing (bash deploy/setup.sh test installs iptables)" >&2; exit 1; }
mods=$(dirname "$(dpkg -L iptables | grep '/xtables/libxt_owner.so$')")
bash deploy/rootfs.sh "$ctx/rootfs" "$xt" "$mods"/libxt_*.so "$mods"/libipt_*.so
ln -s xtables-nft-multi "$ctx/rootfs/usr/sbin/iptables"
echo "== docker build -> $image"
docker build -q -f deploy/Dockerfile --build-arg "BASE=${BASE:-scratch}" -t "$image" "$ctx"
