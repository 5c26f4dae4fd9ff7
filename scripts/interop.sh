#!/usr/bin/env bash
# Interoperability with an independent RFC 9421 implementation: the PyPI package
# `http-message-signatures` (pinned in interop/requirements.txt) verifies what
# `countersign sign` writes, and signs requests that `countersign verify` must accept.
# Creates a venv under target/interop-venv, builds the binary, runs interop/interop_test.py.
# Prints `N passed, M failed`; exits non-zero on any failure.
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
