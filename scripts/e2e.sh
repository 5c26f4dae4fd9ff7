#!/usr/bin/env bash
# Browser-side tests: the JS client's unit tests (node --test), then the real-browser end-to-end
# suite (tests/e2e: headless Debian Chromium driven by playwright-core) against
# `countersign dev` serving the React example build.
#
# Installs what is missing (Debian's chromium, the npm packages from the lock files), builds the
# React example and the binary, starts `countersign dev` on free loopback ports, runs the tests,
# stops the server, and exits non-zero if anything failed. Screenshots and the server log go to
# artifacts/e2e/.
#
# Environment:
#   COUNTERSIGN_BIN   use this binary instead of building target/debug/countersign
#   CHROMIUM_PATH     browser executable (default /usr/bin/chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ARTIFACTS="$ROOT/artifacts/e2e"

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'e2e.sh: %s\n' "$*" >&2
  exit 1
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

# npm ci when node_modules is missing or older than the lock file.
npm_deps() {
  local dir=$1
  if [[ ! -d $dir/node_modules || $dir/package-lock.json -nt $dir/node_modules ]]; then
    step "npm ci ($dir)"
    (cd "$dir" && npm ci --no-audit --no-fund)
    touch "$dir/node_modules"
  fi
}

# --- tools ------------------------------------------------------------------------------------
command -v node >/dev/null || die "node (>= 20.19) is required: install Node.js 20.19 or newer, or run \`source scripts/ensure-node.sh\` first"
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' ||
  die "node $(node --version) is too old: Vite 7 needs >= 20.19 (\`source scripts/ensure-node.sh\` installs one)"
if [[ -z ${CHROMIUM_PATH:-} ]]; then
  apt_install chromium chromium-driver
  export CHROMIUM_PATH=/usr/bin/chromium
fi
[[ -x $CHROMIUM_PATH ]] || die "no browser at CHROMIUM_PATH=$CHROMIUM_PATH"

# --- JS client unit tests ---------------------------------------------------------------------
# The dev dependencies first: one unit test type-checks with the lock file's typescript.
npm_deps clients/js
step "JS client unit tests (clients/js: node --test)"
(cd clients/js && npm test)
step "JS client type definitions (clients/js: tsc --noEmit)"
(cd clients/js && npm run check:types)

# --- builds -----------------------------------------------------------------------------------
npm_deps examples/react-spa
npm_deps tests/e2e

step "build the React example (examples/react-spa/dist)"
(cd examples/react-spa && npm run build)

if [[ -z ${COUNTERSIGN_BIN:-} ]]; then
  step "cargo build --all-features --bin countersign"
  cargo build --all-features --bin countersign
  COUNTERSIGN_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/countersign"
fi
export COUNTERSIGN_BIN
[[ -x $COUNTERSIGN_BIN ]] || die "no binary at $COUNTERSIGN_BIN"

# --- start countersign dev --------------------------------------------------------------------
# free_ports N: N loopback ports free now, all different (scripts/free-ports.js).
free_ports() {
  node "$ROOT/scripts/free-ports.js" "$1"
}
PASSWORD="e2e-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
mkdir -p "$ARTIFACTS"
LOG="$ARTIFACTS/countersign-dev.log"

# A port found free can be taken before the server binds it (another test, another job on the
# machine), and two lookups can name the same one: the server then exits at once with "Address
# already in use". Picked again, up to three times; any other early exit is reported below.
start_server() {
  read -r PORT ADMIN_PORT < <(free_ports 2)
  step "start countersign dev on 127.0.0.1:$PORT (admin 127.0.0.1:$ADMIN_PORT; log: $LOG)"
  "$COUNTERSIGN_BIN" dev \
    --listen "127.0.0.1:$PORT" \
    --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --password "$PASSWORD" \
    --static-dir "$ROOT/examples/react-spa/dist" \
    >"$LOG" 2>&1 &
  SERVER_PID=$!
}
for attempt in 1 2 3; do
  start_server
  sleep 0.3
  if kill -0 "$SERVER_PID" 2>/dev/null || ! grep -q "Address already in use" "$LOG"; then
    break
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  echo "e2e: port taken before countersign dev bound it (attempt $attempt); picking others" >&2
done

stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  wait "$SERVER_PID" 2>/dev/null || true
}
trap stop_server EXIT

ready=0
for _ in $(seq 1 150); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    cat "$LOG" >&2
    die "countersign dev exited during startup (log above)"
  fi
  # Any HTTP answer (401 without a session) means the proxy is up.
  if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/auth/session"; then
    ready=1
    break
  fi
  sleep 0.2
done
((ready)) || {
  cat "$LOG" >&2
  die "countersign dev did not answer on 127.0.0.1:$PORT within 30 s"
}

# --- browser tests ----------------------------------------------------------------------------
step "real-browser tests (tests/e2e: node --test, headless Chromium)"
status=0
(
  cd tests/e2e
  COUNTERSIGN_URL="http://127.0.0.1:$PORT" \
    COUNTERSIGN_ADMIN_URL="http://127.0.0.1:$ADMIN_PORT" \
    COUNTERSIGN_PASSWORD="$PASSWORD" \
    E2E_ARTIFACTS_DIR="$ARTIFACTS" \
    npm test
) || status=$?

stop_server
trap - EXIT
if ((status != 0)); then
  echo "--- countersign dev log (tail) ---" >&2
  tail -n 60 "$LOG" >&2
  die "browser tests failed (screenshots and log in $ARTIFACTS)"
fi
step "browser tests passed; screenshots in $ARTIFACTS"
