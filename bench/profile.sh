#!/usr/bin/env bash
# Where countersign spends its time under load: starts the upstream nginx and `countersign run`
# as bench/run.sh does, logs in, loads it with wrk, and records a CPU profile of the proxy with
# `perf record` (installs linux-perf when missing). Prints the hottest symbols, the split
# between kernel and user space, and syscalls per request (perf trace -s, when available).
#
# Settings (environment):
#   WORKLOAD=get | post1k | post64k   DURATION=10s   CONNECTIONS=32 THREADS=1
#   TARGET=countersign | nginx        which proxy to profile (nginx: the proxy_pass baseline)
#   PROFILE=release | debug           countersign build (COUNTERSIGN=/path overrides)
#   OUT=bench/results/<utc time>      perf.data, profile.txt
#   TOOL=perf | callgrind             callgrind: instead of sampling, count the proxy's user-space
#                                     instructions per request under valgrind (deterministic, so
#                                     A/B comparisons are immune to the machine's load; valgrind
#                                     has no SHA-NI, so SHA-256 runs in software there). Needs
#                                     TARGET=countersign; REQUESTS=20000 (wrk -c4, -d as needed).
#   BENCH_BROWSER=1                   requests shaped like a browser's fetch() (14 field names;
#                                     bench/wrk/bench.lua) instead of wrk's bare 4
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

WORKLOAD=${WORKLOAD:-get}
TARGET=${TARGET:-countersign}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}

TOOL=${TOOL:-perf}
bench_require_tools
if [[ $TOOL == callgrind ]]; then
  command -v valgrind >/dev/null 2>&1 || bench_apt_install valgrind
  [[ $TARGET == countersign ]] || bench_die "TOOL=callgrind profiles countersign only"
else
  command -v perf >/dev/null 2>&1 || bench_apt_install linux-perf
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-profile.XXXXXX)
trap 'bench_cleanup; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/files" "$WORK/cs"

UPSTREAM_PORT=$(bench_free_port)
bench_render "$ROOT/bench/nginx/upstream.conf.in" "$WORK/upstream.conf" \
  "USER_LINE=$(bench_nginx_user_line)" "WORKERS=1" "DIR=$WORK" "PORT=$UPSTREAM_PORT"
bench_start_nginx "$WORK/upstream.conf" "$UPSTREAM_PORT" "upstream nginx" "$WORK/upstream.log"
CS_BIN=$(bench_countersign_bin "$ROOT")
if [[ $TOOL == callgrind ]]; then
  # The proxy runs under callgrind with instrumentation off; it is switched on only around the
  # measured load, so startup and the login's argon2id hash are not counted.
  cat >"$WORK/cs-callgrind.sh" <<WRAP
#!/usr/bin/env bash
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out" "$CS_BIN" "\$@"
WRAP
  chmod +x "$WORK/cs-callgrind.sh"
  CS_BIN="$WORK/cs-callgrind.sh"
fi
CS_PORT=$(bench_free_port)
bench_countersign_config "$WORK/cs" "$CS_PORT" "$(bench_free_port)" "http://127.0.0.1:$UPSTREAM_PORT"
bench_start_countersign "$CS_BIN" "$WORK/cs" "$CS_PORT" "$WORK/cs/countersign.log"
bench_login "$CS_PORT"
if [[ $TARGET == nginx ]]; then
  # The baseline, profiled the same way: its workers get the load.
  PROXY_PORT=$(bench_free_port)
  bench_render "$ROOT/bench/nginx/proxy.conf.in" "$WORK/proxy.conf" \
    "USER_LINE=$(bench_nginx_user_line)" "WORKERS=${NGINX_WORKERS:-$(nproc)}" "DIR=$WORK" \
    "PORT=$PROXY_PORT" "UPSTREAM_PORT=$UPSTREAM_PORT"
  bench_start_nginx "$WORK/proxy.conf" "$PROXY_PORT" "nginx proxy_pass" "$WORK/proxy.log"
  PROFILED_PIDS=$(bench_proc_tree "$BENCH_LAST_PID" | paste -sd, -)
  TARGET_PORT=$PROXY_PORT
else
  PROFILED_PIDS=$COUNTERSIGN_PID
  TARGET_PORT=$CS_PORT
fi

method=GET body=0
case $WORKLOAD in
  get) ;;
  post1k) method=POST body=1024 ;;
  post64k) method=POST body=65536 ;;
  *) bench_die "unknown workload $WORKLOAD" ;;
esac
if [[ $TOOL == callgrind ]]; then
  REQUESTS=${REQUESTS:-20000}
  # Warm the upstream connections and allocator caches outside the count.
  BENCH_METHOD=$method BENCH_BODY=$body BENCH_COOKIE=$BENCH_COOKIE BENCH_CSRF=$BENCH_CSRF \
    wrk -t1 -c4 -d2s -s "$ROOT/bench/wrk/bench.lua" "http://127.0.0.1:$TARGET_PORT/api/bench" >/dev/null 2>&1
  callgrind_control -i on "$COUNTERSIGN_PID" >/dev/null
  # wrk is time-based: run in slices until REQUESTS were served.
  served=0
  while ((served < REQUESTS)); do
    BENCH_METHOD=$method BENCH_BODY=$body BENCH_COOKIE=$BENCH_COOKIE BENCH_CSRF=$BENCH_CSRF \
      wrk -t1 -c4 -d5s --timeout 10s -s "$ROOT/bench/wrk/bench.lua" \
      "http://127.0.0.1:$TARGET_PORT/api/bench" >"$WORK/wrk.out" 2>&1 || bench_die "wrk failed"
    line=$(grep '^BENCH_RESULT' "$WORK/wrk.out") || bench_die "wrk printed no result"
    [[ $line == *" status=0 "* ]] || bench_die "errors under callgrind: $line"
    n=${line##*requests=}
    n=${n%%[!0-9]*}
    served=$((served + n))
  done
  callgrind_control -i off "$COUNTERSIGN_PID" >/dev/null
  kill "$COUNTERSIGN_PID"
  wait "$COUNTERSIGN_PID" 2>/dev/null || true
  shopt -s nullglob
  outs=("$OUT"/callgrind.out*)
  ((${#outs[@]})) || bench_die "callgrind wrote no output"
  total=0
  for f in "${outs[@]}"; do
    ir=$(awk '/^totals:/ { print $2; exit }' "$f")
    [[ $ir =~ ^[0-9]+$ ]] || bench_die "$f: no instruction total"
    total=$((total + ir))
  done
  {
    echo "# countersign under callgrind, wrk $WORKLOAD -c4, $served requests counted"
    echo "instructions (user space, all threads): $total"
    echo "instructions per request: $((total / served))"
    echo
    echo "## top functions (inclusive and self: callgrind_annotate ${outs[0]##*/})"
    callgrind_annotate --inclusive=no "${outs[0]}" 2>/dev/null | sed -n '1,60p'
  } >"$OUT/profile.txt"
  cat "$OUT/profile.txt"
  bench_log "callgrind output in $OUT (callgrind_annotate $OUT/callgrind.out* for more)"
  exit 0
fi
secs=${DURATION%s}
((secs >= 6)) || bench_die "DURATION must be at least 6s (warm-up, perf record, perf trace)"
BENCH_METHOD=$method BENCH_BODY=$body BENCH_COOKIE=$BENCH_COOKIE BENCH_CSRF=$BENCH_CSRF \
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/bench/wrk/bench.lua" \
  "http://127.0.0.1:$TARGET_PORT/api/bench" >"$OUT/profile-wrk.txt" 2>&1 &
WRK_PID=$!
sleep 1
# DWARF unwinding: the release build has no frame pointers, and inclusive ("children") time of
# countersign's own functions is the useful figure.
perf record -F 499 --call-graph dwarf,16384 -o "$OUT/perf.data" -p "$PROFILED_PIDS" -- sleep $((secs - 4)) \
  >"$WORK/perf-record.log" 2>&1 || { cat "$WORK/perf-record.log" >&2; bench_die "perf record failed"; }
# Syscall counts for 1 s, still under load (divide by req/s for syscalls per request).
perf trace -s -p "$PROFILED_PIDS" -- sleep 1 >"$OUT/perf-trace.txt" 2>&1 || true
wait "$WRK_PID" || bench_die "wrk failed"
{
  echo "# $TARGET under wrk $WORKLOAD -c$CONNECTIONS (perf record -F 999 -p PID)"
  grep '^BENCH_RESULT' "$OUT/profile-wrk.txt" || true
  grep 'Requests/sec' "$OUT/profile-wrk.txt" || true
  echo
  echo "## by shared object"
  perf report -i "$OUT/perf.data" --stdio --no-children --sort dso -g none 2>/dev/null |
    grep -v -e '^#' -e '^$' | head -n 15 || true
  echo
  echo "## hottest symbols (self time)"
  perf report -i "$OUT/perf.data" --stdio --no-children --sort dso,sym -g none 2>/dev/null |
    grep -v -e '^#' -e '^$' | head -n 60 || true
  echo
  echo "## inclusive time of the request path's own functions (children)"
  perf report -i "$OUT/perf.data" --stdio --children --sort sym -g none 2>/dev/null |
    grep -v -e '^#' -e '^$' | grep -E 'countersign::|hyper::|hyper_util::|tokio::|sha2::|hmac::|malloc|free' |
    head -n 60 || true
  echo
  echo "## syscalls during 1 s of load (perf trace -s; all threads)"
  grep -v '^$' "$OUT/perf-trace.txt" | head -n 80 || true
} >"$OUT/profile.txt"
cat "$OUT/profile.txt"
bench_log "profile in $OUT (perf report -i $OUT/perf.data for more)"
