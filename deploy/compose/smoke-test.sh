#!/usr/bin/env bash
# Runs the docker-compose topology without Docker (there is no engine on the development
# machine): redis-server, `countersign demo-api` with deploy/compose/keys.toml, two
# `countersign run` replicas with deploy/compose/proxy.toml, and haproxy with
# deploy/compose/haproxy.cfg, all on loopback, with the ports, paths and Docker DNS names
# rewritten for localhost. Checks what the deployment promises:
#
#   - both configs pass `countersign check-config`, and haproxy accepts its config;
#   - a login through the balancer is valid on *both* replicas (sessions shared in Redis);
#   - requests through the balancer reach the API signed and verified (the demo API's
#     VerifyLayer), with the user's identity; a forged write never reaches it;
#   - the API refuses requests that bypass the proxies (unsigned: 401);
#   - a logout through the balancer ends the session on both replicas;
#   - haproxy's /readyz health check takes a stopped replica out, and logins keep working.
#
# What the API receives header by header (no cookie, no client-supplied identity) is checked
# by the Rust tests with a recording upstream.
#
#   deploy/compose/smoke-test.sh        (COUNTERSIGN_BIN=... to skip the cargo build)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

die() {
  printf 'smoke-test: %s\n' "$*" >&2
  exit 1
}
step() { printf '\n==> %s\n' "$*"; }
for tool in redis-server haproxy curl node python3; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install redis-server haproxy curl)"
done

if [[ -z ${COUNTERSIGN_BIN:-} ]]; then
  cargo build --all-features --bin countersign
  COUNTERSIGN_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/countersign
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# free_ports N: N loopback ports free now, all different (scripts/free-ports.js).
free_ports() {
  node "$ROOT/scripts/free-ports.js" "$1"
}
read -r REDIS_PORT API_PORT P1 M1 P2 M2 LB < <(free_ports 7)
LB_URL=http://127.0.0.1:$LB

# wait_http URL: until it answers with any status (30 s).
wait_http() {
  for _ in $(seq 1 150); do
    curl -s -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.2
  done
  die "$1 did not answer"
}

step "files: signing key, users file, proxy.toml per replica, haproxy.cfg (from deploy/compose)"
head -c 32 /dev/urandom | base64 >"$WORK/k1"
PASSWORD="smoke-$(od -An -N9 -tx1 /dev/urandom | tr -d ' \n')"
HASH=$(printf '%s' "$PASSWORD" | "$COUNTERSIGN_BIN" hash-password)
printf '[[users]]\nname = "demo"\npassword = "%s"\nroles = ["user"]\n' "$HASH" >"$WORK/users.toml"
sed "s#/run/secrets/countersign_k1#$WORK/k1#" deploy/compose/keys.toml >"$WORK/keys.toml"

# Each rewrite must match exactly once, so a changed deploy file cannot silently go untested.
rewrite() { # rewrite FILE OUT SED-EXPR...
  local in=$1 out=$2
  shift 2
  cp "$in" "$out"
  for expr in "$@"; do
    local before
    before=$(cat "$out")
    sed -i "$expr" "$out"
    [[ $(cat "$out") != "$before" ]] || die "rewrite '$expr' matched nothing in $in"
  done
}
# static_dir must exist: the React build when there is one, else an empty site.
SPA_DIR=$ROOT/examples/react-spa/dist
[[ -d $SPA_DIR ]] || { SPA_DIR=$WORK/spa && mkdir -p "$SPA_DIR" && echo '<!doctype html>' >"$SPA_DIR/index.html"; }
for n in 1 2; do
  port_var=P$n admin_var=M$n
  rewrite deploy/compose/proxy.toml "$WORK/proxy$n.toml" \
    "s#^listen = \"0.0.0.0:8080\"#listen = \"127.0.0.1:${!port_var}\"#" \
    "s#^listen = \"0.0.0.0:9090\"#listen = \"127.0.0.1:${!admin_var}\"#" \
    "s#^public_origin = .*#public_origin = \"$LB_URL\"#" \
    "s#/usr/share/countersign/spa#$SPA_DIR#" \
    "s#redis://redis:6379/0#redis://127.0.0.1:$REDIS_PORT/0#" \
    "s#http://api:3000#http://127.0.0.1:$API_PORT#" \
    "s#^shutdown_grace = .*#shutdown_grace = \"2s\"#" \
    "s#^trusted_proxies = .*#trusted_proxies = [\"127.0.0.1\"]#"
done

rewrite deploy/compose/haproxy.cfg "$WORK/haproxy.cfg" \
  "s#^    bind :8080#    bind 127.0.0.1:$LB#" \
  "s#check port 9090 inter 5s fall 3 rise 2 resolvers docker init-addr libc,none#check inter 500ms fall 2 rise 1#" \
  "s#^    server proxy1 proxy1:8080#    server proxy1 127.0.0.1:$P1 port $M1#" \
  "s#^    server proxy2 proxy2:8080#    server proxy2 127.0.0.1:$P2 port $M2#" \
  "/^resolvers docker/,/^\$/d" \
  "s#^    log stdout format raw local0 info#    log stderr format raw local0 notice#" \
  "s#^    maxconn 16000#    maxconn 1000#" # the container's nofile limit is not this shell's

for n in 1 2; do
  "$COUNTERSIGN_BIN" check-config --config "$WORK/proxy$n.toml" || die "check-config proxy$n.toml"
done
haproxy -q -c -f "$WORK/haproxy.cfg" || die "haproxy -c"

step "start redis-server :$REDIS_PORT, demo API :$API_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
# The compose `api` service: the same keyring file as the proxies, the same window.
"$COUNTERSIGN_BIN" demo-api --listen "127.0.0.1:$API_PORT" --keyring "$WORK/keys.toml" \
  --window 10s >"$WORK/api.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
wait_http "http://127.0.0.1:$API_PORT/api/whoami"

# What a deploy pipeline runs before a rollout (docs/OPERATIONS.md, "check-config --online"):
# the Redis (credentials, noeviction, primary) and the API each proxy config names, reachable.
step "check-config --online for proxy1 and proxy2"
for n in 1 2; do
  "$COUNTERSIGN_BIN" check-config --online --config "$WORK/proxy$n.toml" ||
    die "check-config --online proxy$n.toml"
done

step "start proxy1 :$P1 (admin :$M1), proxy2 :$P2 (admin :$M2), haproxy :$LB"
"$COUNTERSIGN_BIN" run --config "$WORK/proxy1.toml" >"$WORK/proxy1.log" 2>&1 &
PROXY1_PID=$!
PIDS+=("$PROXY1_PID")
"$COUNTERSIGN_BIN" run --config "$WORK/proxy2.toml" >"$WORK/proxy2.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$M1/healthz"
wait_http "http://127.0.0.1:$M2/healthz"
haproxy -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
wait_http "$LB_URL/auth/session"

failures=0
check() { # check DESCRIPTION EXPECTED ACTUAL
  if [[ $2 == "$3" ]]; then
    printf '    ok: %s\n' "$1"
  else
    printf '    FAILED: %s (expected %s, got %s)\n' "$1" "$2" "$3" >&2
    failures=$((failures + 1))
  fi
}
status() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@"; }

step "checks"
check "proxy1 /readyz" 200 "$(status "http://127.0.0.1:$M1/readyz")"
check "proxy2 /readyz" 200 "$(status "http://127.0.0.1:$M2/readyz")"
# Called by its compose service name (admin.allowed_hosts), as an operator inside the network
# does; a name not listed is refused (DNS rebinding).
check "proxy1 /metrics as proxy1:9090" 200 "$(status -H 'Host: proxy1:9090' "http://127.0.0.1:$M1/metrics")"
check "proxy1 /metrics as rebound.example" 403 "$(status -H 'Host: rebound.example' "http://127.0.0.1:$M1/metrics")"

JAR=$WORK/jar.txt
LOGIN=$(curl -s -c "$JAR" --max-time 10 -H 'Content-Type: application/json' -H "Origin: $LB_URL" \
  -d "{\"username\":\"demo\",\"password\":\"$PASSWORD\"}" "$LB_URL/auth/login")
CSRF=$(printf '%s' "$LOGIN" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("csrf_token",""))' 2>/dev/null || true)
check "login through the balancer returns a CSRF token" yes "$([[ -n $CSRF ]] && echo yes || echo no)"
check "the session is valid on proxy1" 200 "$(status -b "$JAR" "http://127.0.0.1:$P1/auth/session?touch=false")"
check "the session is valid on proxy2" 200 "$(status -b "$JAR" "http://127.0.0.1:$P2/auth/session?touch=false")"

codes=""
users=""
for _ in 1 2 3 4; do
  whoami=$(curl -s -b "$JAR" -w ' %{http_code}' --max-time 5 "$LB_URL/api/whoami")
  codes+="${whoami##* } "
  users+="$(printf '%s' "${whoami% *}" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("user"))' 2>/dev/null || echo '?') "
done
check "4 API calls through the balancer (both replicas), verified by the API" "200 200 200 200 " "$codes"
check "the API verified the signed identity each time" "demo demo demo demo " "$users"
check "a write through the balancer with the CSRF token" 201 \
  "$(status -b "$JAR" -H "X-CSRF-Token: $CSRF" -H 'Content-Type: application/json' -d '{"text":"hi"}' "$LB_URL/api/notes")"
check "a write without the CSRF token is refused" 403 \
  "$(status -b "$JAR" -H 'Content-Type: application/json' -d '{"text":"forged"}' "$LB_URL/api/notes")"
notes=$(curl -s -b "$JAR" --max-time 5 "$LB_URL/api/notes" |
  python3 -c 'import json,sys; print(" ".join(n["text"] + "/" + n["author"] for n in json.load(sys.stdin)["notes"]))' 2>/dev/null || echo '?')
check "the API holds the one note, written as demo; nothing forged arrived" "hi/demo" "$notes"
check "the API refuses requests that bypass the proxies" 401 "$(status "http://127.0.0.1:$API_PORT/api/whoami")"

check "logout through the balancer" 204 "$(status -b "$JAR" -X POST -H "X-CSRF-Token: $CSRF" "$LB_URL/auth/logout")"
check "the session is gone on proxy1" 401 "$(status -b "$JAR" "http://127.0.0.1:$P1/auth/session")"
check "the session is gone on proxy2" 401 "$(status -b "$JAR" "http://127.0.0.1:$P2/auth/session")"

step "the login throttle counts each browser behind the balancer (trusted_proxies)"
# haproxy (127.0.0.1 here) appends each browser's address to X-Forwarded-For: one browser
# (127.0.0.2) failing 21 logins reaches its per-address limit (auth.throttle.max_failures_per_ip,
# 20), and another browser (127.0.0.3) behind the same balancer still logs in.
code=""
for i in $(seq 1 21); do
  code=$(status --interface 127.0.0.2 -H 'Content-Type: application/json' -H "Origin: $LB_URL" \
    -d "{\"username\":\"nobody$i\",\"password\":\"wrong\"}" "$LB_URL/auth/login")
done
check "the 21st failed login of one browser is throttled" 429 "$code"
check "another browser behind the same balancer logs in" 200 \
  "$(status --interface 127.0.0.3 -H 'Content-Type: application/json' -H "Origin: $LB_URL" \
    -d "{\"username\":\"demo\",\"password\":\"$PASSWORD\"}" "$LB_URL/auth/login")"

step "stop proxy1 (SIGTERM): haproxy's /readyz check must route around it"
kill -TERM "$PROXY1_PID"
wait "$PROXY1_PID" 2>/dev/null || true
sleep 2
codes=""
for _ in 1 2 3 4; do
  codes+="$(status -H 'Content-Type: application/json' -H "Origin: $LB_URL" \
    -d "{\"username\":\"demo\",\"password\":\"$PASSWORD\"}" "$LB_URL/auth/login") "
done
check "4 logins through the balancer with one replica down" "200 200 200 200 " "$codes"

if ((failures)); then
  for f in proxy1.log proxy2.log haproxy.log api.log; do
    echo "--- $f (tail) ---" >&2
    tail -n 20 "$WORK/$f" >&2
  done
  die "$failures check(s) failed"
fi
echo
echo "smoke-test: compose topology works on loopback (2 proxies + Redis + balancer)"
