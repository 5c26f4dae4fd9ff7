#!/usr/bin/env bash
# Helpers shared by the bench scripts (sourced, not run). Everything they start listens on
# 127.0.0.1 only and is stopped by `bench_cleanup` (installed as an EXIT trap by the scripts).

# The test password of the benchmark user; its argon2id hash below was made once with
#   printf %s 'bench-password-not-secret' | argon2 countersignbenchsalt -id -m 15 -t 2 -p 1 -e
# so the scripts never need `countersign hash-password`. Not a secret: loopback benchmarks only.
BENCH_USER="bench"
BENCH_PASSWORD="bench-password-not-secret"
# shellcheck disable=SC2016 # a literal PHC string, nothing to expand
BENCH_PASSWORD_HASH='$argon2id$v=19$m=32768,t=2,p=1$Y291bnRlcnNpZ25iZW5jaHNhbHQ$H0S3W8llLI1I0SMSGY823T6DkMT2oJ4hSNfJBpoULlE'

BENCH_PIDS=()

bench_log() { printf '[bench] %s\n' "$*" >&2; }
bench_die() {
  printf '[bench] error: %s\n' "$*" >&2
  exit 1
}

# Installs Debian packages that are missing (root or sudo).
bench_apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  bench_log "apt-get install ${missing[*]}"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# nginx (the light build is enough: proxy, upstream keepalive, return), wrk, curl, python3.
bench_require_tools() {
  local need=()
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  ((${#need[@]})) && bench_apt_install "${need[@]}"
  NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
  [[ -x $NGINX_BIN ]] || bench_die "nginx not found after install"
  command -v wrk >/dev/null 2>&1 || bench_die "wrk not found after install"
}

# A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race with other processes is
# acceptable for a benchmark, and `bench_wait_port` fails loudly if something else took it).
bench_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits until 127.0.0.1:PORT accepts connections (up to SECS seconds, default 30), failing with
# the named log file's tail otherwise.
bench_wait_port() {
  local port=$1 what=$2 log=${3:-} secs=${4:-30} i
  for ((i = 0; i < secs * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  [[ -n $log && -f $log ]] && tail -n 30 "$log" >&2
  bench_die "$what did not listen on 127.0.0.1:$port within ${secs}s"
}

# Renders an nginx config template: replaces each @NAME@ with the value of a NAME=value
# argument; fails when a placeholder is left.
bench_render() {
  local template=$1 out=$2
  shift 2
  python3 - "$template" "$out" "$@" <<'PY'
import sys
template, out, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(template).read()
for pair in pairs:
    name, value = pair.split("=", 1)
    text = text.replace("@" + name + "@", value)
import re
left = re.findall(r"@[A-Z_]+@", text)
if left:
    sys.exit(f"{template}: placeholders left unset: {sorted(set(left))}")
open(out, "w").write(text)
PY
}

# Starts nginx with a config file in the foreground (daemon off), in the background of this
# shell; its (master) pid is left in BENCH_LAST_PID.
bench_start_nginx() {
  local conf=$1 port=$2 what=$3 log=$4
  "$NGINX_BIN" -e "$log" -c "$conf" -g 'daemon off;' >>"$log.out" 2>&1 &
  BENCH_LAST_PID=$!
  BENCH_PIDS+=("$BENCH_LAST_PID")
  bench_wait_port "$port" "$what" "$log"
}

# The `user` line nginx needs: as root, workers would otherwise drop to `nobody` and could not
# read the temp dir.
bench_nginx_user_line() {
  if [[ $(id -u) -eq 0 ]]; then echo "user root;"; else echo ""; fi
}

bench_cleanup() {
  local pid
  for pid in "${BENCH_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${BENCH_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  BENCH_PIDS=()
}

# The countersign binary: $COUNTERSIGN if set, else target/$PROFILE/countersign, built when
# missing or older than the sources (PROFILE=release by default; the smoke run uses debug).
bench_countersign_bin() {
  local root=$1 profile=${PROFILE:-release}
  if [[ -n ${COUNTERSIGN:-} ]]; then
    echo "$COUNTERSIGN"
    return
  fi
  local flag=()
  [[ $profile == release ]] && flag=(--release)
  bench_log "cargo build ${flag[*]} --all-features --bin countersign --bin countersign-loadgen --bin countersign-memfig --bin countersign-baseline-proxy"
  (cd "$root" && cargo build -q "${flag[@]}" --all-features \
    --bin countersign --bin countersign-loadgen --bin countersign-memfig \
    --bin countersign-baseline-proxy) >&2 ||
    bench_die "cargo build failed"
  local dir=${CARGO_TARGET_DIR:-$root/target}
  echo "$dir/$profile/countersign"
}

# The plain hyper proxy of the `hyper-baseline` target: $BASELINE if set, else
# target/$PROFILE/countersign-baseline-proxy (built when missing or older than the sources).
bench_baseline_bin() {
  local root=$1 profile=${PROFILE:-release}
  if [[ -n ${BASELINE:-} ]]; then
    echo "$BASELINE"
    return
  fi
  local flag=()
  [[ $profile == release ]] && flag=(--release)
  bench_log "cargo build ${flag[*]} --all-features --bin countersign-baseline-proxy"
  (cd "$root" && cargo build -q "${flag[@]}" --all-features --bin countersign-baseline-proxy) >&2 ||
    bench_die "cargo build failed"
  local dir=${CARGO_TARGET_DIR:-$root/target}
  echo "$dir/$profile/countersign-baseline-proxy"
}

# Starts the plain hyper proxy BIN on PORT in front of UPSTREAM_URL, with extra arguments;
# sets BASELINE_PID.
bench_start_baseline() {
  local bin=$1 port=$2 upstream=$3 log=$4
  shift 4
  "$bin" --listen "127.0.0.1:$port" --upstream "$upstream" "$@" >>"$log" 2>&1 &
  BASELINE_PID=$!
  BENCH_PIDS+=("$BASELINE_PID")
  bench_wait_port "$port" "countersign-baseline-proxy" "$log"
}

# Writes a countersign config + keyring + users file into DIR. Arguments: dir, listen port,
# admin port, upstream URL, extra [[upstream]] lines (optional).
bench_countersign_config() {
  local dir=$1 port=$2 admin_port=$3 upstream=$4 store=${5:-memory}
  local secret
  secret=$(head -c 32 /dev/urandom | base64 -w0)
  cat >"$dir/keys.toml" <<KEYS
active = "bench1"
rotation = "off"
[[keys]]
id = "bench1"
secret = "$secret"
KEYS
  chmod 600 "$dir/keys.toml"
  cat >"$dir/users.toml" <<USERS
[[users]]
name = "$BENCH_USER"
password = '$BENCH_PASSWORD_HASH'
roles = ["bench"]
USERS
  local store_lines="store = \"$store\""
  if [[ $store == redis ]]; then
    store_lines+=$'\n'"redis_url = \"${REDIS_URL:-redis://127.0.0.1:6379/}\""
  fi
  cat >"$dir/proxy.toml" <<CONF
# Generated by bench/ for one benchmark run.
[server]
listen = "127.0.0.1:$port"
public_origin = "http://127.0.0.1:$port"

[admin]
listen = "127.0.0.1:$admin_port"

[session]
$store_lines
idle_timeout = "30m"
absolute_timeout = "12h"

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"
window = "10s"

[[upstream]]
name = "api"
prefix = "/api/"
url = "$upstream"
max_body = "1MiB"
CONF
}

# Starts `countersign run` on DIR/proxy.toml; sets COUNTERSIGN_PID.
bench_start_countersign() {
  local bin=$1 dir=$2 port=$3 log=$4
  # Warn level: one access-log line per request would measure the logger, not the proxy
  # (nginx runs with access_log off for the same reason).
  RUST_LOG=${COUNTERSIGN_LOG:-warn} "$bin" run --config "$dir/proxy.toml" >>"$log" 2>&1 &
  COUNTERSIGN_PID=$!
  BENCH_PIDS+=("$COUNTERSIGN_PID")
  bench_wait_port "$port" "countersign run" "$log"
}

# Logs in once; sets BENCH_COOKIE ("name=value") and BENCH_CSRF.
bench_login() {
  local port=$1 headers body
  headers=$(mktemp)
  body=$(curl -sS --fail-with-body -D "$headers" \
    -H 'Content-Type: application/json' \
    -H "Origin: http://127.0.0.1:$port" \
    --data "{\"username\":\"$BENCH_USER\",\"password\":\"$BENCH_PASSWORD\"}" \
    "http://127.0.0.1:$port/auth/login") || {
    cat "$headers" >&2
    rm -f "$headers"
    bench_die "login to countersign failed: $body"
  }
  BENCH_COOKIE=$(python3 -c '
import sys
for line in open(sys.argv[1], encoding="latin-1"):
    name, _, value = line.partition(":")
    if name.strip().lower() == "set-cookie":
        print(value.strip().split(";", 1)[0]); break
' "$headers")
  rm -f "$headers"
  # shellcheck disable=SC2034 # read by the scripts that source this file
  BENCH_CSRF=$(printf '%s' "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["csrf_token"])') ||
    bench_die "login answer has no csrf_token: $body"
  [[ -n $BENCH_COOKIE ]] || bench_die "login set no cookie"
}

# Resident memory of a pid in KiB: field VmRSS or VmHWM of /proc/PID/status.
bench_proc_kib() {
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

# The processes to account for a server: the pid and its direct children (nginx workers).
bench_proc_tree() {
  local pid=$1
  echo "$pid"
  pgrep -P "$pid" 2>/dev/null || true
}

# CPU time (clock ticks, user + system, all threads) and context switches (voluntary +
# involuntary, all threads) of the given pids, as "TICKS SWITCHES".
bench_cpu_sample() {
  local ticks=0 switches=0 pid t s
  for pid in "$@"; do
    [[ -r /proc/$pid/stat ]] || continue
    # Fields 14 and 15 (utime, stime) after the ")" that ends the command name.
    t=$(sed 's/.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')
    s=$(cat /proc/"$pid"/task/*/status 2>/dev/null |
      awk '/^(voluntary|nonvoluntary)_ctxt_switches:/ { n += $2 } END { print n + 0 }')
    ticks=$((ticks + t))
    switches=$((switches + s))
  done
  echo "$ticks $switches"
}
