#!/usr/bin/env bash
# Deployment Engine demo: a controller with its embedded store, and one agent
# (on 127.0.0.2) that enrols with an install code and stays online.
# Everything lives under ./demo; Ctrl-C stops both processes.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
command -v curl >/dev/null || { echo "demo: curl is needed (apt-get install curl)" >&2; exit 1; }

api=${DE_DEMO_API:-127.0.0.1:50000}
quic=${DE_DEMO_QUIC:-127.0.0.1:50001}
demo=$here/demo
mkdir -p "$demo"

echo "== building (cargo build --release)"
cargo build --release --bins -p de-controller -p de-agent
bin=$here/target/release

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

echo "== starting the controller (data in $demo/controller)"
"$bin/de-controller" serve --data-dir "$demo/controller" --api-listen "$api" --quic-listen "$quic" \
  > "$demo/controller.out" 2> "$demo/controller.log" &
pids+=($!)
for _ in $(seq 1 100); do
  grep -q "^quic listening" "$demo/controller.out" 2>/dev/null && break
  sleep 0.1
done
grep -q "^quic listening" "$demo/controller.out" || { cat "$demo/controller.log" >&2; exit 1; }
token=$(cat "$demo/controller/admin.token")
auth=(-H "Authorization: Bearer $token")

echo "== asking for an install code (POST /api/v1/install-codes)"
code=$(curl -fsS -X POST "${auth[@]}" "http://$api/api/v1/install-codes" | sed -E 's/.*"code":"([0-9]{4})".*/\1/')
echo "   code: $code"

echo "== enrolling an agent as node 127.0.0.2 (de-agent enroll)"
mkdir -p "$demo/node-1/root"
if [ ! -f "$demo/node-1/state/agent.json" ]; then
  "$bin/de-agent" enroll --controller "$quic" --code "$code" \
    --state-dir "$demo/node-1/state" --root "$demo/node-1/root" --advertise-ip 127.0.0.2
fi
"$bin/de-agent" run --state-dir "$demo/node-1/state" --root "$demo/node-1/root" \
  2> "$demo/node-1/agent.log" &
pids+=($!)

echo "== waiting for the node to come online (GET /api/v1/nodes)"
for _ in $(seq 1 100); do
  curl -fsS "${auth[@]}" "http://$api/api/v1/nodes" | grep -q '"online":true' && break
  sleep 0.1
done
curl -fsS "${auth[@]}" "http://$api/api/v1/nodes"; echo
echo
echo "The controller's API is on http://$api (token in $demo/controller/admin.token)."
echo "Logs: $demo/controller.log, $demo/node-1/agent.log. Ctrl-C stops the demo."
wait
