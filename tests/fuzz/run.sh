#!/usr/bin/env bash
# Builds the fuzz targets with cargo-afl (AFL++, stable Rust) and runs each
# for SECONDS, then prints one row per target: executions, crashes, hangs.
#
#   bash tests/fuzz/run.sh [SECONDS-PER-TARGET] [TARGET...]
#
# Defaults: 60 seconds, every target. Needs cargo-afl:
#   cargo install cargo-afl --locked --version 0.18.2
# Environment: DE_FUZZ_JOBS (targets run at once, default 1),
# DE_FUZZ_MEM_MB (memory limit of a target, default 512: more is a finding),
# DE_FUZZ_TIMEOUT_MS (one input taking longer is a hang, default 2000),
# DE_FUZZ_OUT (where runs go, default tests/fuzz/out).
# Exits 1 when a target crashed or hung; the table names the files, and
#   cargo run --release --bin de-fuzz-replay -- TARGET FILE
# replays one without the engine.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
all=(frames enroll step cert plan catalog monit compat logs)
targets=("${@:-${all[@]}}")
jobs=${DE_FUZZ_JOBS:-1}
mem=${DE_FUZZ_MEM_MB:-512}
timeout_ms=${DE_FUZZ_TIMEOUT_MS:-2000}

if ! cargo afl --version >/dev/null 2>&1; then
  echo "cargo-afl is not installed: cargo install cargo-afl --locked --version 0.18.2" >&2
  exit 2
fi

echo "== building the targets (cargo afl build --release)"
cargo afl build --release --locked --features afl --bin de-fuzz-afl 2>&1 | tail -n 2
bin=target/release/de-fuzz-afl

run_dir=${DE_FUZZ_OUT:-out}/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)

# A container: no CPU frequency control, no core_pattern to set, no free
# core to bind to, and no terminal for the status screen.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
# The targets' work files (one directory per run) stay inside this run.
export TMPDIR="$run_dir/tmp"
mkdir -p "$TMPDIR"

fuzz() {
  local t=$1
  cargo afl fuzz -i "corpus/$t" -o "$run_dir/$t" -m "$mem" -t "$timeout_ms" -V "$secs" \
    -- "$bin" "$t" >"$run_dir/$t.log" 2>&1 || echo "afl-fuzz failed for $t: see $run_dir/$t.log" >&2
}

echo "== fuzzing ${#targets[@]} target(s) for ${secs} s each, $jobs at a time (memory limit ${mem} MB)"
running=0
for t in "${targets[@]}"; do
  if [ ! -d "corpus/$t" ]; then
    echo "no target $t (targets: ${all[*]})" >&2
    exit 2
  fi
  fuzz "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

stat() { sed -n "s/^$2 *: *//p" "$1" 2>/dev/null | head -n 1; }

echo
printf '%-8s %12s %10s %8s %6s %9s %s\n' target executions "exec/s" crashes hangs stability corpus
found=0
for t in "${targets[@]}"; do
  f="$run_dir/$t/default/fuzzer_stats"
  if [ ! -f "$f" ]; then
    printf '%-8s %12s\n' "$t" "did not run (see $run_dir/$t.log)"
    found=1
    continue
  fi
  crashes=$(stat "$f" saved_crashes)
  hangs=$(stat "$f" saved_hangs)
  printf '%-8s %12s %10s %8s %6s %9s %s\n' "$t" "$(stat "$f" execs_done)" \
    "$(stat "$f" execs_per_sec)" "$crashes" "$hangs" "$(stat "$f" stability)" "$(stat "$f" corpus_count)"
  if [ "${crashes:-0}" != 0 ] || [ "${hangs:-0}" != 0 ]; then
    found=1
    ls "$run_dir/$t/default/crashes/"id* "$run_dir/$t/default/hangs/"id* 2>/dev/null | sed 's/^/    /'
  fi
done
echo "(runs in $run_dir)"
exit "$found"
