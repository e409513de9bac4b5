#!/usr/bin/env bash
# Builds the two Debian packages, deployment-engine-controller and
# deployment-engine-agent, with cargo-deb (metadata in controller/Cargo.toml
# and agent/Cargo.toml, files in packaging/). The agent package is built
# first and goes into the controller package too, which serves it to nodes.
#
#   packaging/build-debs.sh [--release] [--out DIR]
#
# --release   cargo build --release, then package: the packages to ship.
# (default)   package the dev-profile binaries in target/debug that
#             `cargo test --workspace` already built, with version revision
#             0~dev: for CI's packaging checks (packaging/check.sh), not to
#             ship (unoptimised code; a release build sorts higher).
# --out DIR   where the .deb files go (default target/debian).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo_deb_version=3.8.0
release=0 out=target/debian
while [ $# -gt 0 ]; do
  case $1 in
    --release) release=1; shift ;;
    --out) [ $# -ge 2 ] || { echo "build-debs.sh: --out needs a directory" >&2; exit 64; }; out=$2; shift 2 ;;
    -h | --help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "build-debs.sh: unknown argument '$1'" >&2; echo "usage: packaging/build-debs.sh [--release] [--out DIR]" >&2; exit 64 ;;
  esac
done
if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-debs.sh: cargo-deb is missing: cargo install cargo-deb --locked --version $cargo_deb_version" >&2
  exit 1
fi
mkdir -p "$out"

if [ "$release" = 1 ]; then
  cargo build --release --locked --bins -p de-controller -p de-agent
  deb_args=()
else
  # The same command the integration tests' harness runs, so after
  # `cargo test --workspace` this builds nothing. cargo-deb warns that the dev
  # profile is for testing only (-q hides that); the 0~dev revision says so.
  cargo build --locked --bins -p de-controller -p de-agent
  deb_args=(--profile dev --deb-revision 0~dev -q)
fi
# The agent first: the controller package carries it (in
# /usr/share/deployment-engine/packages), to serve to nodes through /join.sh.
cargo deb --no-build -p de-agent -o "$out" "${deb_args[@]}"
bundle=target/agent-package
rm -rf "$bundle"
mkdir -p "$bundle"
agent_deb=$(ls -t "$out"/deployment-engine-agent_*.deb | head -1)
cp "$agent_deb" "$bundle/"
cargo deb --no-build -p de-controller -o "$out" "${deb_args[@]}"
