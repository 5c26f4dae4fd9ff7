#!/usr/bin/env bash
# Throughput and latency of countersign next to nginx, in one run.
#
# Starts (all on 127.0.0.1, random free ports):
#   - "direct":      an upstream nginx returning a small JSON body (the API stand-in);
#   - "nginx":       nginx proxy_pass to it with upstream keep-alive (the baseline);
#   - "hyper-baseline": countersign-baseline-proxy, a plain reverse proxy on the proxy's own
#                    stack (hyper server, per-loop pool of hyper HTTP/1 client connections,
#                    one runtime per core): no session, no CSRF, no signing; what the stack
#                    costs before countersign does its own work;
#   - "countersign": `countersign run` with a generated config (memory session store, a keyring,
#                    a users file with a known argon2id hash) forwarding /api/ to the upstream,
#                    after logging in once with curl for a session cookie and CSRF token.
# Then measures with wrk, alternating targets inside each round (A B C, then C B A, ...), for
# GET and POST with 1 KiB and 64 KiB bodies (every request carries the cookie and CSRF header,
# to every target, so the requests are byte-identical). Reports req/s, p50, p99 and each
# figure's ratio to nginx.
#
# Settings (environment):
#   DURATION=10s ROUNDS=3 WARMUP=2s   wrk duration per measurement, rounds, warm-up per target
#   CONNECTIONS=32 THREADS=1          wrk -c / -t (wrk shares the machine's cores with the rest)
#   WORKLOADS="get post1k post64k"    any of get, post1k, post64k
#   TARGETS="direct nginx hyper-baseline countersign"
#                                     add "countersign-redis" for the Redis session store
#                                     (needs redis-server; REDIS_URL, default a fresh local one),
#                                     "countersign-alt" to A/B another build in the same run
#                                     (COUNTERSIGN_ALT=/path/to/countersign; memory store),
#                                     "hyper-baseline-alt" to A/B a baseline variant
#                                     (BASELINE_ALT=/path/to/countersign-baseline-proxy, default
#                                     the same binary; BASELINE_ALT_ARGS="--server auto" etc.)
#   BASELINE=/path  BASELINE_ARGS=""  the hyper-baseline binary and its extra arguments
#   NGINX_WORKERS=<nproc> UPSTREAM_WORKERS=1   nginx worker_processes of the proxy / upstream
#   PROFILE=release | debug           which countersign build (COUNTERSIGN=/path overrides)
#   OUT=bench/results/<utc time>      where results.csv, results.json, table.md, chart.svg go
#   WRITE_DOCS=1                      also rewrite the results section of docs/BENCHMARKS.md
#                                     and docs/benchmarks.svg
# Exit status: non-zero when a tool or server fails, or any request in a measurement failed
# (a benchmark of error responses would be meaningless).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
WORKLOADS=${WORKLOADS:-"get post1k post64k"}
TARGETS=${TARGETS:-"direct nginx hyper-baseline countersign"}
NGINX_WORKERS=${NGINX_WORKERS:-$(nproc)}
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-1}
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
WRITE_DOCS=${WRITE_DOCS:-0}

bench_require_tools
# The commit the measured build comes from (taken before building; "+dirty" when src/ or
# Cargo.toml had uncommitted changes).
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || COMMIT+="+dirty"
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-bench.XXXXXX)
trap 'bench_cleanup; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/files"

# --- servers ---------------------------------------------------------------------------------
UPSTREAM_PORT=$(bench_free_port)
bench_render "$ROOT/bench/nginx/upstream.conf.in" "$WORK/upstream.conf" \
  "USER_LINE=$(bench_nginx_user_line)" "WORKERS=$UPSTREAM_WORKERS" "DIR=$WORK" "PORT=$UPSTREAM_PORT"
bench_start_nginx "$WORK/upstream.conf" "$UPSTREAM_PORT" "upstream nginx" "$WORK/upstream.log"
declare -A URL SERVER_PID
URL[direct]="http://127.0.0.1:$UPSTREAM_PORT/api/bench"
SERVER_PID[direct]=$BENCH_LAST_PID

needs_target() { [[ " $TARGETS " == *" $1 "* ]]; }

if needs_target nginx; then
  PROXY_PORT=$(bench_free_port)
  bench_render "$ROOT/bench/nginx/proxy.conf.in" "$WORK/proxy.conf" \
    "USER_LINE=$(bench_nginx_user_line)" "WORKERS=$NGINX_WORKERS" "DIR=$WORK" \
    "PORT=$PROXY_PORT" "UPSTREAM_PORT=$UPSTREAM_PORT"
  bench_start_nginx "$WORK/proxy.conf" "$PROXY_PORT" "nginx proxy_pass" "$WORK/proxy.log"
  URL[nginx]="http://127.0.0.1:$PROXY_PORT/api/bench"
  SERVER_PID[nginx]=$BENCH_LAST_PID
fi

if needs_target hyper-baseline || needs_target hyper-baseline-alt; then
  BASELINE_BIN=$(bench_baseline_bin "$ROOT")
  for target in hyper-baseline hyper-baseline-alt; do
    needs_target "$target" || continue
    bin=$BASELINE_BIN
    extra=${BASELINE_ARGS:-}
    if [[ $target == hyper-baseline-alt ]]; then
      bin=${BASELINE_ALT:-$BASELINE_BIN}
      extra=${BASELINE_ALT_ARGS:-}
    fi
    [[ -x $bin ]] || bench_die "target $target: $bin is not an executable"
    port=$(bench_free_port)
    mkdir -p "$WORK/$target"
    # shellcheck disable=SC2086 # extra arguments, one per word
    bench_start_baseline "$bin" "$port" "http://127.0.0.1:$UPSTREAM_PORT" "$WORK/$target/baseline.log" $extra
    URL[$target]="http://127.0.0.1:$port/api/bench"
    SERVER_PID[$target]=$BASELINE_PID
  done
fi

declare -A COOKIE CSRF
start_countersign() {
  local target=$1 store=$2 bin=${3:-$CS_BIN} dir="$WORK/$1" port admin
  mkdir -p "$dir"
  port=$(bench_free_port)
  admin=$(bench_free_port)
  bench_countersign_config "$dir" "$port" "$admin" "http://127.0.0.1:$UPSTREAM_PORT" "$store"
  bench_start_countersign "$bin" "$dir" "$port" "$dir/countersign.log"
  bench_login "$port"
  COOKIE[$target]=$BENCH_COOKIE
  CSRF[$target]=$BENCH_CSRF
  URL[$target]="http://127.0.0.1:$port/api/bench"
  SERVER_PID[$target]=$COUNTERSIGN_PID
}

if needs_target countersign || needs_target countersign-redis || needs_target countersign-alt; then
  CS_BIN=$(bench_countersign_bin "$ROOT")
  needs_target countersign && start_countersign countersign memory
  if needs_target countersign-alt; then
    [[ -x ${COUNTERSIGN_ALT:-} ]] || bench_die "target countersign-alt needs COUNTERSIGN_ALT=/path/to/another/countersign"
    start_countersign countersign-alt memory "$COUNTERSIGN_ALT"
  fi
  if needs_target countersign-redis; then
    if [[ -z ${REDIS_URL:-} ]]; then
      command -v redis-server >/dev/null 2>&1 || bench_apt_install redis-server
      REDIS_PORT=$(bench_free_port)
      redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        >"$WORK/redis.log" 2>&1 &
      BENCH_PIDS+=($!)
      bench_wait_port "$REDIS_PORT" "redis-server" "$WORK/redis.log"
      export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
    fi
    start_countersign countersign-redis redis
  fi
fi

# Every target gets the same cookie and CSRF header (the first countersign's, or dummies), so
# the bytes on the wire are the same; each countersign target gets its own session.
DEFAULT_COOKIE="countersign_session=bench-cookie-of-equal-length-000000000000000000000"
DEFAULT_CSRF="bench-csrf-token-of-equal-length-00000000000"
cookie_for() { echo "${COOKIE[$1]:-${COOKIE[countersign]:-$DEFAULT_COOKIE}}"; }
csrf_for() { echo "${CSRF[$1]:-${CSRF[countersign]:-$DEFAULT_CSRF}}"; }

# --- sanity: every target answers 200 with the upstream body, for GET and POST ---------------
for target in $TARGETS; do
  [[ -n ${URL[$target]:-} ]] || bench_die "unknown target $target (known: direct nginx hyper-baseline hyper-baseline-alt countersign countersign-redis countersign-alt)"
  for method in GET POST; do
    data=()
    [[ $method == POST ]] && data=(-H 'Content-Type: application/json' --data '{"data":"x"}')
    out=$(curl -sS -o "$WORK/sanity.body" -w '%{http_code}' -X "$method" "${data[@]}" \
      -H "Cookie: $(cookie_for "$target")" -H "X-CSRF-Token: $(csrf_for "$target")" \
      "${URL[$target]}") || bench_die "$target: $method ${URL[$target]} failed"
    if [[ $out != 200 ]] || ! grep -q bench-upstream "$WORK/sanity.body"; then
      cat "$WORK/sanity.body" >&2
      bench_die "$target: $method ${URL[$target]} answered $out, not the upstream's 200"
    fi
  done
done

# --- measurements ----------------------------------------------------------------------------
CSV="$OUT/results.csv"
echo "round,workload,target,requests,duration_s,rps,p50_ms,p90_ms,p99_ms,max_ms,errors,server_cpu_us_per_req,server_ctxsw_per_req" >"$CSV"
CLK_TCK=$(getconf CLK_TCK)

run_wrk() { # target workload duration -> prints the BENCH_RESULT line
  local target=$1 workload=$2 duration=$3 method=GET body=0
  case $workload in
    get) ;;
    post1k) method=POST body=1024 ;;
    post64k) method=POST body=65536 ;;
    *) bench_die "unknown workload $workload (known: get post1k post64k)" ;;
  esac
  local pids before after
  pids=$(bench_proc_tree "${SERVER_PID[$target]}")
  # shellcheck disable=SC2086 # one pid per word
  before=$(bench_cpu_sample $pids)
  BENCH_METHOD=$method BENCH_BODY=$body BENCH_COOKIE=$(cookie_for "$target") \
    BENCH_CSRF=$(csrf_for "$target") \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency --timeout 5s \
    -s "$ROOT/bench/wrk/bench.lua" "${URL[$target]}" >"$WORK/wrk.out" 2>&1 || {
    cat "$WORK/wrk.out" >&2
    bench_die "wrk failed for $target $workload"
  }
  # shellcheck disable=SC2086
  after=$(bench_cpu_sample $pids)
  local line
  line=$(grep '^BENCH_RESULT' "$WORK/wrk.out") || {
    cat "$WORK/wrk.out" >&2
    bench_die "wrk printed no result for $target $workload"
  }
  read -r t0 s0 <<<"$before"
  read -r t1 s1 <<<"$after"
  echo "$line cpu_ticks=$((t1 - t0)) ctxsw=$((s1 - s0))"
}

read -r -a TARGET_LIST <<<"$TARGETS"
if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
  for target in "${TARGET_LIST[@]}"; do
    bench_log "warm-up $target ($WARMUP)"
    run_wrk "$target" get "$WARMUP" >/dev/null
  done
fi

for ((round = 1; round <= ROUNDS; round++)); do
  order=("${TARGET_LIST[@]}")
  if ((round % 2 == 0)); then # C B A on even rounds, so drift does not favour one target
    order=()
    for ((i = ${#TARGET_LIST[@]} - 1; i >= 0; i--)); do order+=("${TARGET_LIST[i]}"); done
  fi
  for workload in $WORKLOADS; do
    for target in "${order[@]}"; do
      line=$(run_wrk "$target" "$workload" "$DURATION")
      row=$(python3 - "$round" "$workload" "$target" "$line" "$CLK_TCK" <<'PY'
import sys
rnd, workload, target, line, clk_tck = sys.argv[1:6]
f = dict(kv.split("=") for kv in line.split()[1:])
n, us = int(f["requests"]), int(f["duration_us"])
errors = sum(int(f[k]) for k in ("connect", "read", "write", "status", "timeout"))
ms = lambda k: f"{int(f[k]) / 1000:.3f}"
print(f"{rnd},{workload},{target},{n},{us / 1e6:.3f},{n / (us / 1e6):.1f},"
      f"{ms('p50_us')},{ms('p90_us')},{ms('p99_us')},{ms('max_us')},{errors},"
      f"{int(f['cpu_ticks']) * 1e6 / int(clk_tck) / max(n, 1):.1f},{int(f['ctxsw']) / max(n, 1):.2f}")
PY
)
      echo "$row" >>"$CSV"
      bench_log "round $round/$ROUNDS $workload $target: $(cut -d, -f6 <<<"$row") req/s, p99 $(cut -d, -f9 <<<"$row") ms, errors $(cut -d, -f11 <<<"$row")"
    done
  done
done

# --- report ----------------------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
python3 - "$OUT/meta.json" <<PY
import json, sys
json.dump({
    "date_utc": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "nproc": $(nproc),
    "cpu": """${cpu:-unknown}""",
    "kernel": "$(uname -r)",
    "nginx": """$("$NGINX_BIN" -v 2>&1 | tr -d '\n')""",
    "wrk": """$(wrk -v 2>&1 | head -n1 | tr -d '\n')""",
    "rustc": """$(rustc --version 2>/dev/null || echo unknown)""",
    "countersign_commit": "$COMMIT",
    "profile": "${PROFILE:-release}",
    "duration": "$DURATION", "rounds": $ROUNDS, "warmup": "$WARMUP",
    "connections": $CONNECTIONS, "threads": $THREADS,
    "nginx_workers": "$NGINX_WORKERS", "upstream_workers": "$UPSTREAM_WORKERS",
    "baseline_args": """${BASELINE_ARGS:-}""", "baseline_alt_args": """${BASELINE_ALT_ARGS:-}""",
}, open(sys.argv[1], "w"), indent=2)
PY

report_args=(--csv "$CSV" --meta "$OUT/meta.json" --json "$OUT/results.json" --markdown "$OUT/table.md" --svg "$OUT/chart.svg")
[[ $WRITE_DOCS == 1 ]] && report_args+=(--docs "$ROOT/docs/BENCHMARKS.md" --docs-svg "$ROOT/docs/benchmarks.svg")
python3 "$ROOT/bench/report.py" "${report_args[@]}"
bench_log "results in $OUT"
