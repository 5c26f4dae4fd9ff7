#!/usr/bin/env bash
# The README's main command, run as README.md writes it (the `cargo run --release -- dev` line
# under "The two commands"): it must build, start the demo, and carry a login, a signed read and
# a CSRF-checked write through the proxy to the demo API behind the VerifyLayer. Called by
# scripts/test.sh, so a README command that stops working fails the tests (it once did: with
# several binaries in the package, `cargo run` needed `default-run`).
#
# The demo listens on 127.0.0.1:8080, as the README says; a port already taken is a failure
# with a message, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "readme-demo: $*" >&2
  exit 1
}

# The command exactly as the README gives it (up to its comment).
line=$(grep -m1 -E '^cargo run --release -- dev( |$)' README.md) ||
  fail "README.md has no line starting with 'cargo run --release -- dev'"
read -r -a argv <<<"${line%%#*}"
cmd=${argv[*]}

command -v curl >/dev/null 2>&1 || fail "curl is needed"
if curl -s -o /dev/null --max-time 2 http://127.0.0.1:8080/; then
  fail "127.0.0.1:8080 is already in use; the README's demo listens there"
fi

work=$(mktemp -d /tmp/countersign-readme-demo.XXXXXX)
# A session of its own, so that stopping it stops cargo and the demo it runs.
setsid "${argv[@]}" >"$work/out" 2>&1 &
pid=$!
stop() {
  kill -TERM -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT

echo "==> $cmd"
# A clean checkout builds the release binary first: minutes with LTO, more on a busy machine.
# The build gets up to 40 minutes (cargo prints `Running` when it starts the binary); the demo
# then has 60 seconds to come up.
came_up() { grep -q 'countersign dev is running' "$work/out"; }
exited() { ! kill -0 "$pid" 2>/dev/null; }
for _ in $(seq 2400); do
  grep -q '^ *Running `' "$work/out" && break
  exited && { cat "$work/out" >&2; fail "'$cmd' exited before the demo came up"; }
  sleep 1
done
grep -q '^ *Running `' "$work/out" || { cat "$work/out" >&2; fail "the release build did not finish in 40 minutes"; }
for _ in $(seq 600); do
  came_up && break
  exited && { cat "$work/out" >&2; fail "'$cmd' exited before the demo came up"; }
  sleep 0.1
done
came_up || { cat "$work/out" >&2; fail "the demo did not come up within 60 s of starting"; }

password=$(awk '$1 == "password" { print $2; exit }' "$work/out")
url=$(awk '$1 == "open" { print $2; exit }' "$work/out")
[[ -n $password && $url == http://127.0.0.1:8080/ ]] ||
  { cat "$work/out" >&2; fail "the demo did not print its URL and password as the README says"; }
for _ in $(seq 50); do curl -s -o /dev/null "$url" && break; sleep 0.1; done

jar=$work/jar
login=$(curl -sS -c "$jar" -H 'Content-Type: application/json' \
  -d "{\"username\":\"demo\",\"password\":\"$password\"}" "${url}auth/login")
csrf=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["csrf_token"])' "$login") ||
  fail "login answered $login"

# A signed read: the demo API behind the VerifyLayer names the verified user.
whoami=$(curl -sS -b "$jar" "${url}api/whoami")
python3 - "$whoami" <<'PY' || fail "whoami answered $whoami"
import json, sys
answer = json.loads(sys.argv[1])
assert answer["user"] == "demo" and answer["keyid"], answer
PY

# A write without the CSRF header is refused; with it, it goes through.
code=$(curl -sS -o "$work/body" -w '%{http_code}' -b "$jar" -H 'Content-Type: application/json' \
  -d '{"text":"from readme-demo"}' "${url}api/notes")
[[ $code == 403 ]] || fail "a write without X-CSRF-Token answered $code $(cat "$work/body")"
code=$(curl -sS -o "$work/body" -w '%{http_code}' -b "$jar" -H "X-CSRF-Token: $csrf" \
  -H 'Content-Type: application/json' -d '{"text":"from readme-demo"}' "${url}api/notes")
[[ $code == 2* ]] || fail "a write with X-CSRF-Token answered $code $(cat "$work/body")"
notes=$(curl -sS -b "$jar" "${url}api/notes")
[[ $notes == *'from readme-demo'* ]] || fail "the note written is not listed: $notes"

# The event stream the banner shows (`curl -N ... /api/events`): a signed tick within 3 s.
events=$(curl -sS -N --max-time 3 -b "$jar" "${url}api/events" || true)
[[ $events == *'"user":"demo"'* ]] || fail "the event stream sent no tick for demo: $events"

# The WebSocket the banner shows (`/api/ws`): curl sends a browser's handshake (the session
# cookie, the public Origin); the proxy signs it, the demo API behind the VerifyLayer answers
# 101 with the RFC 6455 accept key of this (RFC example) key, then greets the verified user.
# curl then waits for more until --max-time: exit 28 is expected.
ws=$(curl -sS -i -N --max-time 3 -b "$jar" -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
  -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
  -H "Origin: ${url%/}" "${url}api/ws" 2>/dev/null | tr -d '\000' || true)
[[ $ws == 'HTTP/1.1 101 '* && $ws == *'s3pPLMBiTxaQ9kYGzzhZRbK+xOo='* && $ws == *'{"hello":"demo"}'* ]] ||
  fail "the WebSocket handshake through the proxy was not switched and greeted: $ws"

echo "readme-demo: '$cmd' came up; login, signed read, CSRF-checked write, event stream and WebSocket passed"
