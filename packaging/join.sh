#!/usr/bin/env bash
# Joins this node to the Deployment Engine controller that served this
# script (GET /join.sh, over HTTPS). The controller fills in the values below;
# the line shown with every install code runs it:
#
#   curl -fsS --pinnedpubkey 'sha256//PIN' -k https://CONTROLLER:50000/join.sh | DE_INSTALL_CODE=NNNN bash
#
# curl checks the controller's public key against the pin (so -k only skips
# the CA lookup a fresh node cannot do); this script then downloads, over the
# same pinned connection, the controller's install-agent.sh and agent package
# (plus any other .deb the operator put beside it for offline nodes, such as
# monit's), checks each against the SHA-256 written here, installs them as
# root (through sudo when not run as root, passing only DE_INSTALL_CODE),
# and enrols the node. The code is read from DE_INSTALL_CODE, else asked on
# the terminal; it never appears in any process's arguments.
#
# Exit status: 0 joined, 1 anything failed (nothing is installed unless
# every download matched its SHA-256).
set -euo pipefail

# Filled in by the controller.
controller='@CONTROLLER@'
api='@API@'
pin='@PIN@'
agent_package='@AGENT_PACKAGE@'
# One "NAME SHA256" per line: install-agent.sh, the agent package, extra packages.
files='@FILES@'
# The download directory, removed on exit.
tmp=""

main() {
  fail() {
    echo "join.sh: $1" >&2
    exit 1
  }
  command -v curl >/dev/null || fail "curl is missing (it fetched this script?)"
  command -v sha256sum >/dev/null || fail "sha256sum is missing (Debian's coreutils)"
  local code=${DE_INSTALL_CODE:-}
  if [ -z "$code" ]; then
    [ -r /dev/tty ] || fail "no install code: run it as DE_INSTALL_CODE=NNNN bash (the console shows the line)"
    read -rs -p "install code: " code </dev/tty
    echo >&2
  fi
  [[ $code =~ ^[0-9]{4}$ ]] || fail "the install code must be 4 digits (the console shows it)"

  tmp=$(mktemp -d /tmp/de-join.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  local name sum extra=()
  while read -r name sum; do
    [ -n "$name" ] || continue
    echo "== downloading $name"
    curl -fsS --retry 3 --pinnedpubkey "$pin" -k -o "$tmp/$name" "https://$api/packages/$name" ||
      fail "could not download https://$api/packages/$name (see curl's message above)"
    echo "$sum  $tmp/$name" | sha256sum --check --quiet --status ||
      fail "$name does not match the SHA-256 the controller gave ($sum): refusing to install it"
    case $name in
      install-agent.sh | "$agent_package") ;;
      *.deb) extra+=("$tmp/$name") ;;
    esac
  done <<<"$files"
  [ -f "$tmp/install-agent.sh" ] && [ -f "$tmp/$agent_package" ] ||
    fail "the controller did not offer install-agent.sh and the agent package"

  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || fail "run as root (sudo is not installed): ... | DE_INSTALL_CODE=NNNN bash, as root"
    sudo=(sudo --preserve-env=DE_INSTALL_CODE)
  fi
  chmod 0755 "$tmp"
  # Extra packages (monit's, for a node without a mirror) go in first, the
  # ones not installed yet only.
  local deb pkg need=()
  for deb in "${extra[@]}"; do
    pkg=$(dpkg-deb -f "$deb" Package) || fail "$(basename "$deb") is not a Debian package"
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$deb")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]##*/}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" ||
      fail "could not install ${need[*]##*/} (see apt-get's output above)"
  fi
  DE_INSTALL_CODE=$code "${sudo[@]}" bash "$tmp/install-agent.sh" \
    --controller "$controller" --package "$tmp/$agent_package"
}

main "$@"
