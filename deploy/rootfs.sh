#!/usr/bin/env bash
# Copies Debian-packaged programs, with the shared libraries they load, into
# a root filesystem directory: how images get iptables, busybox and nginx
# here without a registry.
#   deploy/rootfs.sh DIR FILE...    each FILE (and what `ldd` says it needs)
#                                   lands at the same path under DIR
set -euo pipefail
dir=$1
shift
copy() {
  mkdir -p "$dir$(dirname "$1")"
  cp -L "$1" "$dir$1"
}
for f in "$@"; do
  copy "$f"
  # Static binaries have no dependencies ("not a dynamic executable").
  for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true); do
    [ -e "$dir$lib" ] || copy "$lib"
  done
done
