#!/usr/bin/env bash
# Joins this node to a Deployment Engine controller in one line, as the
# console shows it next to an install code:
#
#   install-agent.sh --controller HOST:PORT --code NNNN [--package FILE.deb]
#                    [--advertise-ip IP] [--state-dir DIR] [--dry-run]
#
# The install code can instead come from the DE_INSTALL_CODE environment
# variable or the first line of standard input (--code-stdin), which keep it
# out of the process list and shell history; `--code NNNN` stays in shell
# history and is visible to every local user in the argv of whatever started
# the script (sudo), though the script re-executes itself at once with the
# code in its environment.
#
# It installs the agent package (the one given, or a deployment-engine-agent_*.deb
# next to this script, unless de-agent is installed already), writes
# /etc/deployment-engine/agent.toml (controller, advertise_ip, state_dir), enrols
# the node with `de-agent enroll`, then enables and starts the
# deployment-engine-agent unit when systemd runs (else it says what to run).
# The install code goes to de-agent in its environment, never on a command
# line nor to disk.
#
# Exit status: 0 done, 64 bad arguments, 1 anything else failed.
set -euo pipefail

prog=install-agent.sh
config=/etc/deployment-engine/agent.toml
unit=deployment-engine-agent
default_state_dir=/var/lib/deployment-engine/agent
usage="usage: $prog --controller HOST:PORT --code NNNN [--package FILE.deb] [--advertise-ip IP] [--state-dir DIR] [--dry-run] (or the code in DE_INSTALL_CODE, or on standard input with --code-stdin)"

usage_error() {
  echo "$prog: $1" >&2
  echo "$usage" >&2
  exit 64
}
fail() {
  echo "$prog: $1" >&2
  exit 1
}
say() { echo "== $*"; }

valid_port() { [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }
valid_ipv4() {
  local IFS=. a b c d
  [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
  read -r a b c d <<<"$1"
  ((10#$a <= 255 && 10#$b <= 255 && 10#$c <= 255 && 10#$d <= 255))
}
valid_ipv6() { [[ $1 =~ ^[0-9A-Fa-f:.]+$ && $1 == *:*:* ]]; }
valid_host() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$ ]] || return 1
  [[ $1 =~ ^[0-9.]+$ ]] && { valid_ipv4 "$1" || return 1; }
  return 0
}

# HOST:PORT, HOST a DNS name or IPv4 address, or [IPv6]:PORT.
valid_controller() {
  local c=$1 host port
  if [[ $c =~ ^\[([^]]+)\]:([^:]+)$ ]]; then
    host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
    valid_ipv6 "$host" && valid_port "$port"
  elif [[ $c =~ ^([^:]+):([^:]+)$ ]]; then
    host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
    valid_host "$host" && valid_port "$port"
  else
    return 1
  fi
}

controller="" code="" code_arg=0 code_stdin=0 package="" advertise_ip="" state_dir="" dry_run=0
rest=()
while [ $# -gt 0 ]; do
  arg=$1
  shift
  case $arg in
    -h | --help)
      echo "$usage"
      sed -n '2,23s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    --dry-run) dry_run=1; rest+=("$arg"); continue ;;
    --code-stdin) code_stdin=1; continue ;;
    --*=*) name=${arg%%=*} value=${arg#*=} ;;
    --controller | --code | --package | --advertise-ip | --state-dir)
      name=$arg
      [ $# -gt 0 ] && [[ $1 != --* ]] || usage_error "$name needs a value"
      value=$1
      shift
      ;;
    *) usage_error "unknown argument '$arg'" ;;
  esac
  case $name in
    --controller) controller=$value ;;
    --code) code=$value code_arg=1 ;;
    --package) package=$value ;;
    --advertise-ip) advertise_ip=$value ;;
    --state-dir) state_dir=$value ;;
    *) usage_error "unknown argument '$name'" ;;
  esac
  [ "$name" = --code ] || rest+=("$name=$value")
done

if [ "$code_stdin" = 1 ]; then
  [ "$code_arg" = 0 ] || usage_error "give the install code once: --code or --code-stdin"
  IFS= read -r code || [ -n "$code" ] || usage_error "--code-stdin: standard input is empty (give the 4-digit install code on its first line)"
  code=${code//[[:space:]]/}
elif [ "$code_arg" = 0 ]; then
  code=${DE_INSTALL_CODE:-}
fi
# Only de-agent gets the code (in its environment), not apt, dpkg or systemctl.
unset DE_INSTALL_CODE

[ -n "$controller" ] || usage_error "--controller HOST:PORT is required (the controller's QUIC address, as the console shows it)"
[ -n "$code" ] || usage_error "--code NNNN is required (the 4-digit install code the console shows; or set DE_INSTALL_CODE, or pass --code-stdin)"
valid_controller "$controller" ||
  usage_error "--controller '$controller' is not HOST:PORT (a host name or IPv4 address, or [IPv6], and a port from 1 to 65535)"
[[ $code =~ ^[0-9]{4}$ ]] || usage_error "--code '$code' is not 4 digits"
# A code given as an argument is visible in /proc for as long as this script
# runs: start again with it in the environment instead.
if [ "$code_arg" = 1 ]; then
  DE_INSTALL_CODE=$code exec bash "$0" "${rest[@]}"
fi
if [ -n "$advertise_ip" ] && ! valid_ipv4 "$advertise_ip" && ! valid_ipv6 "$advertise_ip"; then
  usage_error "--advertise-ip '$advertise_ip' is not an IPv4 or IPv6 address"
fi
if [ -n "$state_dir" ] && ! [[ $state_dir =~ ^/[A-Za-z0-9._/+-]*$ ]]; then
  usage_error "--state-dir '$state_dir' must be an absolute path (letters, digits, '.', '_', '-', '+', '/')"
fi
if [ -n "$package" ]; then
  [[ $package == *.deb ]] || usage_error "--package '$package' is not a .deb file"
  [ -f "$package" ] || usage_error "--package '$package' does not exist"
fi

if [ "$dry_run" = 1 ]; then
  run() { echo "would run: $*"; }
else
  [ "$(id -u)" = 0 ] || fail "must run as root (it installs a package and a system service): sudo $0 ..."
  run() { "$@"; }
fi

# 1. The package.
if [ -z "$package" ] && ! command -v de-agent >/dev/null 2>&1; then
  here=$(cd "$(dirname "$0")" && pwd)
  shopt -s nullglob
  found=("$here"/deployment-engine-agent_*.deb)
  shopt -u nullglob
  [ ${#found[@]} -gt 0 ] ||
    fail "de-agent is not installed and no deployment-engine-agent_*.deb is next to this script: pass --package FILE.deb"
  [ ${#found[@]} -eq 1 ] || fail "several agent packages are next to this script: choose one with --package FILE.deb"
  package=${found[0]}
fi
if [ -n "$package" ]; then
  package=$(cd "$(dirname "$package")" && pwd)/$(basename "$package")
  say "installing $package (and monit)"
  # apt resolves the dependencies; a stale package list gets one refresh.
  if [ "$dry_run" = 1 ]; then
    run apt-get install -y "$package"
  else
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$package" || { apt-get update -q && apt-get install -y -q "$package"; } ||
      fail "could not install $package (see apt-get's output above)"
  fi
fi

# 2. The config file: set keys in place, keeping the comments.
settings=("controller = \"$controller\"")
[ -z "$advertise_ip" ] || settings+=("advertise_ip = \"$advertise_ip\"")
[ -z "$state_dir" ] || settings+=("state_dir = \"$state_dir\"")
say "writing $config"
if [ "$dry_run" = 1 ]; then
  for s in "${settings[@]}"; do echo "would set: $s"; done
else
  mkdir -p "$(dirname "$config")"
  tmp=$(mktemp "$config.XXXXXX")
  trap 'rm -f "$tmp"' EXIT
  if [ -f "$config" ]; then cat "$config" >"$tmp"; fi
  for s in "${settings[@]}"; do
    key=${s%% =*}
    if grep -Eq "^#? *$key *=" "$tmp"; then
      # Replace the first line that sets (or shows, commented) the key.
      awk -v key="$key" -v line="$s" '
        !done && $0 ~ "^#? *" key " *=" { print line; done = 1; next } { print }
      ' "$tmp" >"$tmp.new" && mv "$tmp.new" "$tmp"
    else
      echo "$s" >>"$tmp"
    fi
  done
  chmod 0644 "$tmp"
  mv "$tmp" "$config"
  trap - EXIT
fi

# 3. Enrolment (skipped if this node is already enrolled with this controller).
meta=${state_dir:-$default_state_dir}/agent.json
if [ "$dry_run" = 0 ] && [ -f "$meta" ]; then
  if grep -Fq "\"controller\": \"$controller\"" "$meta"; then
    say "already enrolled with $controller ($meta): not enrolling again"
  else
    fail "this node is enrolled with another controller ($meta); to enrol it anew: systemctl stop $unit; rm -r $(dirname "$meta"); then run this again"
  fi
else
  say "enrolling with $controller"
  DE_INSTALL_CODE=$code run de-agent enroll --config "$config" --controller "$controller" ||
    fail "enrolment failed (de-agent said why above); get a new code from the console if it expired"
fi

# 4. The service.
if [ -d /run/systemd/system ]; then
  say "enabling and starting $unit"
  run systemctl enable --now "$unit"
  echo "Done: this node is linked. Logs: journalctl -u $unit -f"
else
  echo "Done: this node is enrolled. systemd is not running here, so start the agent yourself:"
  echo "  de-agent run --config $config"
fi
