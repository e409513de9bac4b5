#!/usr/bin/env bash
# Packaging checks, run by CI after the cargo tests (needs root and apt):
# builds both .debs (packaging/build-debs.sh, dev profile), checks what they
# contain (dpkg-deb -c), installs the controller with dpkg -i and runs it as
# its system user on the packaged config (HTTPS), then does what a stock
# Debian node does: the system monit runs as its service would (by hand:
# no systemd is PID 1 here), the one line shown with an install code fetches
# join.sh and the agent package from the controller over the pinned
# connection and enrols, the package opens monit's HTTP interface with its
# drop-in (de-agent monit-setup), debian-demo's nats is deployed, restarted (new pid), stopped and
# uninstalled, the node revoked; the shell completions and man pages work,
# and root's dectl config written by the package lets `dectl nodes` run with
# no flags; then install-agent.sh's argument errors,
# and both packages removed and purged so the machine is left as it was
# (/etc/monit byte for byte; monit, if installed here, stays; the system
# user deployment-engine is deleted if this run created it; root's dectl
# config, put aside for the run, is put back).
#
#   bash packaging/check.sh        ends with "packaging: N passed, M failed"
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export DEBIAN_FRONTEND=noninteractive

ctl_pkg=deployment-engine-controller
agent_pkg=deployment-engine-agent
pass=0 failed=0
work=$(mktemp -d /tmp/de-packaging.XXXXXX)
pids=()

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; [ $# -lt 2 ] || echo "$2" | sed 's/^/     | /'; }
# check NAME COMMAND...: one check, passing when COMMAND (run in this shell) succeeds.
check() {
  local name=$1
  shift
  if "$@" >"$work/check.out" 2>&1; then ok "$name"; else bad "$name" "$(cat "$work/check.out")"; fi
}
finish() {
  echo "packaging: $pass passed, $failed failed"
  [ "$failed" = 0 ]
  exit
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${we_installed:-0}" = 1 ]; then
    dpkg --purge "$agent_pkg" "$ctl_pkg" >/dev/null 2>&1 || true
  fi
  if [ "${we_started_monit:-0}" = 1 ]; then
    monit -c /etc/monit/monitrc quit >/dev/null 2>&1 || true
  fi
  # Purge keeps root's dectl config (as it may be the operator's): put back
  # the one there was, or delete the one the package wrote in this run.
  if [ "${dectl_config_saved:-0}" = 1 ]; then
    mv -f "$work/dectl-config.saved" "$dectl_config"
  elif [ "${dectl_config_ours:-0}" = 1 ]; then
    rm -f "$dectl_config"
    for d in "${dectl_dirs_made[@]}"; do rmdir "$d" 2>/dev/null || true; done
  fi
  # Purge keeps the system user (as Debian does); drop it if this run made it.
  if [ "${user_existed:-1}" = 0 ] && getent passwd deployment-engine >/dev/null; then
    deluser --system deployment-engine >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== packaging checks (work dir $work)"
start=$SECONDS
if [ "$(id -u)" != 0 ]; then
  bad "runs as root (dpkg -i needs it)"
  finish
fi
# Never touch a real installation: this script installs and purges. Its own
# packages (revision 0~dev), left by an interrupted run, are purged first.
for p in "$agent_pkg" "$ctl_pkg"; do
  if [[ $(dpkg-query -W -f='${Version}' "$p" 2>/dev/null) == *-0~dev ]]; then
    echo "purging $p $(dpkg-query -W -f='${Version}' "$p"), left by an earlier run"
    dpkg --purge "$p" >/dev/null
  fi
done
for p in "$ctl_pkg" "$agent_pkg"; do
  if dpkg-query -W "$p" >/dev/null 2>&1; then
    bad "machine is clean" "$p is installed (or not purged) here; check.sh would purge it, so it refuses to run"
    finish
  fi
done
if [ -e /var/lib/deployment-engine ] || [ -e /etc/deployment-engine ]; then
  bad "machine is clean" "/var/lib/deployment-engine or /etc/deployment-engine exists; check.sh would delete it, so it refuses to run"
  finish
fi

getent passwd deployment-engine >/dev/null && user_existed=1 || user_existed=0

echo "== tools"
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v curl >/dev/null || need+=(curl)
# cargo-deb computes the libc dependency with dpkg-shlibdeps and strips with binutils.
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v strip >/dev/null || need+=(binutils)
installed monit || need+=(monit)
if [ ${#need[@]} -gt 0 ]; then
  # The agent package depends on monit; dpkg -i does not fetch dependencies.
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
check "monit is installable (the agent package depends on it)" installed monit

echo "== build (packaging/build-debs.sh: dev-profile binaries, revision 0~dev)"
t0=$SECONDS
if ! bash packaging/build-debs.sh --out "$work/debs" >"$work/build.log" 2>&1; then
  bad "both packages build" "$(tail -20 "$work/build.log")"
  finish
fi
ctl_deb=$(ls "$work"/debs/${ctl_pkg}_*.deb 2>/dev/null | head -1)
agent_deb=$(ls "$work"/debs/${agent_pkg}_*.deb 2>/dev/null | head -1)
if [ -f "$ctl_deb" ] && [ -f "$agent_deb" ]; then
  ok "both packages build ($((SECONDS - t0)) s): $(basename "$ctl_deb") $(du -k "$ctl_deb" | cut -f1) KiB, $(basename "$agent_deb") $(du -k "$agent_deb" | cut -f1) KiB"
else
  bad "both packages build" "$(ls -la "$work/debs" 2>&1)"
  finish
fi

echo "== contents (dpkg-deb -c)"
# has DEB MODE PATH: the package holds PATH with permissions MODE, owned by root.
has() {
  dpkg-deb -c "$1" | awk -v m="$2" -v p="./$3" '$1 == m && $2 == "0/0" && $6 == p { f = 1 } END { exit !f }' ||
    { echo "$3 ($2 root) not in $(basename "$1"):"; dpkg-deb -c "$1"; return 1; }
}
# same DEB PATH SOURCE: the packaged file is the repository's file.
same() { dpkg-deb --fsys-tarfile "$1" | tar -xOf - "./$2" | cmp - "$3"; }
check "controller: /usr/bin/de-controller, 0755" has "$ctl_deb" -rwxr-xr-x usr/bin/de-controller
check "controller: /usr/bin/dectl (the CLI), 0755" has "$ctl_deb" -rwxr-xr-x usr/bin/dectl
check "controller: its systemd unit" has "$ctl_deb" -rw-r--r-- usr/lib/systemd/system/$ctl_pkg.service
check "controller: the unit is packaging/'s" same "$ctl_deb" usr/lib/systemd/system/$ctl_pkg.service packaging/controller/$ctl_pkg.service
check "controller: /etc/deployment-engine/controller.toml, 0644" has "$ctl_deb" -rw-r--r-- etc/deployment-engine/controller.toml
check "controller: the config is packaging/'s" same "$ctl_deb" etc/deployment-engine/controller.toml packaging/controller/controller.toml
check "controller: install-agent.sh in /usr/share/deployment-engine, 0755" has "$ctl_deb" -rwxr-xr-x usr/share/deployment-engine/install-agent.sh
check "controller: its sysctl.d file (the QUIC receive buffer), 0644" has "$ctl_deb" -rw-r--r-- usr/lib/sysctl.d/60-deployment-engine-controller.conf
check "controller: INSTALL.md" has "$ctl_deb" -rw-r--r-- usr/share/doc/$ctl_pkg/INSTALL.md
check "controller: depends on adduser" sh -c "dpkg-deb -f '$ctl_deb' Depends | grep -qw adduser"
check "controller: its config is a conffile" sh -c "dpkg-deb -I '$ctl_deb' conffiles | grep -qx /etc/deployment-engine/controller.toml"
# shipped DEB NAME: NAME's completions for bash, zsh and fish and its man page (gzipped), 0644.
shipped() {
  has "$1" -rw-r--r-- "usr/share/bash-completion/completions/$2" &&
    has "$1" -rw-r--r-- "usr/share/zsh/vendor-completions/_$2" &&
    has "$1" -rw-r--r-- "usr/share/fish/vendor_completions.d/$2.fish" &&
    has "$1" -rw-r--r-- "usr/share/man/man1/$2.1.gz"
}
check "controller: de-controller's completions (bash, zsh, fish) and man page" shipped "$ctl_deb" de-controller
check "controller: dectl's completions (bash, zsh, fish) and man page" shipped "$ctl_deb" dectl
check "controller: a man page per dectl subcommand (dectl-deploy-pause.1.gz, ...)" has "$ctl_deb" -rw-r--r-- usr/share/man/man1/dectl-deploy-pause.1.gz
check "agent: /usr/bin/de-agent, 0755" has "$agent_deb" -rwxr-xr-x usr/bin/de-agent
check "agent: its systemd unit" has "$agent_deb" -rw-r--r-- usr/lib/systemd/system/$agent_pkg.service
check "agent: the unit is packaging/'s" same "$agent_deb" usr/lib/systemd/system/$agent_pkg.service packaging/agent/$agent_pkg.service
check "agent: /etc/deployment-engine/agent.toml, 0644" has "$agent_deb" -rw-r--r-- etc/deployment-engine/agent.toml
check "agent: the config is packaging/'s" same "$agent_deb" etc/deployment-engine/agent.toml packaging/agent/agent.toml
check "agent: INSTALL.md" has "$agent_deb" -rw-r--r-- usr/share/doc/$agent_pkg/INSTALL.md
check "agent: de-agent's completions (bash, zsh, fish) and man page" shipped "$agent_deb" de-agent
check "agent: depends on monit" sh -c "dpkg-deb -f '$agent_deb' Depends | grep -qw monit"
check "agent: its config is a conffile" sh -c "dpkg-deb -I '$agent_deb' conffiles | grep -qx /etc/deployment-engine/agent.toml"

echo "== install the controller (dpkg -i); the node gets the agent from it"
# root's dectl config: the package writes one where there is none, so one
# that is there is put aside for the run (cleanup puts it back).
root_home=$(getent passwd root | cut -d: -f6)
dectl_config=$root_home/.config/dectl/config.toml
dectl_dirs_made=()
for d in "$root_home/.config/dectl" "$root_home/.config"; do [ -d "$d" ] || dectl_dirs_made+=("$d"); done
if [ -e "$dectl_config" ] || [ -L "$dectl_config" ]; then
  mv "$dectl_config" "$work/dectl-config.saved" && dectl_config_saved=1
fi
dectl_config_ours=1
we_installed=1
if ! out=$(dpkg -i "$ctl_deb" 2>&1); then
  bad "dpkg -i installs the controller package" "$out"
  finish
fi
ok "dpkg -i installs the controller package"
check "de-controller --version runs from /usr/bin" sh -c '[ "$(command -v de-controller)" = /usr/bin/de-controller ] && de-controller --version | grep -Eqx "de-controller [0-9]+\.[0-9]+\.[0-9]+"'
check "dectl --version runs from /usr/bin" sh -c '[ "$(command -v dectl)" = /usr/bin/dectl ] && dectl --version | grep -Eqx "dectl [0-9]+\.[0-9]+\.[0-9]+"'
check "the system user deployment-engine exists, with no login shell" sh -c 'u=$(getent passwd deployment-engine) && [ "$(echo "$u" | cut -d: -f3)" -lt 1000 ] && case $(echo "$u" | cut -d: -f7) in */nologin | */false) ;; *) exit 1 ;; esac'
# mode OWNER:GROUP PATH
owned() { [ "$(stat -c '%a %U:%G' "$3")" = "$1 $2" ] || { stat -c '%a %U:%G %n' "$3"; return 1; }; }
check "controller data dir: deployment-engine, 0700" owned 700 deployment-engine:deployment-engine /var/lib/deployment-engine/controller
check "net.core.rmem_max is at least 32 MiB after the install (the QUIC socket's receive buffer)" sh -c '[ "$(sysctl -n net.core.rmem_max)" -ge 33554432 ]'
check "the controller package carries the agent package it was built with" \
  sh -c "cmp /usr/share/deployment-engine/packages/$(basename "$agent_deb") '$agent_deb'"
data=/var/lib/deployment-engine/controller
# The packaged config: api_listen 0.0.0.0:50000 (the default), api_tls on.
dectl_expected="controller = \"https://127.0.0.1:50000\"
token_file = \"$data/admin.token\"
ca_cert = \"$data/ca.pem\""
dectl_config_written() {
  owned 644 root:root "$dectl_config" && [ "$(grep -v '^#' "$dectl_config")" = "$dectl_expected" ] ||
    { cat "$dectl_config"; return 1; }
}
check "the package wrote root's dectl config ($dectl_config, root, 0644): the packaged API, token and CA" dectl_config_written
echo "== shell completions and man pages, installed"
# completes NAME WORD EXPECTED: bash, with NAME's installed completions
# (sourced; `complete -p NAME` names their function), offers EXPECTED for `NAME WORD<Tab>`.
completes() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  bash -c 'source "/usr/share/bash-completion/completions/$1" && spec=$(complete -p "$1") && echo "$spec" &&
    fn=${spec##* -F } && fn=${fn%% *} && COMP_WORDS=("$1" "$2") && COMP_CWORD=1 &&
    "$fn" "$1" "$2" "$1" && echo "offered: ${COMPREPLY[*]}"' completes "$1" "$2" >"$work/complete.out" 2>&1 &&
    grep -q "^offered: .*\b$3\b" "$work/complete.out" || { cat "$work/complete.out"; return 1; }
}
# man_page NAME: the installed page is gzipped roff with a NAME section, and man finds it.
man_page() {
  local page=/usr/share/man/man1/$1.1.gz
  zcat "$page" | grep -qx '\.SH NAME' || { echo "$page has no NAME section"; return 1; }
  if command -v man >/dev/null; then [ "$(man -w "$1")" = "$page" ] || { echo "man -w $1: $(man -w "$1" 2>&1)"; return 1; }; fi
}
if grep -rqs '^path-exclude=*/usr/share/man' /etc/dpkg/dpkg.cfg /etc/dpkg/dpkg.cfg.d; then
  echo "skip man pages installed: dpkg excludes /usr/share/man on this machine"
else
  check "man -w dectl finds /usr/share/man/man1/dectl.1.gz, with its NAME section" man_page dectl
  check "man -w de-controller finds its page, with its NAME section" man_page de-controller
fi
check "bash: source dectl's completions, complete -p dectl; 'dectl deploy<Tab>' offers deployments" completes dectl deploy deployments
check "bash: 'de-controller s<Tab>' offers serve" completes de-controller s serve
check "zsh and fish completions installed for dectl and de-controller" sh -c \
  'for n in dectl de-controller; do [ -s /usr/share/zsh/vendor-completions/_$n ] && [ -s /usr/share/fish/vendor_completions.d/$n.fish ] || exit 1; done'

echo "== a stock Debian node joins with the one line shown with a code, and runs debian-demo under the system monit"
# The system monit as its service runs it (no systemd as PID 1 here, so by
# hand: monit -c /etc/monit/monitrc), with Debian's monitrc as shipped.
monit_before=$(find /etc/monit -type f -print0 | sort -z | xargs -0 sha256sum)
monit_running() { [ -f /run/monit.pid ] && kill -0 "$(cat /run/monit.pid)" 2>/dev/null; }
if monit_running; then
  we_started_monit=0
else
  monit -c /etc/monit/monitrc >/dev/null 2>&1 && we_started_monit=1 || we_started_monit=0
  # The daemon writes its pidfile once it has detached.
  for _ in $(seq 1 100); do monit_running && break; sleep 0.1; done
fi
check "the system monit runs (monit -c /etc/monit/monitrc)" monit_running
check "Debian's monitrc leaves monit's HTTP interface off (what a stock node has)" \
  sh -c "! grep -Eq '^[[:space:]]*set[[:space:]]+httpd' /etc/monit/monitrc"
vcap_existed=0
[ -e /var/vcap ] && vcap_existed=1
installed nats-server && nats_was_installed=1 || nats_was_installed=0

# The controller as its unit would run it (its user, the packaged config:
# HTTPS on), on loopback: the API on the packaged port 50000 (where root's
# dectl config points), QUIC on a port the kernel picks.
setpriv --reuid=deployment-engine --regid=deployment-engine --init-groups -- /usr/bin/de-controller serve --config /etc/deployment-engine/controller.toml \
  --api-listen 127.0.0.1:50000 --quic-listen 127.0.0.1:0 >"$work/ctl.out" 2>"$work/ctl.err" &
ctl_pid=$!
pids+=("$ctl_pid")
for _ in $(seq 1 200); do grep -q '^quic listening' "$work/ctl.out" 2>/dev/null && break; sleep 0.1; done
api=$(sed -n 's/^api listening on //p' "$work/ctl.out")
pin=$(sed -n 's/^api https pin //p' "$work/ctl.out")
token_file=$data/admin.token
if [ -z "$api" ] || [ -z "$pin" ] || [ ! -f "$token_file" ]; then
  bad "the packaged controller starts as deployment-engine, serving HTTPS" "$(cat "$work/ctl.out" "$work/ctl.err")"
else
  ok "the packaged controller starts as deployment-engine on $data, serving HTTPS"
  check "its token file: deployment-engine, 0600" owned 600 deployment-engine:deployment-engine "$token_file"
  check "its API key: deployment-engine, 0600" owned 600 deployment-engine:deployment-engine "$data/api.key"
  auth="Authorization: Bearer $(cat "$token_file")"
  # Every call below verifies the controller's certificate against its CA.
  c() { curl -fsS --cacert "$data/ca.pem" -H "$auth" "$@"; }
  check "the packaged controller serves the web console over HTTPS (assets compiled in)" \
    sh -c "curl -fsS --cacert $data/ca.pem 'https://$api/' | grep -q 'console/app.js'"
  check "plain HTTP gets no answer from the HTTPS port" sh -c "! curl -fsS 'http://$api/healthz'"
  check "dectl verifies the controller with DATA/ca.pem (beside the token file)" \
    sh -c "dectl --controller https://$api --token-file $token_file nodes"
  check "dectl shows the pin the controller printed" \
    sh -c "dectl --controller https://$api --token-file $token_file ca | grep -Fqx 'API key pin:    $pin'"
  # Root with the package's config only: no flags, no DECTL_* variables.
  check "dectl nodes, as root, with no flags (root's dectl config from the package)" \
    env -u XDG_CONFIG_HOME -u DECTL_CONFIG -u DECTL_CONTROLLER -u DECTL_TOKEN_FILE -u DECTL_CA_CERT HOME="$root_home" dectl nodes
  answer=$(c -X POST "https://$api/api/v1/install-codes")
  code=$(echo "$answer" | sed -E 's/.*"code":"([0-9]{4})".*/\1/')
  line=$(echo "$answer" | sed -E 's/.*"agent_command":"([^"]*)".*/\1/')
  check "the install code comes with one verified line: curl with the pin, the code in the environment" \
    test "$line" = "curl -fsS --pinnedpubkey '$pin' -k https://$api/join.sh | DE_INSTALL_CODE=$code bash"
  check "a wrong pin gets nothing (curl: 90)" sh -c \
    "curl -fsS --pinnedpubkey 'sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=' -k https://$api/join.sh >/dev/null 2>&1; [ \$? = 90 ]"
  # The line, as the operator pastes it on the node.
  if out=$(bash -c "$line" 2>&1); then
    ok "the one line installs the agent package from the controller and enrols the node (no systemd: it says how to start the agent)"
    echo "$out" | grep -q 'de-agent run --config' || bad "join.sh says how to start the agent without systemd" "$out"
  else
    bad "the one line installs the agent package from the controller and enrols the node" "$out"
  fi
  check "de-agent --version runs from /usr/bin (installed from the controller's copy)" sh -c '[ "$(command -v de-agent)" = /usr/bin/de-agent ] && de-agent --version | grep -Eqx "de-agent [0-9]+\.[0-9]+\.[0-9]+"'
  check "agent state dir: root, 0700" owned 700 root:root /var/lib/deployment-engine/agent
  check "bash: 'de-agent e<Tab>' offers enroll (the agent package's completions)" completes de-agent e enroll
  if ! grep -rqs '^path-exclude=*/usr/share/man' /etc/dpkg/dpkg.cfg /etc/dpkg/dpkg.cfg.d; then
    check "man -w de-agent finds its page, with its NAME section" man_page de-agent
  fi
  check "/etc/deployment-engine/*.toml: root, 0644" sh -c 'for f in controller agent; do [ "$(stat -c "%a %U" /etc/deployment-engine/$f.toml)" = "644 root" ] || exit 1; done'
  quic=$(sed -n 's/^quic listening on //p' "$work/ctl.out")
  check "agent.toml names the controller and keeps its comments" \
    sh -c "grep -qx 'controller = \"$quic\"' /etc/deployment-engine/agent.toml && grep -q '^# heartbeat_secs' /etc/deployment-engine/agent.toml"
  check "the install code is not written to agent.toml" sh -c "! grep -q '$code' /etc/deployment-engine/agent.toml"
  check "the node identity is in /var/lib/deployment-engine/agent, 0600" owned 600 root:root /var/lib/deployment-engine/agent/node.key
  check "running the line again is harmless (already enrolled)" sh -c "bash -c \"\$0\" 2>&1 | grep -q 'already enrolled'" "$line"

  echo "== units (systemd-analyze verify on the installed units)"
  for unit in $ctl_pkg $agent_pkg; do
    check "systemd-analyze verify $unit.service" systemd-analyze verify /usr/lib/systemd/system/$unit.service
  done
  exposure=$(systemd-analyze security --offline=yes /usr/lib/systemd/system/$ctl_pkg.service 2>/dev/null | sed -n 's/.*Overall exposure level[^:]*: \([0-9.]*\).*/\1/p')
  check "controller unit hardening: exposure ${exposure:-?} (systemd-analyze security), at most 2.0" \
    awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 2.0) }'
  check "agent unit runs as root with Restart=always" sh -c "! grep -q '^User=' /usr/lib/systemd/system/$agent_pkg.service && grep -qx 'Restart=always' /usr/lib/systemd/system/$agent_pkg.service"

  echo "== the agent with the system monit"
  de-agent run --config /etc/deployment-engine/agent.toml >"$work/agent.out" 2>"$work/agent.err" &
  agent_pid=$!
  pids+=("$agent_pid")
  online=0
  for _ in $(seq 1 300); do
    c "https://$api/api/v1/nodes" | grep -q '"online":true' && { online=1; break; }
    sleep 0.1
  done
  check "the agent (de-agent run --config /etc/deployment-engine/agent.toml) comes online" test "$online" = 1
  drop_in=/etc/monit/conf.d/deployment-engine-httpd
  check "the package opened the system monit's HTTP interface with a drop-in ($drop_in), monitrc untouched" \
    sh -c "[ -f $drop_in ] && grep -q '^set httpd unixsocket' $drop_in && ! grep -Eq '^[[:space:]]*set[[:space:]]+httpd' /etc/monit/monitrc"
  check "monit's own command line works through it (monit status)" sh -c "monit -c /etc/monit/monitrc status >/dev/null"
  node_ip=$(c "https://$api/api/v1/nodes" | sed -E 's/.*"ips":\["([^"]+)".*/\1/')
  plan="{\"components\": {\"nats\": [\"$node_ip\"]}, \"properties\": {\"domain\": \"check.test\", \"catalog\": \"debian-demo\"}}"
  check "the plan (debian-demo: nats on the node) is accepted" sh -c "curl -fsS --cacert $data/ca.pem -H '$auth' -X POST -d '$plan' https://$api/deployment-engine/config >/dev/null"
  status_of() { c "https://$api/deployment-engine/status" | grep -o '"Status":"[A-Z_]*' | head -1 | cut -d'"' -f4; }
  wait_status() {
    local want=$1 got=""
    for _ in $(seq 1 1800); do
      got=$(status_of)
      [ "$got" = "$want" ] && return 0
      sleep 0.2
    done
    echo "status $got, wanted $want"
    return 1
  }
  dep=$(c "https://$api/deployment-engine/deploy" | sed -E 's/.*"id":"([^"]+)".*/\1/')
  deployed() {
    local st=""
    for _ in $(seq 1 3000); do
      st=$(c "https://$api/api/v1/deployments/$dep" | sed -E 's/^\{"id":"[^"]*","state":"([a-z]+)".*/\1/')
      case $st in succeeded) return 0 ;; failed | cancelled) c "https://$api/api/v1/deployments/$dep/log"; return 1 ;; esac
      sleep 0.2
    done
    echo "still $st after 10 minutes"
    return 1
  }
  check "the deployment succeeds (nats-server from Debian, supervised by the system monit)" deployed
  check "status: RUNNING" wait_status RUNNING
  pidfile=/var/vcap/sys/run/nats/nats.pid
  pid1=$(cat "$pidfile" 2>/dev/null)
  check "restart: RUNNING again with a new pid" sh -c "
    curl -fsS --cacert $data/ca.pem -H '$auth' -X PUT -d '{\"name\":\"nats\",\"ip\":\"$node_ip\"}' https://$api/deployment-engine/restart | grep -q '\"Result\":\"ok\"' &&
    for i in \$(seq 1 300); do p=\$(cat $pidfile 2>/dev/null); [ -n \"\$p\" ] && [ \"\$p\" != '$pid1' ] && kill -0 \"\$p\" 2>/dev/null && exit 0; sleep 0.2; done; exit 1"
  check "status after the restart: RUNNING" wait_status RUNNING
  check "stop: answered ok" sh -c "curl -fsS --cacert $data/ca.pem -H '$auth' -X PUT -d '{\"name\":\"nats\",\"ip\":\"$node_ip\"}' https://$api/deployment-engine/stop | grep -q '\"Result\":\"ok\"'"
  check "status: STOPPED" wait_status STOPPED
  empty='{"components": {}, "properties": {"domain": "check.test", "catalog": "debian-demo"}}'
  c -X POST -d "$empty" "https://$api/deployment-engine/config" >/dev/null
  dep=$(c "https://$api/deployment-engine/deploy" | sed -E 's/.*"id":"([^"]+)".*/\1/')
  check "an empty plan uninstalls nats: its check leaves the system monit" sh -c "
    curl -fsS --cacert $data/ca.pem -H '$auth' https://$api/api/v1/deployments/$dep >/dev/null &&
    for i in \$(seq 1 600); do [ -e /etc/monit/conf.d/nats.monitrc ] || exit 0; sleep 0.2; done; exit 1"
  check "the uninstall deployment succeeds" deployed
  check "revoking the node drops its link" sh -c "dectl --controller https://$api --token-file $token_file revoke $node_ip >/dev/null &&
    for i in \$(seq 1 300); do curl -fsS --cacert $data/ca.pem -H '$auth' https://$api/api/v1/nodes | grep -q '\"online\":true' || exit 0; sleep 0.1; done; exit 1"
  # stop_cleanly NAME PID: SIGTERM, then exit status 0 within 15 s.
  stop_cleanly() {
    kill -TERM "$2" || return 1
    for _ in $(seq 1 150); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$2" 2>/dev/null; then echo "$1 still running 15 s after SIGTERM"; return 1; fi
    wait "$2"
  }
  check "de-agent stops cleanly on SIGTERM (exit 0)" stop_cleanly de-agent "$agent_pid"
  check "de-controller stops cleanly on SIGTERM (exit 0)" stop_cleanly de-controller "$ctl_pid"
  # The component's logs stay on the node (as uninstall documents).
  [ "$vcap_existed" = 1 ] || rm -rf /var/vcap
fi

echo "== install-agent.sh argument errors (exit 64, the problem, then usage)"
script=/usr/share/deployment-engine/install-agent.sh
# arg_error EXPECTED ARGS...: exit 64, first stderr line names the problem, second is usage.
arg_error() {
  local expected=$1 err rc
  shift
  err=$(bash "$script" "$@" 2>&1 >/dev/null)
  rc=$?
  [ "$rc" = 64 ] && [ "$(echo "$err" | sed -n 1p)" = "install-agent.sh: $expected" ] &&
    echo "$err" | sed -n 2p | grep -q '^usage: install-agent.sh --controller HOST:PORT --code NNNN' &&
    [ "$(echo "$err" | wc -l)" = 2 ] ||
    { echo "exit $rc, stderr:"; echo "$err"; echo "expected: install-agent.sh: $expected"; return 1; }
}
check "no arguments" arg_error "--controller HOST:PORT is required (the controller's QUIC address, as the console shows it)"
check "missing --controller" arg_error "--controller HOST:PORT is required (the controller's QUIC address, as the console shows it)" --code 0427
check "missing --code" arg_error "--code NNNN is required (the 4-digit install code the console shows; or set DE_INSTALL_CODE, or pass --code-stdin)" --controller ctl.example:50001
check "--code and --code-stdin together" arg_error "give the install code once: --code or --code-stdin" --controller ctl.example:50001 --code 0427 --code-stdin
check "--code with no value" arg_error "--code needs a value" --controller ctl.example:50001 --code
check "--controller followed by a flag" arg_error "--controller needs a value" --controller --code 0427
check "code of 3 digits" arg_error "--code '427' is not 4 digits" --controller ctl.example:50001 --code 427
check "code with letters" arg_error "--code 'abcd' is not 4 digits" --controller ctl.example:50001 --code abcd
bad_ctl="is not HOST:PORT (a host name or IPv4 address, or [IPv6], and a port from 1 to 65535)"
check "controller without a port" arg_error "--controller 'ctl.example' $bad_ctl" --controller ctl.example --code 0427
check "controller port 0" arg_error "--controller 'ctl.example:0' $bad_ctl" --controller ctl.example:0 --code 0427
check "controller port 70000" arg_error "--controller 'ctl.example:70000' $bad_ctl" --controller ctl.example:70000 --code 0427
check "controller with shell syntax" arg_error "--controller 'ctl;reboot:1' $bad_ctl" --controller 'ctl;reboot:1' --code 0427
check "IPv6 controller without brackets" arg_error "--controller '2001:db8::1:50001' $bad_ctl" --controller 2001:db8::1:50001 --code 0427
check "unknown flag" arg_error "unknown argument '--force'" --controller ctl.example:50001 --code 0427 --force
check "missing package file" arg_error "--package '/nonexistent/a.deb' does not exist" --controller ctl.example:50001 --code 0427 --package /nonexistent/a.deb
check "bad advertise IP" arg_error "--advertise-ip '10.0.0.256' is not an IPv4 or IPv6 address" --controller ctl.example:50001 --code 0427 --advertise-ip 10.0.0.256
check "relative state dir" arg_error "--state-dir 'state' must be an absolute path (letters, digits, '.', '_', '-', '+', '/')" --controller ctl.example:50001 --code 0427 --state-dir state
check "--help exits 0 with the usage" sh -c "bash $script --help | grep -q '^usage: install-agent.sh'"
dry_run() {
  local before out
  before=$(md5sum /etc/deployment-engine/agent.toml)
  out=$(bash "$script" --controller=[2001:db8::1]:50001 --code=0427 --advertise-ip 2001:db8::7 --dry-run) || return 1
  echo "$out"
  echo "$out" | grep -Fqx 'would run: de-agent enroll --config /etc/deployment-engine/agent.toml --controller [2001:db8::1]:50001' &&
    echo "$out" | grep -Fqx 'would set: advertise_ip = "2001:db8::7"' &&
    [ "$(md5sum /etc/deployment-engine/agent.toml)" = "$before" ]
}
check "--dry-run (and --flag=value) prints what it would do and changes nothing" dry_run
# code_elsewhere HOW: the code from DE_INSTALL_CODE or standard input, never on de-agent's command line.
code_elsewhere() {
  local out
  case $1 in
    env) out=$(DE_INSTALL_CODE=0427 bash "$script" --controller ctl.example:50001 --dry-run) || return 1 ;;
    stdin) out=$(echo 0427 | bash "$script" --controller ctl.example:50001 --code-stdin --dry-run) || return 1 ;;
  esac
  echo "$out"
  echo "$out" | grep -Fqx 'would run: de-agent enroll --config /etc/deployment-engine/agent.toml --controller ctl.example:50001' &&
    ! echo "$out" | grep -q 0427
}
check "the code can come from DE_INSTALL_CODE" code_elsewhere env
check "the code can come from standard input (--code-stdin)" code_elsewhere stdin

echo "== remove keeps the node identity; purge deletes it and leaves monit's configuration as it was"
check "dpkg -r $agent_pkg" dpkg -r "$agent_pkg"
check "after remove: de-agent gone, node identity and the monit drop-in kept" sh -c \
  '! [ -e /usr/bin/de-agent ] && [ -f /var/lib/deployment-engine/agent/agent.json ] && [ -f /etc/monit/conf.d/deployment-engine-httpd ]'
check "dpkg --purge $agent_pkg" dpkg --purge "$agent_pkg"
check "after purge: the node identity is gone" sh -c '! [ -e /var/lib/deployment-engine/agent ]'
check "after purge: the drop-in is gone and /etc/monit is as it was before the node joined" sh -c "[ \"\$(find /etc/monit -type f -print0 | sort -z | xargs -0 sha256sum)\" = '$monit_before' ]"
check "the system monit still runs, reloaded without the drop-in" monit_running
if [ "$we_started_monit" = 1 ]; then
  monit -c /etc/monit/monitrc quit >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do monit_running || break; sleep 0.1; done
fi
if [ "${nats_was_installed:-1}" = 0 ]; then apt-get purge -y -qq nats-server >/dev/null 2>&1 || true; fi

echo "== root's dectl config, once changed, is the operator's: a reinstall and purge leave it"
echo "# changed by the operator" >>"$dectl_config"
dectl_sum=$(sha256sum "$dectl_config")
check "dpkg -i again (as an upgrade does) leaves root's changed dectl config as it is" \
  sh -c "dpkg -i '$ctl_deb' >/dev/null && [ \"\$(sha256sum '$dectl_config')\" = '$dectl_sum' ]"

echo "== remove keeps the controller's data, purge deletes it"
check "dpkg -r removes the controller package" dpkg -r "$ctl_pkg"
check "after remove: binaries gone, data kept" sh -c \
  '! [ -e /usr/bin/de-controller ] && [ -f /var/lib/deployment-engine/controller/admin.token ]'
check "dpkg --purge purges the controller package" dpkg --purge "$ctl_pkg"
we_installed=0
check "after purge: /var/lib/deployment-engine and /etc/deployment-engine are gone" sh -c \
  '! [ -e /var/lib/deployment-engine ] && ! [ -e /etc/deployment-engine ]'
check "after purge: root's dectl config is kept (it may be the operator's)" sh -c "[ \"\$(sha256sum '$dectl_config')\" = '$dectl_sum' ]"
check "after purge: no package left in dpkg's database" sh -c "! dpkg-query -W $ctl_pkg $agent_pkg >/dev/null 2>&1"

echo "== took $((SECONDS - start)) s"
finish
