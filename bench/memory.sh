#!/usr/bin/env bash
# Memory of the in-memory stores at scale (countersign-memfig): RSS growth for 1,000,000
# replay-cache entries and 1,000,000 sessions. Targets (issue 5): <= 150 MiB and <= 300 MiB.
#
# Settings (environment):
#   REPLAY=1000000 SESSIONS=1000000   entries to insert
#   USERS=<SESSIONS>                  distinct users the sessions belong to
#   PROFILE=release | debug           build (MEMFIG=/path overrides)
#   OUT=bench/results/<utc time>      memory.json, memory.md
#   WRITE_DOCS=1                      also rewrite the memory section of docs/BENCHMARKS.md
# Exit status: non-zero when memfig fails or a full-scale figure misses its target.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

REPLAY=${REPLAY:-1000000}
SESSIONS=${SESSIONS:-1000000}
USERS=${USERS:-$SESSIONS}
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
WRITE_DOCS=${WRITE_DOCS:-0}
command -v python3 >/dev/null 2>&1 || bench_apt_install python3
mkdir -p "$OUT"

if [[ -n ${MEMFIG:-} ]]; then
  BIN=$MEMFIG
else
  BIN=$(dirname "$(bench_countersign_bin "$ROOT")")/countersign-memfig
fi
[[ -x $BIN ]] || bench_die "$BIN not found"

status=0
"$BIN" --replay "$REPLAY" --sessions "$SESSIONS" --users "$USERS" --check >"$OUT/memory.json" || status=$?
[[ -s $OUT/memory.json ]] || bench_die "countersign-memfig printed nothing (exit $status)"

python3 - "$OUT/memory.json" "$OUT/memory.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rows = []
for key, name in (("replay_cache", "replay cache (MemoryReplayCache)"), ("sessions", "sessions (MemorySessionStore)")):
    f = r[key]
    ok = f["within_target"]
    verdict = "" if ok is None else (" ✓" if ok else " ✗")
    rows.append(f"| {name} | {f['entries']:,} | {f['rss_growth_mib']:.1f} MiB{verdict} | {f['bytes_per_entry']:.0f} B "
                f"| ≤ {f['target_mib_per_million']:.0f} MiB per 1,000,000 | {f['insert_seconds']:.2f} s |")
text = ("| store | entries | RSS growth | per entry | target | insert time |\n|---|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\nSessions belong to {r['sessions']['distinct_users']:,} distinct users (the per-user index is part of the figure); "
          f"replay entries are random 22-character nonces, all live. Process baseline {r['rss_baseline_mib']:.1f} MiB, "
          f"peak {r['rss_peak_mib']:.1f} MiB (VmHWM: includes transient hash-table growth).\n")
open(sys.argv[2], "w").write(text)
print(text)
PY
if [[ $WRITE_DOCS == 1 ]]; then
  python3 "$ROOT/bench/docs_section.py" "$ROOT/docs/BENCHMARKS.md" memory <"$OUT/memory.md"
fi
exit "$status"
