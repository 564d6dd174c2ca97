#!/usr/bin/env bash
# Builds the classic lab's images (examples/classic-lab) from Debian's
# packages, for machines without a registry:
#   wayfinder-busybox:lab   busybox-static: sh, httpd, wget (web1..3, client)
#   wayfinder-nginx:lab     nginx-light and the libraries it loads
# LAB_BUSYBOX_IMAGE / LAB_NGINX_IMAGE name them otherwise. With a registry,
# use busybox and nginx from it instead (the lab reads the same variables).
set -euo pipefail
cd "$(dirname "$0")/.."
busybox_image=${LAB_BUSYBOX_IMAGE:-wayfinder-busybox:lab}
nginx_image=${LAB_NGINX_IMAGE:-wayfinder-nginx:lab}
bash deploy/setup.sh test >&2
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

base() { # DIR: the files every image here wants
  mkdir -p "$1"/{etc,tmp,run,var/log,var/www}
  chmod 1777 "$1/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nwww-data:x:33:33:www-data:/var/www:/bin/false\n' >"$1/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\nwww-data:x:33:\n' >"$1/etc/group"
}

echo "== $busybox_image (busybox-static)" >&2
bb="$root/busybox"
base "$bb"
bash deploy/rootfs.sh "$bb" /bin/busybox
for app in $(/bin/busybox --list); do
  [ "$app" = busybox ] || ln -s busybox "$bb/bin/$app"
done
tar -C "$bb" -c . | docker import -c 'ENV PATH=/bin' -c 'CMD ["sh"]' - "$busybox_image" >/dev/null

echo "== $nginx_image (nginx-light)" >&2
ng="$root/nginx"
base "$ng"
bash deploy/rootfs.sh "$ng" /usr/sbin/nginx
mkdir -p "$ng/etc/nginx" "$ng/var/lib/nginx" "$ng/var/log/nginx"
cp /etc/nginx/mime.types "$ng/etc/nginx/"
# A default that serves; the lab mounts its own nginx.conf over it.
printf 'events {}\nhttp { server { listen 80; return 200 "nginx\\n"; } }\n' >"$ng/etc/nginx/nginx.conf"
tar -C "$ng" -c . | docker import -c 'CMD ["nginx", "-g", "daemon off;"]' - "$nginx_image" >/dev/null
echo "$busybox_image $nginx_image"
