#!/usr/bin/env bash
# The cost of the VerifyLayer: the same small API (countersign-loadgen serve) without and with
# the real VerifyLayer + MemoryReplayCache, loaded by countersign-loadgen with signed requests
# (a fresh nonce each) at equal load, alternating plain / verify / verify / plain ... in one run.
# Target (issue 5): throughput with the layer >= 0.85x without.
#
# Settings (environment):
#   DURATION=10s ROUNDS=3             per measurement; rounds
#   CONNECTIONS=32 LOADGEN_THREADS=1  generator connections and threads
#   SERVER_THREADS=<nproc>            tokio workers of each API server (1 with PIN=1)
#   PIN=0 | 1                         1: every API server pinned to the last CPU and the
#                                     generator to the others (taskset), so the server's
#                                     throughput is its own core's, not the closed loop's on
#                                     shared cores; the table then also gives each server's
#                                     CPU use (near 1.00: the server is the bottleneck)
#   WORKLOADS="get post1k"            get, post1k, post64k
#   PROFILE=release | debug           build of the binaries (LOADGEN=/path overrides;
#                                     LOADGEN_COMMIT=<commit> names its commit in the table)
#   LOADGEN_B=/path LOADGEN_B_COMMIT=<name>
#                                     A/B of two builds in one run: both builds' servers
#                                     (plain and verify each) run side by side and every
#                                     round measures all four, in rotating order, so both
#                                     builds see the same machine (runs minutes apart on this
#                                     shared machine differ by more than the change measured).
#                                     The A build's generator loads all four. Not with
#                                     WRITE_DOCS=1.
#   OUT=bench/results/<utc time>      verify-api.csv, verify-api.md
#   WRITE_DOCS=1                      also rewrite the verify-api section of docs/BENCHMARKS.md
#   SPIN_NS=<ns>                      also a third server, the plain one busy-waiting this long
#                                     per request (`serve --spin-ns`): what a known amount of
#                                     per-request CPU costs in this closed loop, beside what the
#                                     layer costs (its row: "plain + N ns spin"). Not with
#                                     LOADGEN_B or WRITE_DOCS=1.
# Exit status: non-zero when a server or the generator fails or any request failed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-32}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
PIN=${PIN:-0}
if [[ $PIN == 1 ]]; then
  (($(nproc) >= 2)) || bench_die "PIN=1 needs at least 2 CPUs"
  command -v taskset >/dev/null 2>&1 || bench_apt_install util-linux
  SERVER_CPU=$(($(nproc) - 1))
  SERVER_PIN=(taskset -c "$SERVER_CPU")
  LOADGEN_PIN=(taskset -c "0-$((SERVER_CPU - 1))")
  SERVER_THREADS=${SERVER_THREADS:-1}
else
  SERVER_PIN=()
  LOADGEN_PIN=()
  SERVER_THREADS=${SERVER_THREADS:-$(nproc)}
fi
WORKLOADS=${WORKLOADS:-"get post1k"}
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
WRITE_DOCS=${WRITE_DOCS:-0}
SPIN_NS=${SPIN_NS:-0}
[[ $SPIN_NS =~ ^[0-9]+$ ]] || bench_die "SPIN_NS=$SPIN_NS is not a number of nanoseconds"

command -v python3 >/dev/null 2>&1 || bench_apt_install python3
command -v curl >/dev/null 2>&1 || bench_apt_install curl
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-verify-api.XXXXXX)
trap 'bench_cleanup; rm -rf "$WORK"' EXIT

# The commit the measured build comes from (taken before building; "+dirty" when src/ or
# Cargo.toml had uncommitted changes). With LOADGEN, the caller names it (LOADGEN_COMMIT).
if [[ -n ${LOADGEN:-} ]]; then
  COMMIT=${LOADGEN_COMMIT:-"unknown (LOADGEN=$LOADGEN)"}
else
  COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || COMMIT+="+dirty"
fi
if [[ -n ${LOADGEN:-} ]]; then
  BIN=$LOADGEN
  BUILD=$LOADGEN
else
  BUILD=${PROFILE:-release}
  BIN=$(dirname "$(bench_countersign_bin "$ROOT")")/countersign-loadgen
fi
[[ -x $BIN ]] || bench_die "$BIN not found"
BUILDS=(A)
declare -A BUILD_BIN=([A]=$BIN) BUILD_NAME=([A]="$COMMIT")
if [[ -n ${LOADGEN_B:-} ]]; then
  [[ -x $LOADGEN_B ]] || bench_die "LOADGEN_B=$LOADGEN_B not found"
  [[ $WRITE_DOCS == 1 ]] && bench_die "WRITE_DOCS=1 writes one build's figures: not with LOADGEN_B"
  ((SPIN_NS == 0)) || bench_die "SPIN_NS is not for an A/B run (LOADGEN_B)"
  BUILDS=(A B)
  BUILD_BIN[B]=$LOADGEN_B
  BUILD_NAME[B]=${LOADGEN_B_COMMIT:-"LOADGEN_B=$LOADGEN_B"}
fi

printf 'active = "bench1"\nrotation = "off"\n[[keys]]\nid = "bench1"\nsecret = "%s"\n' \
  "$(head -c 32 /dev/urandom | base64 -w0)" >"$WORK/keys.toml"
chmod 600 "$WORK/keys.toml"

((SPIN_NS == 0)) || [[ $WRITE_DOCS != 1 ]] || bench_die "SPIN_NS is a probe: not with WRITE_DOCS=1"
MODES=(plain verify)
((SPIN_NS == 0)) || MODES+=(spin)

# One server per build and mode, keyed "<build><mode>" (Aplain, Averify, Bplain, Bverify;
# Aspin with SPIN_NS).
declare -A PORT SERVER_PID
for build in "${BUILDS[@]}"; do
  for mode in "${MODES[@]}"; do
    key=$build$mode
    serve_args=(--mode "$mode")
    [[ $mode == spin ]] && serve_args=(--mode plain --spin-ns "$SPIN_NS")
    "${SERVER_PIN[@]}" "${BUILD_BIN[$build]}" serve "${serve_args[@]}" --keyring "$WORK/keys.toml" --threads "$SERVER_THREADS" \
      --port-file "$WORK/$key.port" >"$WORK/$key.log" 2>&1 &
    SERVER_PID[$key]=$!
    BENCH_PIDS+=($!)
    for _ in $(seq 100); do [[ -s $WORK/$key.port ]] && break; sleep 0.1; done
    [[ -s $WORK/$key.port ]] || { cat "$WORK/$key.log" >&2; bench_die "$key server did not start"; }
    PORT[$key]=$(cat "$WORK/$key.port")
    bench_wait_port "${PORT[$key]}" "$key server" "$WORK/$key.log"

    # Sanity: a verify server really verifies (an unsigned request is refused), a plain one
    # does not.
    code=$(curl -sS -o "$WORK/body" -w '%{http_code}' "http://127.0.0.1:${PORT[$key]}/api/bench")
    if [[ $mode == verify ]] && { [[ $code != 401 ]] || ! grep -q missing_signature "$WORK/body"; }; then
      bench_die "$key server answered an unsigned request with $code $(cat "$WORK/body")"
    fi
    if [[ $mode != verify && $code != 200 ]]; then bench_die "$key server answered $code"; fi
  done
done

CSV="$OUT/verify-api.csv"
echo "round,workload,mode,requests,seconds,rps,p50_ms,p90_ms,p99_ms,max_ms,errors,server_cpu_us_per_req,build" >"$CSV"
CLK_TCK=$(getconf CLK_TCK)

measure() { # build mode workload
  local build=$1 mode=$2 workload=$3 key=$1$2 args=() json
  case $workload in
    get) ;;
    post1k) args=(--method POST --body-size 1024) ;;
    post64k) args=(--method POST --body-size 65536) ;;
    *) bench_die "unknown workload $workload (known: get post1k post64k)" ;;
  esac
  local before after
  before=$(bench_cpu_sample "${SERVER_PID[$key]}")
  json=$("${LOADGEN_PIN[@]}" "$BIN" load --keyring "$WORK/keys.toml" --url "http://127.0.0.1:${PORT[$key]}/api/bench" \
    --connections "$CONNECTIONS" --duration "$DURATION" --threads "$LOADGEN_THREADS" \
    --user bench --roles bench "${args[@]}") || {
    echo "$json" >&2
    bench_die "loadgen reported failed requests against the $key server ($workload)"
  }
  after=$(bench_cpu_sample "${SERVER_PID[$key]}")
  python3 - "$round" "$workload" "$mode" "$json" "${before% *}" "${after% *}" "$CLK_TCK" "$build" <<'PY' >>"$CSV"
import json, sys
rnd, workload, mode, text, t0, t1, clk, build = sys.argv[1:9]
r = json.loads(text)
cpu = (int(t1) - int(t0)) * 1e6 / int(clk) / max(r["requests"], 1)
print(f"{rnd},{workload},{mode},{r['requests']},{r['seconds']:.3f},{r['rps']:.1f},"
      f"{r['p50_ms']:.3f},{r['p90_ms']:.3f},{r['p99_ms']:.3f},{r['max_ms']:.3f},{r['errors']},{cpu:.2f},{build}")
PY
  bench_log "round $round/$ROUNDS $workload $key: $(tail -n1 "$CSV" | cut -d, -f6) req/s, p99 $(tail -n1 "$CSV" | cut -d, -f9) ms, server CPU $(tail -n1 "$CSV" | cut -d, -f12) µs/req"
}

for ((round = 1; round <= ROUNDS; round++)); do
  for workload in $WORKLOADS; do
    if ((SPIN_NS > 0)); then
      case $((round % 3)) in
        1) order=(Aplain Averify Aspin) ;;
        2) order=(Aspin Averify Aplain) ;;
        0) order=(Averify Aspin Aplain) ;;
      esac
    elif ((${#BUILDS[@]} == 1)); then
      if ((round % 2)); then order=(Aplain Averify); else order=(Averify Aplain); fi
    else
      # Every position in turn for each build and mode.
      case $((round % 4)) in
        1) order=(Aplain Averify Bverify Bplain) ;;
        2) order=(Bplain Bverify Averify Aplain) ;;
        3) order=(Averify Aplain Bplain Bverify) ;;
        0) order=(Bverify Bplain Aplain Averify) ;;
      esac
    fi
    for key in "${order[@]}"; do measure "${key:0:1}" "${key:1}" "$workload"; done
  done
done

python3 - "$CSV" "$OUT/verify-api.md" "$DURATION" "$ROUNDS" "$CONNECTIONS" "$LOADGEN_THREADS" "$SERVER_THREADS" "$BUILD" "$COMMIT" "${BUILD_NAME[B]:-}" "$PIN" "$SPIN_NS" <<'PY'
import csv, statistics, sys
path, out, duration, rounds, conns, lthreads, sthreads, profile, commit, commit_b, pin, spin_ns = sys.argv[1:13]
pinned = pin == "1"
rows = list(csv.DictReader(open(path)))
for r in rows:
    r["cpus"] = float(r["server_cpu_us_per_req"]) * float(r["rps"]) / 1e6
builds = list(dict.fromkeys(r["build"] for r in rows))
build_names = {"A": commit, "B": commit_b}
names = {"get": "GET", "post1k": "POST 1 KiB", "post64k": "POST 64 KiB"}
lines = ["| workload | req/s without layer | req/s with VerifyLayer | ratio (target ≥ 0.85) | p99 ms without | p99 ms with | server CPU µs/req without | with |"
         + (" server CPUs used without | with |" if pinned else ""),
         "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if pinned else "")]
for w in dict.fromkeys(r["workload"] for r in rows):
    for b in builds:
        med = lambda mode, k: statistics.median(float(r[k]) for r in rows if r["workload"] == w and r["mode"] == mode and r["build"] == b)
        ratio = med("verify", "rps") / med("plain", "rps")
        verdict = "✓" if ratio >= 0.85 else "✗"
        # Pinned, the ratio is the servers' own only when both servers are the bottleneck.
        if pinned and min(med("plain", "cpus"), med("verify", "cpus")) < 0.95:
            verdict = "(generator-bound: no verdict)"
        label = names.get(w, w) if len(builds) == 1 else f"{names.get(w, w)}, {b}: {build_names[b]}"
        def row(label, mode, ratio_text):
            # The plain server beside `mode`'s (the layer's, or the spinning one in its place).
            return (f"| {label} | {med('plain', 'rps'):,.0f} | {med(mode, 'rps'):,.0f} | "
                    f"{ratio_text} | {med('plain', 'p99_ms'):.2f} | {med(mode, 'p99_ms'):.2f} | "
                    f"{med('plain', 'server_cpu_us_per_req'):.1f} | {med(mode, 'server_cpu_us_per_req'):.1f} |"
                    + (f" {med('plain', 'cpus'):.2f} | {med(mode, 'cpus'):.2f} |" if pinned else ""))
        lines.append(row(label, "verify", f"{ratio:.2f}× {verdict}"))
        if spin_ns != "0":
            spin_ratio = med("spin", "rps") / med("plain", "rps")
            lines.append(row(f"{label}, plain + {int(spin_ns):,} ns spin instead of the layer", "spin", f"{spin_ratio:.2f}×"))
lines.append("")
ab = "" if len(builds) == 1 else ", the two builds' servers side by side, every round measuring all four in rotating order"
lines.append(f"Medians of {rounds} round(s), alternating{ab}; countersign-loadgen --connections {conns} "
             f"--duration {duration} --threads {lthreads}, signed requests with a fresh nonce and a user "
             f"identity; each API server {sthreads} tokio worker(s); build: {profile}, commit {commit}. "
             + ("Each server pinned to its own CPU and the generator to the others (PIN=1): the ratio is the "
                "servers' own only when both use ~1.00 CPUs (each is then the bottleneck); below 0.95 the "
                "generator limits and the ratio is no verdict; "
                if pinned else
                "The generator shares the machine's cores with the server, so throughput is that of the whole "
                "closed loop; ")
             + "server CPU µs/req is the server process's own CPU time per request.")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
if [[ $WRITE_DOCS == 1 ]]; then
  python3 "$ROOT/bench/docs_section.py" "$ROOT/docs/BENCHMARKS.md" verify-api <"$OUT/verify-api.md"
fi
bench_log "results in $OUT"
