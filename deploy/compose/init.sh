#!/usr/bin/env bash
# One-time setup for deploy/docker-compose.yml: a random signing key (compose secret) and a
# users file with one user. Neither is committed (see deploy/Dockerfile.dockerignore).
#
#   deploy/compose/init.sh [USER] [ROLES]   # defaults: demo, user (ROLES: a,b; "" for none)
#   docker compose -f deploy/docker-compose.yml up --build
#
# The password is read from the terminal without echo, twice (or one line from stdin when
# piped: `printf '%s\n' "$PW" | deploy/compose/init.sh`), and hashed by `countersign
# hash-password`: the local build (target/release, else target/debug; under $CARGO_TARGET_DIR
# when that is set, as cargo builds there) if there is one, else
# the compose image `countersign:local`, which this script builds first if Docker does not
# have it yet (the same build as compose's; `up --build` then reuses its cache). So a machine
# with only Docker works, in the documented order.
#
# Nothing is written until everything it depends on succeeded (key, image, password, hash);
# each file is written whole (temporary file + rename) and only if it does not exist yet, so
# an interrupted or failed run can simply be run again.
set -euo pipefail
# Where cargo put the local build: a relative CARGO_TARGET_DIR is cargo's working directory's,
# so it is resolved before the cd below.
target_dir=${CARGO_TARGET_DIR:+$(realpath -m -- "$CARGO_TARGET_DIR")}
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
target_dir=${target_dir:-$root/target}
user=${1:-demo}
roles=${2-user}
image=countersign:local

need_key=1
[[ -s secrets/k1 ]] && need_key=0
need_users=1
if [[ -e users.toml ]]; then
  echo "users.toml exists; leaving it alone"
  need_users=0
fi
if ((!need_key && !need_users)); then
  echo "secrets/k1 exists; leaving it alone"
  exit 0
fi

die() {
  echo "init.sh: $*" >&2
  exit 1
}

# A TOML basic string: backslash and quote escaped; control characters refused.
toml_string() {
  [[ -n $1 ]] || die "empty name in '$user' / '$roles'"
  [[ $1 != *[[:cntrl:]]* ]] || die "control character in name: $(printf '%q' "$1")"
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

tmp_files=()
cleanup() { ((${#tmp_files[@]} == 0)) || rm -f "${tmp_files[@]}"; }
trap cleanup EXIT

# --- everything that can fail, before anything is written ---------------------------------
if ((need_users)); then
  user_toml=$(toml_string "$user")
  IFS=',' read -r -a role_list <<<"$roles"
  roles_toml=""
  for role in "${role_list[@]}"; do
    role=${role#"${role%%[![:space:]]*}"} # trim
    role=${role%"${role##*[![:space:]]}"}
    [[ -n $role ]] || continue
    roles_toml+="${roles_toml:+, }$(toml_string "$role")"
  done

  bin=$target_dir/release/countersign
  [[ -x $bin ]] || bin=$target_dir/debug/countersign
  if [[ -x $bin ]]; then
    hasher=("$bin" hash-password)
  else
    command -v docker >/dev/null 2>&1 ||
      die "no local build ($target_dir/release/countersign) and no docker to hash the password with"
    if ! docker image inspect "$image" >/dev/null 2>&1; then
      # As deploy/docker-compose.yml builds it (x-proxy: context .., deploy/Dockerfile,
      # target proxy, image countersign:local). BuildKit: the Dockerfile uses cache mounts.
      echo "building $image (the compose proxy image) to run hash-password in it" >&2
      DOCKER_BUILDKIT=1 docker build -f "$root/deploy/Dockerfile" --target proxy -t "$image" "$root"
    fi
    # --pull never: never fetch some registry's "countersign:local"; no network needed to hash.
    # -i without -t: the password arrives on stdin (read below without echo when typed).
    hasher=(docker run --rm -i --pull never --network none
      --entrypoint /usr/local/bin/countersign "$image" hash-password)
  fi

  if [[ -t 0 ]]; then
    IFS= read -r -s -p "password for $user: " password
    echo >&2
    IFS= read -r -s -p "again: " again
    echo >&2
    [[ $password == "$again" ]] || die "the passwords differ; nothing written"
    unset again
    hash=$(printf '%s\n' "$password" | "${hasher[@]}")
    unset password
  else
    # Piped: hash-password itself checks that stdin is exactly one non-empty line.
    hash=$("${hasher[@]}")
  fi
  [[ $hash == "\$argon2id\$"* ]] || die "hash-password printed no argon2id hash; nothing written"
fi

# --- write -------------------------------------------------------------------------------
if ((need_key)); then
  # The folder is private to the host user; the file itself is world-readable because compose
  # bind-mounts it as is and the containers run as uid 10001, not as its owner.
  mkdir -p secrets
  chmod 700 secrets
  key_tmp=$(mktemp secrets/.k1.XXXXXX)
  tmp_files+=("$key_tmp")
  head -c 32 /dev/urandom | base64 >"$key_tmp"
  [[ $(wc -c <"$key_tmp") -ge 44 ]] || die "could not read 32 random bytes"
fi
if ((need_users)); then
  users_tmp=$(mktemp .users.toml.XXXXXX)
  tmp_files+=("$users_tmp")
  cat >"$users_tmp" <<TOML
# Users for the compose deployment. Hashes from \`countersign hash-password\` (argon2id).
[[users]]
name = $user_toml
password = "$hash"
roles = [$roles_toml]
TOML
fi
# Renames last: each file appears complete or not at all.
if ((need_key)); then
  chmod 644 "$key_tmp"
  mv "$key_tmp" secrets/k1
  echo "wrote secrets/k1 (signing key, base64 of 32 random bytes)"
fi
if ((need_users)); then
  chmod 644 "$users_tmp" # read by uid 10001 in the containers; it holds hashes, not passwords
  mv "$users_tmp" users.toml
  echo "wrote users.toml ($user: ${roles_toml:-no roles})"
fi
