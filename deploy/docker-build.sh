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
echo "== docker build -> $image"
docker build -q -f deploy/Dockerfile --build-arg "BASE=${BASE:-scratch}" -t "$image" "$ctx"
