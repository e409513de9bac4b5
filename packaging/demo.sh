#!/usr/bin/env bash
# Deployment Engine demo: a controller with its embedded store and three
# agents (nodes 127.0.0.2-4, each with its own node root and private monit)
# that enrol with an install code; as root, it then deploys the debian-demo
# catalog (haproxy on 127.0.0.2 balancing to nginx on 127.0.0.3 and 127.0.0.4,
# nats on 127.0.0.2) and shows the status. Everything lives under ./demo;
# Ctrl-C stops it all.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
command -v curl >/dev/null || { echo "demo: curl is needed (apt-get install curl)" >&2; exit 1; }

api=${DE_DEMO_API:-127.0.0.1:50000}
quic=${DE_DEMO_QUIC:-127.0.0.1:50001}
demo=$here/demo
nodes=(127.0.0.2 127.0.0.3 127.0.0.4)
mkdir -p "$demo"

if [ "$(id -u)" = 0 ] && ! command -v monit >/dev/null; then
  echo "== installing monit (apt-get install monit)"
  apt-get install -y -qq monit >/dev/null || { apt-get update -qq && apt-get install -y -qq monit >/dev/null; }
fi

if [ "${DE_DEMO_PROFILE:-release}" = dev ]; then
  echo "== building (cargo build)"
  cargo build --bins -p de-controller -p de-agent
  bin=$here/target/debug
else
  echo "== building (cargo build --release)"
  cargo build --release --bins -p de-controller -p de-agent
  bin=$here/target/release
fi

pids=()
monits=()
cleanup() {
  for m in "${monits[@]}"; do monit -c "$m" stop all >/dev/null 2>&1 || true; done
  sleep 2
  for m in "${monits[@]}"; do monit -c "$m" quit >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
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
# dectl finds this controller without flags (unless you have a config already).
dectl_conf=${XDG_CONFIG_HOME:-$HOME/.config}/dectl/config.toml
if [ ! -e "$dectl_conf" ]; then
  mkdir -p "$(dirname "$dectl_conf")"
  printf '# Written by packaging/demo.sh for its controller.\ncontroller = "http://%s"\ntoken_file = "%s"\n' \
    "$api" "$demo/controller/admin.token" >"$dectl_conf"
  echo "== dectl's config: $dectl_conf (try: $bin/dectl nodes)"
fi

echo "== asking for an install code (POST /api/v1/install-codes)"
code=$(curl -fsS -X POST "${auth[@]}" "http://$api/api/v1/install-codes" | sed -E 's/.*"code":"([0-9]{4})".*/\1/')
echo "   code: $code"

for i in "${!nodes[@]}"; do
  ip=${nodes[$i]}
  node=$demo/node-$((i + 1))
  # Node roots must be traversable by nginx's workers (www-data).
  mkdir -p "$node/root" && chmod 0755 "$demo" "$node" "$node/root"
  echo "== agent on $ip: de-agent run --controller $quic --code $code (enrols first)"
  "$bin/de-agent" run --controller "$quic" --code "$code" --advertise-ip "$ip" \
    --state-dir "$node/state" --root "$node/root" --monit-control "$node/monit/monitrc" \
    > "$node/agent.out" 2> "$node/agent.log" &
  pids+=($!)
  monits+=("$node/monit/monitrc")
done

echo "== waiting for the nodes to come online (GET /api/v1/nodes)"
for _ in $(seq 1 300); do
  n=$( (curl -fsS "${auth[@]}" "http://$api/api/v1/nodes" || true) | grep -o '"online":true' | wc -l || true)
  [ "$n" -ge 3 ] && break
  sleep 0.1
done
curl -fsS "${auth[@]}" "http://$api/api/v1/nodes" | sed 's/},{/},\n{/g'; echo

if [ "$(id -u)" != 0 ]; then
  echo
  echo "Not root: skipping the deployment (it installs nginx, haproxy and nats-server with apt)."
else
  echo "== submitting the debian-demo plan (POST /deployment-engine/config)"
  cat > "$demo/plan.json" <<JSON
{"components": {"haproxy": ["${nodes[0]}"], "nats": ["${nodes[0]}"], "nginx": ["${nodes[1]}", "${nodes[2]}"]},
 "properties": {"domain": "demo.local", "catalog": "debian-demo"}}
JSON
  curl -fsS "${auth[@]}" -X POST --data-binary @"$demo/plan.json" "http://$api/deployment-engine/config"; echo
  echo "== deploying (GET /deployment-engine/deploy); live log: $demo/controller/logs/local.log"
  id=$(curl -fsS "${auth[@]}" "http://$api/deployment-engine/deploy" | sed -E 's/.*"id":"([^"]+)".*/\1/')
  state=running
  for _ in $(seq 1 1200); do
    state=$(curl -fsS "${auth[@]}" "http://$api/api/v1/deployments/$id" | sed -E 's/.*"state":"([a-z]+)".*"steps_total".*/\1/')
    [ "$state" != running ] && break
    sleep 0.5
  done
  echo "   deployment $id: $state"
  for _ in $(seq 1 60); do
    (curl -fsS "${auth[@]}" "http://$api/deployment-engine/status" || true) | grep -q '"Status":"NOT_INSTALLED"\|"Status":"STARTING"' || break
    sleep 0.5
  done
  echo "== status (GET /deployment-engine/status)"
  curl -fsS "${auth[@]}" "http://$api/deployment-engine/status" | sed 's/},{/},\n{/g'; echo
  echo "== through haproxy: curl http://${nodes[0]}/"
  for _ in 1 2; do curl -s "http://${nodes[0]}/" | grep -o 'nginx on node [0-9.]*' || true; done
fi
echo
echo "The console and the API are on http://$api/ (sign in with the token in $demo/controller/admin.token)."
echo "Logs: $demo/controller.log, $demo/controller/logs/, $demo/node-*/agent.log. Ctrl-C stops the demo."
wait
