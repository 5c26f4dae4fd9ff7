#!/usr/bin/env bash
# Smoke run of the benchmark scripts (bench/) with tiny durations and counts, so they cannot
# rot: every script must start its servers, log in, measure without a single failed request and
# print its table. The figures are meaningless (debug build, one second, a shared machine);
# docs/BENCHMARKS.md has the real run. Called by scripts/test.sh; exits non-zero if any script
# fails. Installs nginx and wrk when missing (through the scripts).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

# The debug build the tests already made; a release build would add minutes of LTO.
export PROFILE=${PROFILE:-debug}
OUT=$(mktemp -d /tmp/countersign-bench-smoke.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export OUT WRITE_DOCS=0

failed=()
run() {
  local name=$1
  shift
  printf '\n==> bench smoke: %s\n' "$name"
  if ! env "$@" bash "bench/$name"; then
    failed+=("$name")
    printf '!!! bench smoke: %s FAILED\n' "$name"
  fi
}

# Every target of the default run, plus the baseline's prototype switches (so they cannot rot).
run run.sh DURATION=1s ROUNDS=1 WARMUP=0 CONNECTIONS=8 \
  TARGETS="direct nginx hyper-baseline hyper-baseline-alt countersign" \
  BASELINE_ALT_ARGS="--server http1 --upstream-driver inline"
run verify-api.sh DURATION=1s ROUNDS=1 CONNECTIONS=8
run verify-api.sh DURATION=1s ROUNDS=1 CONNECTIONS=8 WORKLOADS=post1k PIN=1 SPIN_NS=1000
run memory.sh REPLAY=20000 SESSIONS=20000
run stream.sh STREAM_SIZE=64M

if ((${#failed[@]})); then
  printf '\nbench smoke: %d script(s) failed: %s\n' "${#failed[@]}" "${failed[*]}"
  exit 1
fi
printf '\nbench smoke: all 4 scripts ran\n'
