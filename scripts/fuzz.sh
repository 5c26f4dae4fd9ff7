#!/usr/bin/env bash
# Coverage-guided fuzzing of the code that parses untrusted input (fuzz/, docs/ARCHITECTURE.md
# "Fuzzing"): cargo-fuzz (libFuzzer) on the stable toolchain, each target for FUZZ_SECONDS.
#
#   scripts/fuzz.sh                      # every target, 60 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh verify sf_fields
#   FUZZ_SANITIZER=none scripts/fuzz.sh  # without AddressSanitizer (faster)
#   FUZZ_KEEP_CORPUS=1 scripts/fuzz.sh   # merge what the run found into fuzz/corpus/ (minimised)
#   FUZZ_TARGET_DIR=/tmp/fz scripts/fuzz.sh  # build directory (default fuzz/target)
#   FUZZ_PROFILE=dev scripts/fuzz.sh     # unoptimised build: 60% of the build time, a few
#                                        # times fewer executions per second (.ci/run uses it)
#
# Targets run one at a time (one fuzz process). New inputs go to a temporary corpus unless
# FUZZ_KEEP_CORPUS=1; a crashing input is written to fuzz/artifacts/<target>/ and the script
# exits 1 after the other targets have run. Reproduce one with
#   fuzz/target/<host triple>/release/<target> fuzz/artifacts/<target>/<file>   (after a run;
#   debug/ instead of release/ after FUZZ_PROFILE=dev, and .ci/run builds in target/fuzz/)
# and keep it as a regression in fuzz/regressions/<target>/, which tests/fuzz_corpus.rs replays.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-fuzz/target}
FUZZ_PROFILE=${FUZZ_PROFILE:-release}
# One per check in fuzz/src/checks.rs (docs/ARCHITECTURE.md, "Fuzzing", says what each covers;
# ws_frames reaches the crate-private WebSocket frame tracker through the hidden
# `countersign::__fuzz`).
ALL_TARGETS=(verify sf_fields identity rawhttp keyfile proxy_config proxy_headers proxy_protocol session_record ws_frames)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

# cargo-fuzz passes -Z flags (sanitizer, coverage instrumentation) that only nightly rustc
# takes; RUSTC_BOOTSTRAP=1 lets the stable compiler take them.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  # Pinned: the machine has one toolchain and cannot fetch another, so a later cargo-fuzz
  # that needs a newer rustc would stop every run here.
  cargo install --locked cargo-fuzz@0.13.2
fi

redis_pid=""
# FUZZ_WORK_DIR: where the run's new inputs go (kept); default a temporary directory.
if [ -n "${FUZZ_WORK_DIR:-}" ]; then
  work=$FUZZ_WORK_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
fi
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; fi
  if [ -z "${FUZZ_WORK_DIR:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

start_redis() {
  if ! command -v redis-server >/dev/null; then
    echo "fuzz.sh: installing redis-server (target session_record)" >&2
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  fi
  for _ in 1 2 3 4 5; do
    local port=$((20000 + RANDOM % 20000))
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$work" >"$work/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 50); do
      if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
        export FUZZ_REDIS_URL="redis://127.0.0.1:$port/"
        return 0
      fi
      sleep 0.1
    done
    kill "$redis_pid" 2>/dev/null || true
    redis_pid=""
  done
  echo "fuzz.sh: could not start redis-server: $(cat "$work/redis.log")" >&2
  return 1
}

# One build of every target, then each binary run directly (`cargo fuzz run` would build again,
# with other profile settings than `cargo fuzz build`).
# FUZZ_SKIP_BUILD=1: run the binaries already in FUZZ_TARGET_DIR as they are.
# FUZZ_PROFILE=dev: cargo-fuzz's default build (opt-level 3, one codegen unit per crate) took
# 918 CPU-seconds here with ASan, the unoptimised one 549 (docs/ARCHITECTURE.md, "Fuzzing").
build_args=(--fuzz-dir fuzz --target-dir "$FUZZ_TARGET_DIR" --sanitizer "$FUZZ_SANITIZER")
case $FUZZ_PROFILE in
  release) ;;
  dev)
    build_args+=(--dev)
    # The fuzz package's dev profile has full debuginfo; file and line are enough.
    export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}
    ;;
  *)
    echo "fuzz.sh: FUZZ_PROFILE must be release or dev, not '$FUZZ_PROFILE'" >&2
    exit 2
    ;;
esac
if [ "${FUZZ_SKIP_BUILD:-0}" != 1 ]; then
  cargo fuzz build "${build_args[@]}"
fi
profile_dir=release
if [ "$FUZZ_PROFILE" = dev ]; then profile_dir=debug; fi
bin_dir="$FUZZ_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/$profile_dir"

failed=()
for target in "${TARGETS[@]}"; do
  if [ "$target" = session_record ] && [ -z "$redis_pid" ]; then start_redis; fi
  mkdir -p "$work/$target" "fuzz/artifacts/$target" "fuzz/corpus/$target"
  echo "=== $target: ${FUZZ_SECONDS}s (sanitizer $FUZZ_SANITIZER, $FUZZ_PROFILE build)" >&2
  if ! "$bin_dir/$target" "$work/$target" "fuzz/corpus/$target" \
      -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
      -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/"; then
    failed+=("$target")
  fi
  if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
    "$bin_dir/$target" "fuzz/corpus/$target" "$work/$target" -merge=1 -max_len=8192 -timeout=10
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: findings in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz.sh: no findings in ${TARGETS[*]} (${FUZZ_SECONDS}s each)" >&2
