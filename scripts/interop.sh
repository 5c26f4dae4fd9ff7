#!/usr/bin/env bash
# Interoperability with an independent RFC 9421 implementation: the PyPI package
# `http-message-signatures` (pinned in interop/requirements.txt) verifies what
# `countersign sign` writes, and signs requests that `countersign verify` must accept.
# Creates a venv under target/interop-venv, builds the binary, runs interop/interop_test.py.
# Prints `N passed, M failed`; exits non-zero on any failure. Then the same against a second
# implementation in JavaScript (interop/node, npm `http-message-signatures`; needs node >= 20
# and npm): prints `node interop: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/interop-venv
requirements=interop/requirements.txt

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

install_python() {
  echo "==> installing python3 and python3-venv"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
}

# A fresh Debian machine may lack python3, or ship it without ensurepip (then `python3 -m venv`
# fails until python3-venv is installed).
command -v python3 >/dev/null 2>&1 || install_python

# Re-create the venv when missing, broken, or installed from other pins.
stamp="$venv/.requirements"
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$requirements" "$stamp"; then
  echo "==> creating $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv"; then
    rm -rf "$venv"
    install_python
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi

echo "==> cargo build --all-features --bin countersign"
cargo build --all-features --bin countersign

target_dir=$(cargo metadata --format-version 1 --no-deps |
  "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

echo "==> interop/interop_test.py"
"$venv/bin/python" interop/interop_test.py --bin "$target_dir/debug/countersign" --workdir "$workdir"

# A second implementation written from docs/PROTOCOL.md alone (stdlib Python): both directions
# byte for byte, every reason code, the keyring loader, and demo-api behind the VerifyLayer.
# It keeps the protocol document honest: a behaviour the document does not describe fails here.
echo "==> interop/spec_from_doc.py"
"$venv/bin/python" interop/spec_from_doc.py --countersign "$target_dir/debug/countersign"

# A second independent implementation, in JavaScript: the npm package `http-message-signatures`
# (dhensby; pinned in interop/node/package.json and package-lock.json), through node's built-in
# test runner: countersign sign -> the library verifies (Content-Digest recomputed in JS), the
# library signs -> `countersign verify` and `countersign demo-api` (the VerifyLayer, replay cache)
# accept or give the expected reason code, and the library's divergences with their workaround
# (interop/README.md). An npm failure, a failing, skipped or cancelled test all fail the script.
echo "==> interop/node (http-message-signatures on node)"
command -v node >/dev/null 2>&1 || { echo "interop.sh: node (>= 20) is required for interop/node" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "interop.sh: npm is required for interop/node" >&2; exit 1; }
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  { echo "interop.sh: node $(node --version) is too old for interop/node: need >= 20" >&2; exit 1; }
node_dir=interop/node
if [[ ! -d $node_dir/node_modules || $node_dir/package-lock.json -nt $node_dir/node_modules ]]; then
  echo "==> npm ci ($node_dir)"
  (cd "$node_dir" && npm ci --no-audit --no-fund)
  touch "$node_dir/node_modules"
fi
node_started=$SECONDS
node_rc=0
COUNTERSIGN_BIN="$target_dir/debug/countersign" INTEROP_WORKDIR="$workdir" \
  node --test --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination="$workdir/node.tap" \
  "$node_dir/interop.test.mjs" || node_rc=$?
count() { sed -n "s/^# $1 \([0-9][0-9]*\)$/\1/p" "$workdir/node.tap" | tail -n 1; }
node_pass=$(count pass) node_fail=$(count fail)
node_skip=$(count skipped) node_todo=$(count todo) node_cancelled=$(count cancelled)
echo "node interop: ${node_pass:-0} passed, ${node_fail:-?} failed" \
  "(skipped ${node_skip:-?}, todo ${node_todo:-?}, cancelled ${node_cancelled:-?}; $((SECONDS - node_started)) s)"
if ((node_rc != 0)) || [[ ${node_pass:-0} == 0 || ${node_fail:-x} != 0 || ${node_skip:-x} != 0 ||
  ${node_todo:-x} != 0 || ${node_cancelled:-x} != 0 ]]; then
  echo "interop.sh: interop/node failed (node exit $node_rc)" >&2
  exit 1
fi
