#!/usr/bin/env bash
# Packaging checks, run by CI after the cargo tests (needs root and apt):
# builds both .debs (packaging/build-debs.sh, dev profile), checks what they
# contain (dpkg-deb -c), installs them with dpkg -i, checks users, modes and
# the --version of the installed binaries, verifies the installed units with
# systemd-analyze, joins a node for real with the packaged install-agent.sh
# (controller run by hand as its system user, since no systemd runs here),
# checks install-agent.sh's argument errors, then removes and purges both
# packages so the machine is left as it was (monit, if installed here, stays;
# the system user deployment-engine is deleted if this run created it).
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
check "controller: INSTALL.md" has "$ctl_deb" -rw-r--r-- usr/share/doc/$ctl_pkg/INSTALL.md
check "controller: depends on adduser" sh -c "dpkg-deb -f '$ctl_deb' Depends | grep -qw adduser"
check "controller: its config is a conffile" sh -c "dpkg-deb -I '$ctl_deb' conffiles | grep -qx /etc/deployment-engine/controller.toml"
check "agent: /usr/bin/de-agent, 0755" has "$agent_deb" -rwxr-xr-x usr/bin/de-agent
check "agent: its systemd unit" has "$agent_deb" -rw-r--r-- usr/lib/systemd/system/$agent_pkg.service
check "agent: the unit is packaging/'s" same "$agent_deb" usr/lib/systemd/system/$agent_pkg.service packaging/agent/$agent_pkg.service
check "agent: /etc/deployment-engine/agent.toml, 0644" has "$agent_deb" -rw-r--r-- etc/deployment-engine/agent.toml
check "agent: the config is packaging/'s" same "$agent_deb" etc/deployment-engine/agent.toml packaging/agent/agent.toml
check "agent: INSTALL.md" has "$agent_deb" -rw-r--r-- usr/share/doc/$agent_pkg/INSTALL.md
check "agent: depends on monit" sh -c "dpkg-deb -f '$agent_deb' Depends | grep -qw monit"
check "agent: its config is a conffile" sh -c "dpkg-deb -I '$agent_deb' conffiles | grep -qx /etc/deployment-engine/agent.toml"

echo "== install (dpkg -i)"
we_installed=1
if ! out=$(dpkg -i "$ctl_deb" "$agent_deb" 2>&1); then
  bad "dpkg -i installs both packages" "$out"
  finish
fi
ok "dpkg -i installs both packages"
check "de-controller --version runs from /usr/bin" sh -c '[ "$(command -v de-controller)" = /usr/bin/de-controller ] && de-controller --version | grep -Eqx "de-controller [0-9]+\.[0-9]+\.[0-9]+"'
check "dectl --version runs from /usr/bin" sh -c '[ "$(command -v dectl)" = /usr/bin/dectl ] && dectl --version | grep -Eqx "dectl [0-9]+\.[0-9]+\.[0-9]+"'
check "de-agent --version runs from /usr/bin" sh -c '[ "$(command -v de-agent)" = /usr/bin/de-agent ] && de-agent --version | grep -Eqx "de-agent [0-9]+\.[0-9]+\.[0-9]+"'
check "the system user deployment-engine exists, with no login shell" sh -c 'u=$(getent passwd deployment-engine) && [ "$(echo "$u" | cut -d: -f3)" -lt 1000 ] && case $(echo "$u" | cut -d: -f7) in */nologin | */false) ;; *) exit 1 ;; esac'
# mode OWNER:GROUP PATH
owned() { [ "$(stat -c '%a %U:%G' "$3")" = "$1 $2" ] || { stat -c '%a %U:%G %n' "$3"; return 1; }; }
check "controller data dir: deployment-engine, 0700" owned 700 deployment-engine:deployment-engine /var/lib/deployment-engine/controller
check "agent state dir: root, 0700" owned 700 root:root /var/lib/deployment-engine/agent
check "/etc/deployment-engine/*.toml: root, 0644" sh -c 'for f in controller agent; do [ "$(stat -c "%a %U" /etc/deployment-engine/$f.toml)" = "644 root" ] || exit 1; done'

echo "== units (systemd-analyze verify on the installed units)"
for unit in $ctl_pkg $agent_pkg; do
  check "systemd-analyze verify $unit.service" systemd-analyze verify /usr/lib/systemd/system/$unit.service
done
exposure=$(systemd-analyze security --offline=yes /usr/lib/systemd/system/$ctl_pkg.service 2>/dev/null | sed -n 's/.*Overall exposure level[^:]*: \([0-9.]*\).*/\1/p')
check "controller unit hardening: exposure ${exposure:-?} (systemd-analyze security), at most 2.0" \
  awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 2.0) }'
check "agent unit runs as root with Restart=always" sh -c "! grep -q '^User=' /usr/lib/systemd/system/$agent_pkg.service && grep -qx 'Restart=always' /usr/lib/systemd/system/$agent_pkg.service"

echo "== a node joins with the console's one line (packaged install-agent.sh)"
# The controller as its unit would run it (its user, the packaged config), on
# loopback ports the kernel picks.
setpriv --reuid=deployment-engine --regid=deployment-engine --init-groups -- /usr/bin/de-controller serve --config /etc/deployment-engine/controller.toml \
  --api-listen 127.0.0.1:0 --quic-listen 127.0.0.1:0 >"$work/ctl.out" 2>"$work/ctl.err" &
ctl_pid=$!
pids+=("$ctl_pid")
for _ in $(seq 1 200); do grep -q '^quic listening' "$work/ctl.out" 2>/dev/null && break; sleep 0.1; done
api=$(sed -n 's/^api listening on //p' "$work/ctl.out")
token_file=/var/lib/deployment-engine/controller/admin.token
if [ -z "$api" ] || [ ! -f "$token_file" ]; then
  bad "the packaged controller starts as deployment-engine" "$(cat "$work/ctl.out" "$work/ctl.err")"
else
  ok "the packaged controller starts as deployment-engine on /var/lib/deployment-engine/controller"
  check "its token file: deployment-engine, 0600" owned 600 deployment-engine:deployment-engine "$token_file"
  auth="Authorization: Bearer $(cat "$token_file")"
  check "the packaged controller serves the web console at / (assets compiled in)" \
    sh -c "curl -fsS 'http://$api/' | grep -q 'console/app.js' && curl -fsS 'http://$api/console/app.js' | grep -q 'Authorization'"
  answer=$(curl -fsS -X POST -H "$auth" "http://$api/api/v1/install-codes")
  code=$(echo "$answer" | sed -E 's/.*"code":"([0-9]{4})".*/\1/')
  line=$(echo "$answer" | sed -E 's/.*"agent_command":"([^"]*)".*/\1/')
  quic=$(sed -n 's/^quic listening on //p' "$work/ctl.out")
  check "the install code comes with the exact line to run on the node" \
    test "$line" = "packaging/install-agent.sh --controller $quic --code $code"
  # The console's line, run with the packaged copy of the script.
  if out=$(bash -c "/usr/share/deployment-engine/${line#packaging/}" 2>&1); then
    ok "install-agent.sh enrols the node (no systemd here: it says how to start the agent)"
  else
    bad "install-agent.sh enrols the node" "$out"
  fi
  check "agent.toml names the controller and keeps its comments" \
    sh -c "grep -qx 'controller = \"$quic\"' /etc/deployment-engine/agent.toml && grep -q '^# heartbeat_secs' /etc/deployment-engine/agent.toml"
  check "the install code is not written to agent.toml" sh -c "! grep -q '$code' /etc/deployment-engine/agent.toml"
  check "the node identity is in /var/lib/deployment-engine/agent, 0600" owned 600 root:root /var/lib/deployment-engine/agent/node.key
  check "running install-agent.sh again is harmless" sh -c "/usr/share/deployment-engine/${line#packaging/} | grep -q 'already enrolled'"
  de-agent run --config /etc/deployment-engine/agent.toml >"$work/agent.out" 2>"$work/agent.err" &
  agent_pid=$!
  pids+=("$agent_pid")
  online=0
  for _ in $(seq 1 300); do
    curl -fsS -H "$auth" "http://$api/api/v1/nodes" | grep -q '"online":true' && { online=1; break; }
    sleep 0.1
  done
  check "the agent (de-agent run --config /etc/deployment-engine/agent.toml) comes online" test "$online" = 1
  # stop_cleanly NAME PID: SIGTERM, then exit status 0 within 15 s.
  stop_cleanly() {
    kill -TERM "$2" || return 1
    for _ in $(seq 1 150); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$2" 2>/dev/null; then echo "$1 still running 15 s after SIGTERM"; return 1; fi
    wait "$2"
  }
  check "de-agent stops cleanly on SIGTERM (exit 0)" stop_cleanly de-agent "$agent_pid"
  check "de-controller stops cleanly on SIGTERM (exit 0)" stop_cleanly de-controller "$ctl_pid"
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

echo "== remove keeps the data, purge deletes it"
check "dpkg -r removes both packages" dpkg -r "$agent_pkg" "$ctl_pkg"
check "after remove: binaries gone, data and node identity kept" sh -c \
  '! [ -e /usr/bin/de-controller ] && ! [ -e /usr/bin/de-agent ] && [ -f /var/lib/deployment-engine/controller/admin.token ] && [ -f /var/lib/deployment-engine/agent/agent.json ]'
check "dpkg --purge purges both packages" dpkg --purge "$agent_pkg" "$ctl_pkg"
we_installed=0
check "after purge: /var/lib/deployment-engine and /etc/deployment-engine are gone" sh -c \
  '! [ -e /var/lib/deployment-engine ] && ! [ -e /etc/deployment-engine ]'
check "after purge: no package left in dpkg's database" sh -c "! dpkg-query -W $ctl_pkg $agent_pkg >/dev/null 2>&1"

echo "== took $((SECONDS - start)) s"
finish
