#!/usr/bin/env bash
# Builds the four binaries as users run them in the lab image: statically
# linked (glibc, +crt-static) and not position-independent, so nothing is
# mapped at start but the binary itself (no ld.so, libc.so or libm.so pages)
# and there are no start-up relocations to write into the binary's pages
# (bench/README.md measures what this saves: 9.0 -> 7.5 MiB RSS idle).
#   deploy/build-static.sh [PROFILE]     prints the directory the binaries are in
# `--target` keeps RUSTFLAGS off build scripts and proc macros, which cannot be
# static.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
target=$(rustc -vV | sed -n 's/^host: //p')
bash deploy/setup.sh build >&2
echo "== building static binaries ($profile, $target)" >&2
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --profile "$profile" --target "$target" \
  --bins -p wayfinder-proxy -p wayfinder-control -p wayfinder-cli -p lab-app >&2
echo "target/$target/$profile"
