#!/usr/bin/env bash
# A verify-only backend as its developer builds one: a separate crate that depends on
# countersign with `default-features = false`, whose program is examples/hyper_verify.rs (the
# VerifyLayer on a plain hyper 1 server). The in-repo builds (`cargo build
# --no-default-features`) cannot show two things this does:
#   1. what `default-features = false` pulls into someone else's dependency graph: nothing of
#      the proxy's (clap, toml, cookie, redis, argon2, rustls, tokio, hyper, ...) may come in
#      through countersign;
#   2. that such a crate builds and verifies: the server runs on loopback and must answer a
#      request signed by `countersign sign` with the user, the same request again with 401
#      `replayed`, and an unsigned one with 401 `missing_signature`.
#
# Needs the proxy binary (`countersign sign`) already built in the target directory: run after
# `cargo test --all-features` (scripts/test.sh does), or set COUNTERSIGN=/path/to/countersign.
# Exit status non-zero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
COUNTERSIGN=${COUNTERSIGN:-$TARGET/debug/countersign}
[[ -x $COUNTERSIGN ]] || { echo "consumer-check: $COUNTERSIGN not built (cargo build --bin countersign)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/countersign-consumer.XXXXXX)
SERVER_PID=
# The server is stopped by SIGTERM, so its status (143) is expected: it must not become this
# script's (under `set -e` a failing last command in the EXIT trap would).
cleanup() {
  if [[ -n $SERVER_PID ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "consumer-check: $*" >&2; exit 1; }

mkdir -p "$WORK/crate"
# The example's own imports, and nothing else. The repository's lock file pins the versions
# CI tests with (cargo keeps every locked version still in the graph).
cat >"$WORK/crate/Cargo.toml" <<EOF
[package]
name = "verify-only-backend"
version = "0.0.0"
edition = "2021"
publish = false

[[bin]]
name = "verify-only-backend"
path = "$ROOT/examples/hyper_verify.rs"

[dependencies]
countersign = { path = "$ROOT", default-features = false }
base64 = "0.22"
bytes = "1"
http = "1"
http-body-util = "0.1"
hyper-util = { version = "0.1", features = ["tokio", "server", "server-auto", "service", "http1", "http2"] }
tokio = { version = "1", features = ["rt-multi-thread", "macros", "net"] }
tower = { version = "0.5", features = ["util"] }

[workspace]
EOF
cp "$ROOT/Cargo.lock" "$WORK/crate/Cargo.lock"

# Its own target directory: the package's features differ from the repository's builds.
export CARGO_TARGET_DIR=$TARGET/consumer-check
echo "consumer-check: building a crate with countersign = { default-features = false }"
(cd "$WORK/crate" && cargo build --quiet) || fail "the verify-only crate does not build"

# 1. What countersign brings into the crate's graph (normal dependencies only).
(cd "$WORK/crate" && cargo tree --quiet -e normal -p countersign --prefix none) \
  | sed 's/ (.*//' | awk '{print $1}' | sort -u >"$WORK/countersign-deps"
[[ -s $WORK/countersign-deps ]] || fail "cargo tree listed nothing for countersign"
leaked=$(grep -x -E 'clap|toml|serde|serde_json|cookie|redis|argon2|rustls|tokio-rustls|hyper-rustls|rustls-pemfile|tokio|hyper|hyper-util|tokio-tungstenite|tungstenite|tikv-jemallocator|axum|tonic|icu_normalizer|ppp|rustix' \
  "$WORK/countersign-deps" || true)
[[ -z $leaked ]] || fail "countersign with default-features = false brings in: $(echo "$leaked" | tr '\n' ' ')"
echo "consumer-check: countersign's dependencies there: $(wc -l <"$WORK/countersign-deps") crates, none of the proxy's"

# 2. The crate's server answers signed requests.
SECRET=$(head -c 32 /dev/urandom | base64 -w0)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
COUNTERSIGN_SECRET=$SECRET LISTEN=127.0.0.1:$PORT "$TARGET/consumer-check/debug/verify-only-backend" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited: $(cat "$WORK/server.log")"
  sleep 0.1
done

printf 'active = "k1"\n[[keys]]\nid = "k1"\nsecret_env = "COUNTERSIGN_SECRET"\n' >"$WORK/keys.toml"
chmod 600 "$WORK/keys.toml"
printf 'GET /whoami HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$PORT" >"$WORK/request"
COUNTERSIGN_SECRET=$SECRET "$COUNTERSIGN" sign --keyring "$WORK/keys.toml" --user 'alice' "$WORK/request" \
  >"$WORK/signed" || fail "countersign sign failed"

# One request over its own connection; prints the answer (status line, headers, body).
send() { python3 - "$PORT" "$1" <<'PY'
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
    s.sendall(open(sys.argv[2], "rb").read())
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
sys.stdout.write(answer.decode("utf-8", "replace"))
PY
}
expect() { # name answer-file status body-substring
  head -n1 "$2" | grep -q " $3 " || fail "$1: expected status $3, got: $(cat "$2")"
  grep -q -- "$4" "$2" || fail "$1: expected '$4' in: $(cat "$2")"
  echo "consumer-check: $1: $3, $4"
}
send "$WORK/signed" >"$WORK/first"
expect "signed request" "$WORK/first" 200 "hello, alice"
send "$WORK/signed" >"$WORK/again"
expect "the same request again" "$WORK/again" 401 '"error":"replayed"'
send "$WORK/request" >"$WORK/unsigned"
expect "unsigned request" "$WORK/unsigned" 401 '"error":"missing_signature"'
echo "consumer-check: passed"
