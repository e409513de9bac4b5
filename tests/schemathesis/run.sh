#!/usr/bin/env bash
# Fuzzes the live HTTP API against its own OpenAPI document with schemathesis:
# starts the debug controller (target/debug, as `cargo test` builds it) on a
# 127.0.26.x address with a temporary data dir, enrols two agents (each with
# its own root and monit), and runs `schemathesis run` on
# GET /api/v1/openapi.json with the admin token. It fails on any 5xx, on any
# answer that breaks the document (schema, status, content type, headers).
# Not checked by default: `negative_data_rejection` (it wants unknown query
# parameters refused; the API ignores them, as the original clients rely on)
# and `use_after_free` (a revoked node stays readable, marked `revoked`).
#
# Usage: tests/schemathesis/run.sh [MAX_EXAMPLES]   (default 40 per operation)
# Env:   DE_SCHEMATHESIS_VENV  where schemathesis is installed (default target/schemathesis-venv)
#        DE_SCHEMATHESIS_SEED  the seed (default 26; a failure prints how to replay it)
#        DE_SCHEMATHESIS_CHECKS  the checks (default below)
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned: a newer schemathesis may check more, which is a change to make on purpose.
SCHEMATHESIS_VERSION=4.32.5
examples=${1:-40}
bin=target/debug
venv=${DE_SCHEMATHESIS_VENV:-target/schemathesis-venv}
ip=127.0.26.200
api=$ip:50260
quic=$ip:50261
agents=(127.0.26.201 127.0.26.202)

for b in de-controller de-agent; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b: build it first (cargo test --workspace, or cargo build)" >&2; exit 1; }
done
command -v monit >/dev/null || { echo "monit is needed (the agents run a private one each)" >&2; exit 1; }

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q " $SCHEMATHESIS_VERSION\$"; then
  echo "== installing schemathesis $SCHEMATHESIS_VERSION into $venv"
  python=$(command -v python3.11 || command -v python3) || { echo "python3 is needed" >&2; exit 1; }
  "$python" -m venv "$venv" || { echo "$python -m venv failed: install python3-venv" >&2; exit 1; }
  "$venv/bin/pip" install --no-input --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
venv=$(cd "$venv" && pwd)

work=$(mktemp -d)
pids=()
monits=()
cleanup() {
  for m in "${monits[@]}"; do [ -e "$m" ] && monit -c "$m" quit >/dev/null 2>&1 || true; done
  # The sleepers the plan's deployment started, by their pid files.
  for f in "$work"/agent-*/root/run/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# A catalog of one harmless component (a `sleep` under each agent's own
# monit), so that the routes that need a stored plan and a deployment are
# fuzzed past their 403 `no_plan`.
mkdir -p "$work/controller/catalogs/fuzz" && chmod 0700 "$work/controller"
printf 'description = "One harmless component, for the API fuzzing"\n' >"$work/controller/catalogs/fuzz/catalog.toml"
cat >"$work/controller/catalogs/fuzz/sleeper.toml" <<'TOML'
description = "A sleep that monit supervises"
cardinality = "many"
monit_check = '''
check process sleeper with pidfile {{ path("run/sleeper.pid") }}
  start program = "/bin/sh -c 'mkdir -p {{ path("run") }}; nohup sleep 600 >/dev/null 2>&1 & echo $! > {{ path("run/sleeper.pid") }}'"
  stop program = "/bin/sh -c 'kill $(cat {{ path("run/sleeper.pid") }})'"
'''
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1

[[install]]
action = "monit_add"

[[install]]
action = "monit_start"
TOML

echo "== controller on $api (data in a temp dir)"
DE_CONTROLLER_CONFIG=/dev/null "$bin/de-controller" serve --data-dir "$work/controller" \
  --api-listen "$api" --quic-listen "$quic" --artifact-max-mb 1 \
  >"$work/controller.out" 2>"$work/controller.log" &
pids+=($!)
for _ in $(seq 1 600); do
  grep -q "^quic listening" "$work/controller.out" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || break
  sleep 0.1
done
grep -q "^quic listening" "$work/controller.out" || { cat "$work/controller.log" >&2; exit 1; }
token=$(cat "$work/controller/admin.token")
auth=(-H "Authorization: Bearer $token")

code=$(curl -fsS -X POST "${auth[@]}" "http://$api/api/v1/install-codes" | sed -E 's/.*"code":"([0-9]{4})".*/\1/')
for a in "${agents[@]}"; do
  node=$work/agent-$a
  mkdir -p "$node/root"
  echo "== agent $a enrols with the install code"
  DE_AGENT_CONFIG=/dev/null "$bin/de-agent" run --controller "$quic" --code "$code" --advertise-ip "$a" \
    --state-dir "$node/state" --root "$node/root" --monit-control "$node/monit/monitrc" \
    --heartbeat-secs 1 --max-backoff-secs 2 \
    >"$node/agent.out" 2>"$node/agent.log" &
  pids+=($!)
  monits+=("$node/monit/monitrc")
done
online=0
for _ in $(seq 1 600); do
  online=$( (curl -fsS "${auth[@]}" "http://$api/api/v1/nodes" || true) | grep -o '"online":true' | wc -l || true)
  [ "$online" -ge ${#agents[@]} ] && break
  sleep 0.1
done
if [ "$online" -lt ${#agents[@]} ]; then
  echo "only $online of ${#agents[@]} agents came online" >&2
  for a in "${agents[@]}"; do tail -n 20 "$work/agent-$a/agent.log" >&2 || true; done
  exit 1
fi
echo "== $online agents online"

echo "== a plan on both agents, deployed once"
plan='{"components": {"sleeper": ["'${agents[0]}'", "'${agents[1]}'"]}, "properties": {"domain": "fuzz.local", "catalog": "fuzz"}}'
curl -fsS "${auth[@]}" -X POST --data-binary "$plan" "http://$api/deployment-engine/config" >/dev/null
deployment=$(curl -fsS "${auth[@]}" "http://$api/deployment-engine/deploy" | sed -E 's/.*"id":"([^"]+)".*/\1/')
state=running
for _ in $(seq 1 600); do
  state=$(curl -fsS "${auth[@]}" "http://$api/api/v1/deployments/$deployment" | sed -E 's/.*"state":"([a-z]+)".*"steps_total".*/\1/')
  [ "$state" != running ] && break
  sleep 0.1
done
[ "$state" = succeeded ] || { echo "the deployment $deployment ended $state" >&2; tail -n 40 "$work/controller.log" >&2; exit 1; }

echo "== schemathesis $SCHEMATHESIS_VERSION: $examples examples per operation"
status=0
# Run from the temp dir: schemathesis and hypothesis keep their caches in the working directory.
here=$PWD
(cd "$work" && SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$here/tests/schemathesis" "$venv/bin/schemathesis" --no-color run \
  "http://$api/api/v1/openapi.json" \
  --url "http://$api" \
  --header "Authorization: Bearer $token" \
  --checks "${DE_SCHEMATHESIS_CHECKS:-not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance}" \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$examples" \
  --seed "${DE_SCHEMATHESIS_SEED:-26}" \
  --max-redirects 0 \
  --request-timeout 30 \
  --workers 4 \
  --output-sanitize true) || status=$?
if [ "$status" -ne 0 ]; then
  echo "== the controller's log (last 40 lines)" >&2
  tail -n 40 "$work/controller.log" >&2 || true
fi
exit "$status"
