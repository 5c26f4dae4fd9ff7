#!/usr/bin/env python3
"""Replaces one generated section of a Markdown file, between the lines
`<!-- bench:NAME begin -->` and `<!-- bench:NAME end -->`, with standard input (or a string
given to `replace`). Used by the bench scripts with WRITE_DOCS=1, so hand-written notes around
the sections survive a re-run.

usage: docs_section.py FILE NAME < content
"""
import sys


def markers(name):
    return f"<!-- bench:{name} begin (generated, do not edit by hand) -->", f"<!-- bench:{name} end -->"


def replace(path, name, content):
    begin, end = markers(name)
    try:
        text = open(path).read()
    except FileNotFoundError:
        sys.exit(f"{path}: not found")
    if begin not in text or end not in text:
        sys.exit(f"{path}: section {name!r} is missing; expected the lines {begin!r} and {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{content.rstrip()}\n{end}{tail}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    replace(sys.argv[1], sys.argv[2], sys.stdin.read())
