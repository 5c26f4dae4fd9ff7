#!/usr/bin/env python3
"""Checks scrapes of countersign's /metrics the way a Prometheus scraper reads them.

The text is parsed with the official Python client's parser
(`prometheus_client.parser.text_string_to_metric_families`, pinned in
observability-requirements.txt), and its structure is checked line by line against the text
exposition format 0.0.4 and the Prometheus naming conventions:

  - every line is `# HELP`, `# TYPE` or a sample; HELP and TYPE at most once per family, TYPE
    before the family's samples, a family's samples together (one block);
  - metric and label names are valid, metric names carry the `countersign_` prefix, a counter's
    name ends in `_total`, a histogram's samples are `_bucket`, `_sum` and `_count`;
  - no series twice (name and label set);
  - each histogram: buckets in increasing `le` order with non-decreasing counts, the last one
    `le="+Inf"` equal to `_count`, `_sum` present;
  - values are finite and not negative;
  - per route, the requests counted by status add up to that route's latency histogram count,
    and every route in one of the two families is in the other (a request missing from one of
    the two is a request an operator cannot see);
  - `--route LABEL` (repeatable): a `countersign_requests_total` series carries exactly this
    route label after unescaping (an escaping mistake shows as a different value);
  - `--series N`: the scrape has at most N series (the cardinality bound).

Usage: check_metrics.py [--route LABEL]... [--series N] FILE...
Prints one JSON object per file (families and series counted) and exits 1 on the first
problem, naming the file and the line.
"""

import argparse
import json
import math
import re
import sys

from prometheus_client.parser import text_string_to_metric_families

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class Problem(Exception):
    pass


def family_of(sample_name, types):
    """The family a sample belongs to: its own name, or a histogram's name without suffix."""
    if sample_name in types:
        return sample_name
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample_name[: -len(suffix)] if sample_name.endswith(suffix) else None
        if base and types.get(base) == "histogram":
            return base
    return None


def check_lines(text):
    """Line-level rules of the format; returns {family: type}."""
    if not text.endswith("\n"):
        raise Problem("the text does not end with a line feed")
    helps, types, done, current = set(), {}, set(), None
    for number, line in enumerate(text.split("\n")[:-1], start=1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[0] != "#" or parts[1] not in ("HELP", "TYPE"):
                raise Problem(f"{where}: a comment that is neither HELP nor TYPE")
            name = parts[2]
            if not METRIC_NAME.match(name):
                raise Problem(f"{where}: invalid metric name")
            if name in done:
                raise Problem(f"{where}: {name} again after its samples ended")
            if parts[1] == "HELP":
                if name in helps:
                    raise Problem(f"{where}: second HELP for {name}")
                helps.add(name)
            else:
                if name in types:
                    raise Problem(f"{where}: second TYPE for {name}")
                if len(parts) != 4 or parts[3] not in TYPES:
                    raise Problem(f"{where}: unknown type")
                types[name] = parts[3]
            if current is not None and current != name:
                done.add(current)
            current = name
            continue
        if not line:
            raise Problem(f"{where}: empty line")
        sample_name = re.split(r"[{ ]", line, maxsplit=1)[0]
        family = family_of(sample_name, types)
        if family is None:
            raise Problem(f"{where}: sample of a family without a TYPE line before it")
        if family in done:
            raise Problem(f"{where}: {family}'s samples are not in one block")
        if current is not None and current != family:
            done.add(current)
        current = family
    for name, kind in types.items():
        if not name.startswith("countersign_"):
            raise Problem(f"{name}: no countersign_ prefix")
        if kind == "counter" and not name.endswith("_total"):
            raise Problem(f"counter {name} does not end in _total")
        if kind != "counter" and name.endswith("_total"):
            raise Problem(f"{kind} {name} ends in _total (reserved for counters)")
    return types


def check_families(text, types):
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    if len(names) != len(set(names)):
        raise Problem(f"a family parsed twice: {names}")
    seen = set()
    histograms = {}
    requests_by_route = {}
    routes = set()
    series = 0
    for family in families:
        if family.type not in TYPES:
            raise Problem(f"{family.name}: parsed as type {family.type}")
        for sample in family.samples:
            series += 1
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key in seen:
                raise Problem(f"series twice: {key}")
            seen.add(key)
            for label in sample.labels:
                if not LABEL_NAME.match(label) or label.startswith("__"):
                    raise Problem(f"{sample.name}: invalid label name {label!r}")
            if math.isnan(sample.value) or math.isinf(sample.value) or sample.value < 0:
                raise Problem(f"{key}: value {sample.value}")
            if family.type == "counter" and not sample.name.endswith("_total"):
                raise Problem(f"counter sample {sample.name} does not end in _total")
            if family.type == "histogram":
                group = histograms.setdefault(
                    (family.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))),
                    {"buckets": [], "sum": None, "count": None},
                )
                if sample.name == family.name + "_bucket":
                    group["buckets"].append((sample.labels["le"], sample.value))
                elif sample.name == family.name + "_sum":
                    group["sum"] = sample.value
                elif sample.name == family.name + "_count":
                    group["count"] = sample.value
                else:
                    raise Problem(f"histogram sample {sample.name}")
            if sample.name == "countersign_requests_total":
                route = sample.labels.get("route")
                requests_by_route[route] = requests_by_route.get(route, 0.0) + sample.value
                routes.add(route)
    if "countersign_request_duration_seconds" not in types:
        raise Problem("no countersign_request_duration_seconds histogram")
    for (name, labels), group in histograms.items():
        buckets = group["buckets"]
        if not buckets or buckets[-1][0] != "+Inf":
            raise Problem(f"{name}{labels}: the last bucket is not +Inf: {buckets}")
        bounds = [float(le) for le, _ in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise Problem(f"{name}{labels}: buckets not in increasing le order: {buckets}")
        counts = [value for _, value in buckets]
        if counts != sorted(counts):
            raise Problem(f"{name}{labels}: bucket counts not cumulative: {buckets}")
        if group["sum"] is None or group["count"] is None:
            raise Problem(f"{name}{labels}: _sum or _count missing")
        if counts[-1] != group["count"]:
            raise Problem(f"{name}{labels}: +Inf {counts[-1]} != _count {group['count']}")
    timed = {
        dict(labels).get("route"): group["count"]
        for (name, labels), group in histograms.items()
        if name == "countersign_request_duration_seconds"
    }
    if None in timed:
        raise Problem("a countersign_request_duration_seconds series without a route label")
    for route in set(timed) | set(requests_by_route):
        counted, latency = requests_by_route.get(route, 0.0), timed.get(route, 0.0)
        if counted != latency:
            raise Problem(
                f"route {route!r}: countersign_requests_total adds up to {counted}, "
                f"the latency histogram counts {latency} requests"
            )
    return {"families": len(families), "series": series, "routes": sorted(r for r in routes if r)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--route", action="append", default=[])
    parser.add_argument("--series", type=int)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    for path in args.files:
        # newline="": as a scraper reads the bytes; universal newlines would split a label
        # value holding a raw carriage return (valid in the format) into two lines.
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        try:
            types = check_lines(text)
            summary = check_families(text, types)
            for route in args.route:
                if route not in summary["routes"]:
                    raise Problem(f"no requests series with route {route!r}: {summary['routes']}")
            if args.series is not None and summary["series"] > args.series:
                raise Problem(f"{summary['series']} series, more than {args.series}")
        except Problem as problem:
            print(f"{path}: {problem}", file=sys.stderr)
            return 1
        except Exception as error:  # the parser's own refusal
            print(f"{path}: prometheus_client refused it: {error!r}", file=sys.stderr)
            return 1
        print(json.dumps({"file": path, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
