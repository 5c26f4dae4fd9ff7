#!/usr/bin/env bash
# Peak memory growth of the countersign proxy while it streams a large response: an upstream
# nginx serves a sparse file (1 GiB by default) from a temp dir; a logged-in curl downloads it
# through `countersign run`; the proxy's VmHWM (peak RSS, /proc/PID/status) after the download
# is compared with its VmRSS before. Target (issue 5): growth <= 32 MiB for 1 GiB.
#
# Settings (environment):
#   STREAM_SIZE=1G                    size of the file (truncate -s syntax)
#   PROFILE=release | debug           countersign build (COUNTERSIGN=/path overrides)
#   OUT=bench/results/<utc time>      stream.md
#   WRITE_DOCS=1                      also rewrite the stream section of docs/BENCHMARKS.md
# Exit status: non-zero when a server fails, the download is short, or (for 1 GiB or more)
# the growth exceeds the target.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

STREAM_SIZE=${STREAM_SIZE:-1G}
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
WRITE_DOCS=${WRITE_DOCS:-0}
TARGET_MIB=32

bench_require_tools
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-stream.XXXXXX)
trap 'bench_cleanup; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/files" "$WORK/cs"
# Sparse: no disk space used, and nginx still sends every byte (zeros) with sendfile.
truncate -s "$STREAM_SIZE" "$WORK/files/big.bin"
SIZE_BYTES=$(stat -c %s "$WORK/files/big.bin")

UPSTREAM_PORT=$(bench_free_port)
bench_render "$ROOT/bench/nginx/upstream.conf.in" "$WORK/upstream.conf" \
  "USER_LINE=$(bench_nginx_user_line)" "WORKERS=1" "DIR=$WORK" "PORT=$UPSTREAM_PORT"
bench_start_nginx "$WORK/upstream.conf" "$UPSTREAM_PORT" "upstream nginx" "$WORK/upstream.log"

CS_BIN=$(bench_countersign_bin "$ROOT")
CS_PORT=$(bench_free_port)
bench_countersign_config "$WORK/cs" "$CS_PORT" "$(bench_free_port)" "http://127.0.0.1:$UPSTREAM_PORT"
bench_start_countersign "$CS_BIN" "$WORK/cs" "$CS_PORT" "$WORK/cs/countersign.log"
bench_login "$CS_PORT"

# Warm up the request path (connection pool, buffers, lazy statics) before the baseline.
for _ in $(seq 20); do
  curl -sS -o /dev/null -H "Cookie: $BENCH_COOKIE" "http://127.0.0.1:$CS_PORT/api/bench"
done
hwm_before=$(bench_proc_kib "$COUNTERSIGN_PID" VmHWM)
# The login's argon2id hash (32 MiB of memory cost) already set the peak: reset VmHWM to the
# current RSS (Linux >= 4.0, "5" in clear_refs), so the peak below is the download's. Where that
# is not permitted, a 10 ms sampler of VmRSS gives the peak instead.
hwm_reset=1
echo 5 >"/proc/$COUNTERSIGN_PID/clear_refs" 2>/dev/null || hwm_reset=0
rss_before=$(bench_proc_kib "$COUNTERSIGN_PID" VmRSS)
(
  peak=0
  while kill -0 "$COUNTERSIGN_PID" 2>/dev/null; do
    rss=$(bench_proc_kib "$COUNTERSIGN_PID" VmRSS) || break
    ((rss > peak)) && peak=$rss && echo "$peak" >"$WORK/sampled-peak"
    sleep 0.01
  done
) &
SAMPLER_PID=$!
BENCH_PIDS+=("$SAMPLER_PID")

started=$(date +%s.%N)
read -r code downloaded < <(curl -sS -o /dev/null -w '%{http_code} %{size_download}\n' \
  -H "Cookie: $BENCH_COOKIE" "http://127.0.0.1:$CS_PORT/api/big/big.bin")
finished=$(date +%s.%N)
hwm_after=$(bench_proc_kib "$COUNTERSIGN_PID" VmHWM)
rss_after=$(bench_proc_kib "$COUNTERSIGN_PID" VmRSS)
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
sampled_peak=$(cat "$WORK/sampled-peak" 2>/dev/null || echo "$rss_before")
((hwm_reset)) || hwm_after=$sampled_peak
# Linux raises VmHWM lazily (when RSS is about to shrink), so it can lag VmRSS: take the
# largest of the three readings.
for v in "$sampled_peak" "$rss_after"; do ((v > hwm_after)) && hwm_after=$v; done

[[ $code == 200 ]] || bench_die "download answered $code"
[[ $downloaded == "$SIZE_BYTES" ]] || bench_die "downloaded $downloaded bytes of $SIZE_BYTES"

status=0
python3 - "$OUT/stream.md" "$SIZE_BYTES" "$rss_before" "$hwm_before" "$hwm_after" "$rss_after" "$started" "$finished" "$TARGET_MIB" "${PROFILE:-release}" "$sampled_peak" "$hwm_reset" <<'PY' || status=$?
import sys
out, size, rss0, hwm0, hwm1, rss1, t0, t1, target, profile, sampled, reset = sys.argv[1:13]
size, rss0, hwm0, hwm1, rss1, target = int(size), int(rss0), int(hwm0), int(hwm1), int(rss1), int(target)
growth = (hwm1 - rss0) / 1024
secs = float(t1) - float(t0)
full = size >= 1 << 30
verdict = ("✓" if growth <= target else "✗") if full else "(target applies to 1 GiB)"
text = (
    "| streamed | proxy RSS before | peak RSS during | peak growth | target | throughput |\n"
    "|---:|---:|---:|---:|---:|---:|\n"
    f"| {size / (1 << 20):,.0f} MiB | {rss0 / 1024:.1f} MiB | {hwm1 / 1024:.1f} MiB | {growth:.1f} MiB {verdict} "
    f"| ≤ {target} MiB | {size / (1 << 20) / secs:,.0f} MiB/s |\n\n"
    f"curl through `countersign run` (logged in, signed upstream request) from nginx serving a sparse file; "
    f"peak before the download (login's argon2id included) {hwm0 / 1024:.1f} MiB; "
    + ("VmHWM reset just before the download (clear_refs), " if reset == "1" else "VmHWM could not be reset: peak from a 10 ms VmRSS sampler, ")
    + f"sampled VmRSS peak {int(sampled) / 1024:.1f} MiB, RSS after {rss1 / 1024:.1f} MiB; build: {profile}.\n"
)
open(out, "w").write(text)
print(text)
sys.exit(1 if full and growth > target else 0)
PY
if [[ $WRITE_DOCS == 1 ]]; then
  python3 "$ROOT/bench/docs_section.py" "$ROOT/docs/BENCHMARKS.md" stream <"$OUT/stream.md"
fi
bench_log "results in $OUT"
exit "$status"
