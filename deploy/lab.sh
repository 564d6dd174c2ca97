#!/usr/bin/env bash
# The local lab on loopback, no Docker: builds Wayfinder, then starts
#   wf-control            gRPC 127.0.0.1:15010, HTTP 127.0.0.1:15014 (policy: deploy/policy.toml)
#   web-1..3              lab-app on 127.0.0.1:9001-9003, each with its sidecar
#                         (inbound 127.0.0.1:1600N, admin 127.0.0.1:1510N, Host-routed
#                         outbound 127.0.0.1:1508N, which the app's /chain?to=api uses)
#   api-1                 lab-app on 127.0.0.1:9011 with its sidecar (inbound 127.0.0.1:16011)
#   client sidecar        web=127.0.0.1:15001 (explicit), Host-routed HTTP on 127.0.0.1:15080,
#                         admin 127.0.0.1:15000
# sends a few requests through the mesh, and follows `web` live. Ctrl-C stops everything.
# The dashboard is at http://127.0.0.1:15014/. With OTEL_EXPORTER_OTLP_ENDPOINT set (Jaeger:
# http://127.0.0.1:4317) every sidecar exports its spans there.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/setup.sh build

echo "== building (release)"
cargo build --release --workspace --bins
bin=target/release
data=${WAYFINDER_DATA_DIR:-./wf-data}
# The control plane is TLS and authenticates every caller: sidecars verify it
# with its roots and present their mesh certificate; wfctl presents the
# operator credential wf-control writes to its data directory.
export WAYFINDER_CONTROL_PLANE=https://127.0.0.1:15010
export WAYFINDER_CA_BUNDLE=$data/ca/bundle.crt
export WAYFINDER_CREDENTIALS=$data/operator
# Secure by default: every sidecar gets a certificate with a token of this
# run that is good for its own service only, and the sidecars speak mTLS to
# each other. The tokens stay off command lines (ps shows those): wf-control
# reads them from a file only its owner reads, each sidecar from its
# environment.
secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
tok_web=$(secret) tok_api=$(secret) tok_client=$(secret)
mkdir -p "$data"
tokens="$data/join-tokens"
(umask 077 && printf '%s:web\n%s:api\n%s:client\n' "$tok_web" "$tok_api" "$tok_client" >"$tokens")

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
wait_http() { for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "timeout waiting for $1"; return 1; }

echo "== wf-control (data in $data)"
"$bin/wf-control" --grpc 127.0.0.1:15010 --http 127.0.0.1:15014 \
  --data-dir "$data" --policy deploy/policy.toml --join-token-file "$tokens" 2>wf-lab-control.log &
pids+=($!)
wait_http http://127.0.0.1:15014/healthz

for i in 1 2 3; do
  # web-3 is the canary: `wfctl split web version=v2:10` sends it a tenth.
  version=v1; [ "$i" = 3 ] && version=v2
  echo "== web-$i ($version): lab-app 127.0.0.1:900$i + sidecar (inbound 127.0.0.1:1600$i)"
  "$bin/lab-app" --listen "127.0.0.1:900$i" --name "web-$i" --outbound "127.0.0.1:1508$i" 2>/dev/null &
  pids+=($!)
  WAYFINDER_JOIN_TOKEN=$tok_web "$bin/wf-proxy" --service web --instance "web-$i" --app "127.0.0.1:900$i" \
    --inbound "127.0.0.1:1600$i" --admin "127.0.0.1:1510$i" --outbound "127.0.0.1:1508$i" \
    --health-check /healthz --label "version=$version" 2>"wf-lab-web-$i.log" &
  pids+=($!)
done
echo "== api-1: lab-app 127.0.0.1:9011 + sidecar (inbound 127.0.0.1:16011)"
"$bin/lab-app" --listen 127.0.0.1:9011 --name api-1 2>/dev/null &
pids+=($!)
WAYFINDER_JOIN_TOKEN=$tok_api "$bin/wf-proxy" --service api --instance api-1 --app 127.0.0.1:9011 \
  --inbound 127.0.0.1:16011 --admin 127.0.0.1:15111 --health-check /healthz 2>wf-lab-api-1.log &
pids+=($!)
echo "== client sidecar (web=127.0.0.1:15001, Host-routed 127.0.0.1:15080, admin 127.0.0.1:15000)"
WAYFINDER_JOIN_TOKEN=$tok_client "$bin/wf-proxy" --admin 127.0.0.1:15000 --upstream web=127.0.0.1:15001 --outbound 127.0.0.1:15080 \
  2>wf-lab-client.log &
pids+=($!)
wait_http http://127.0.0.1:15000/ready

for _ in $(seq 50); do
  [ "$("$bin/wfctl" -o json endpoints web 2>/dev/null | grep -o '"serving"' | wc -l)" = 3 ] && break
  sleep 0.1
done
"$bin/wfctl" endpoints web
echo "== six requests through the mesh (client sidecar -> web sidecar -> lab-app)"
for _ in $(seq 6); do curl -s http://127.0.0.1:15001/; echo; done
echo
echo "Dashboard: http://127.0.0.1:15014/    |  two hops: curl 'http://127.0.0.1:15001/chain?to=api'"
echo "Try: curl -H 'Host: web' http://127.0.0.1:15080/   |  curl -X POST 'http://127.0.0.1:9002/fault?healthy=false'"
echo "     curl http://127.0.0.1:15000/endpoints          |  curl http://127.0.0.1:15014/metrics"
echo "     edit deploy/policy.toml (reloaded live)        |  logs: wf-lab-*.log"
echo "== following 'web' (Ctrl-C stops the lab)"
"$bin/wfctl" watch web
