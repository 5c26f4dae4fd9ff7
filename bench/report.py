#!/usr/bin/env python3
"""Summarises bench/run.sh measurements: medians over rounds, ratios to nginx, a Markdown
table, a JSON file and an SVG chart (standard library only, no network, no matplotlib).

Exit status 1 when any measurement had failed requests (status, socket or timeout errors):
a figure for error responses is not a benchmark figure.
"""
import argparse
import csv
import json
import os
import statistics
import sys
from html import escape

WORKLOAD_NAMES = {"get": "GET", "post1k": "POST 1 KiB", "post64k": "POST 64 KiB"}
TARGET_NAMES = {
    "direct": "upstream direct",
    "nginx": "nginx proxy_pass",
    "hyper-baseline": "plain hyper proxy (no session, no signing)",
    "hyper-baseline-alt": "plain hyper proxy (BASELINE_ALT variant)",
    "countersign": "countersign",
    "countersign-redis": "countersign (Redis store)",
    "countersign-alt": "countersign (COUNTERSIGN_ALT build)",
}
COLOURS = {
    "direct": "#9aa5b1",
    "nginx": "#2f7d32",
    "hyper-baseline": "#c0392b",
    "hyper-baseline-alt": "#f1948a",
    "countersign": "#1f5fbf",
    "countersign-redis": "#8e44ad",
    "countersign-alt": "#e67e22",
}


def load(csv_path):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{csv_path}: no measurements")
    return rows


def summarise(rows):
    """Median over rounds of each (workload, target); ratios to nginx in the same run."""
    order_w, order_t, groups = [], [], {}
    for r in rows:
        w, t = r["workload"], r["target"]
        if w not in order_w:
            order_w.append(w)
        if t not in order_t:
            order_t.append(t)
        groups.setdefault((w, t), []).append(r)
    summary = []
    for w in order_w:
        base = groups.get((w, "nginx"))
        base_med = None
        if base:
            base_med = {k: statistics.median(float(r[k]) for r in base) for k in ("rps", "p50_ms", "p99_ms")}
        for t in order_t:
            g = groups.get((w, t))
            if not g:
                continue
            med = {k: statistics.median(float(r[k]) for r in g) for k in ("rps", "p50_ms", "p99_ms")}
            entry = {
                "workload": w,
                "target": t,
                "rounds": len(g),
                "rps": med["rps"],
                "rps_min": min(float(r["rps"]) for r in g),
                "rps_max": max(float(r["rps"]) for r in g),
                "p50_ms": med["p50_ms"],
                "p99_ms": med["p99_ms"],
                "errors": sum(int(r["errors"]) for r in g),
                # CPU of the server measured (the proxy; for "direct", the upstream itself).
                "server_cpu_us_per_req": statistics.median(float(r.get("server_cpu_us_per_req") or 0) for r in g),
                "server_ctxsw_per_req": statistics.median(float(r.get("server_ctxsw_per_req") or 0) for r in g),
            }
            if base_med:
                entry["rps_ratio_to_nginx"] = med["rps"] / base_med["rps"] if base_med["rps"] else None
                entry["p50_ratio_to_nginx"] = med["p50_ms"] / base_med["p50_ms"] if base_med["p50_ms"] else None
                entry["p99_ratio_to_nginx"] = med["p99_ms"] / base_med["p99_ms"] if base_med["p99_ms"] else None
            summary.append(entry)
    return order_w, order_t, summary


def ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def markdown(summary, meta):
    lines = [
        "| workload | target | req/s (median) | min–max | p50 ms | p99 ms | req/s ÷ nginx | p50 ÷ nginx | p99 ÷ nginx | server CPU µs/req | ctx switches/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        lines.append(
            "| {w} | {t} | {rps:,.0f} | {lo:,.0f}–{hi:,.0f} | {p50:.2f} | {p99:.2f} | {r1} | {r2} | {r3} | {cpu:.1f} | {cs:.2f} | {err} |".format(
                cpu=e["server_cpu_us_per_req"],
                cs=e["server_ctxsw_per_req"],
                w=WORKLOAD_NAMES.get(e["workload"], e["workload"]),
                t=TARGET_NAMES.get(e["target"], e["target"]),
                rps=e["rps"],
                lo=e["rps_min"],
                hi=e["rps_max"],
                p50=e["p50_ms"],
                p99=e["p99_ms"],
                r1=ratio(e.get("rps_ratio_to_nginx")),
                r2=ratio(e.get("p50_ratio_to_nginx")),
                r3=ratio(e.get("p99_ratio_to_nginx")),
                err=e["errors"],
            )
        )
    settings = (
        f"wrk -t{meta.get('threads')} -c{meta.get('connections')} -d{meta.get('duration')}, "
        f"{meta.get('rounds')} round(s) alternating targets, warm-up {meta.get('warmup')}; "
        f"nginx proxy worker_processes {meta.get('nginx_workers')}, upstream nginx "
        f"{meta.get('upstream_workers')}; countersign build: {meta.get('profile')}"
    )
    machine = (
        f"{meta.get('nproc')} cores ({meta.get('cpu')}), kernel {meta.get('kernel')}; "
        f"{meta.get('nginx')}; {meta.get('wrk')}; {meta.get('rustc')}; "
        f"countersign commit {meta.get('countersign_commit')}; measured {meta.get('date_utc')}"
    )
    note = (
        "Server CPU µs/req and ctx switches/req: user + system CPU time and context switches of "
        "the measured server's processes (all threads; nginx master and workers) during the "
        "measurement, divided by the requests; for \"upstream direct\" that is the upstream "
        "itself, for the proxies the proxy alone (not the upstream behind it)"
    )
    return "\n".join(lines) + f"\n\n{note}.\n\nSettings: {settings}.\n\nMachine and versions: {machine}.\n"


def svg_chart(order_w, order_t, summary):
    """Three panels of grouped bars per workload and target: req/s, p99 latency, server CPU/request."""
    by = {(e["workload"], e["target"]): e for e in summary}
    panel_w, panel_h, top, left, bottom = 400, 260, 40, 70, 50
    width, height = 3 * panel_w + 80, top + panel_h + bottom + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]

    def panel(x0, key, title, fmt):
        vmax = max((by[k][key] for k in by), default=1.0) or 1.0
        inner_w = panel_w - left - 10
        out.append(f'<text x="{x0 + left + inner_w / 2}" y="20" text-anchor="middle" font-weight="bold">{escape(title)}</text>')
        y_axis = top + panel_h
        out.append(f'<line x1="{x0 + left}" y1="{top}" x2="{x0 + left}" y2="{y_axis}" stroke="#333"/>')
        out.append(f'<line x1="{x0 + left}" y1="{y_axis}" x2="{x0 + left + inner_w}" y2="{y_axis}" stroke="#333"/>')
        for i in range(5):
            v = vmax * i / 4
            y = y_axis - panel_h * i / 4
            out.append(f'<line x1="{x0 + left - 4}" y1="{y:.1f}" x2="{x0 + left + inner_w}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 + left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(v))}</text>')
        group_w = inner_w / max(len(order_w), 1)
        bar_w = (group_w - 20) / max(len(order_t), 1)
        for gi, w in enumerate(order_w):
            gx = x0 + left + gi * group_w + 10
            for ti, t in enumerate(order_t):
                e = by.get((w, t))
                if not e:
                    continue
                h = panel_h * e[key] / vmax
                x = gx + ti * bar_w
                out.append(
                    f'<rect x="{x:.1f}" y="{y_axis - h:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                    f'fill="{COLOURS.get(t, "#777")}"><title>{escape(TARGET_NAMES.get(t, t))}: {escape(fmt(e[key]))}</title></rect>'
                )
            out.append(
                f'<text x="{gx + (group_w - 20) / 2:.1f}" y="{y_axis + 18}" text-anchor="middle">{escape(WORKLOAD_NAMES.get(w, w))}</text>'
            )

    panel(0, "rps", "Throughput (req/s, median; higher is better)", lambda v: f"{v:,.0f}")
    panel(panel_w + 40, "p99_ms", "p99 latency (ms, median; lower is better)", lambda v: f"{v:.1f}")
    panel(2 * panel_w + 80, "server_cpu_us_per_req", "Server CPU per request (µs; lower is better)", lambda v: f"{v:.1f}")
    lx = left
    for t in order_t:
        out.append(f'<rect x="{lx}" y="{height - 28}" width="12" height="12" fill="{COLOURS.get(t, "#777")}"/>')
        out.append(f'<text x="{lx + 16}" y="{height - 18}">{escape(TARGET_NAMES.get(t, t))}</text>')
        lx += 30 + 8 * len(TARGET_NAMES.get(t, t))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def update_docs(path, svg_name, table):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import docs_section

    docs_section.replace(path, "run", f"![throughput and p99 latency]({svg_name})\n\n{table}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--svg")
    ap.add_argument("--docs", help="docs/BENCHMARKS.md: rewrite its generated results section")
    ap.add_argument("--docs-svg", help="where the chart for --docs goes (docs/benchmarks.svg)")
    a = ap.parse_args()

    rows = load(a.csv)
    meta = json.load(open(a.meta))
    order_w, order_t, summary = summarise(rows)
    table = markdown(summary, meta)
    svg = svg_chart(order_w, order_t, summary)
    if a.json:
        json.dump({"meta": meta, "summary": summary, "measurements": rows}, open(a.json, "w"), indent=2)
    if a.markdown:
        open(a.markdown, "w").write(table)
    if a.svg:
        open(a.svg, "w").write(svg)
    if a.docs:
        svg_path = a.docs_svg or os.path.join(os.path.dirname(a.docs), "benchmarks.svg")
        open(svg_path, "w").write(svg)
        update_docs(a.docs, os.path.relpath(svg_path, os.path.dirname(a.docs)), table)
    print(table)
    failed = [e for e in summary if e["errors"]]
    for e in failed:
        print(f"error: {e['target']} {e['workload']}: {e['errors']} failed requests", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
