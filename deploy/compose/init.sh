#!/usr/bin/env bash
# One-time setup for deploy/docker-compose.yml: a random signing key (compose secret) and a
# users file with one user. Neither is committed (see deploy/Dockerfile.dockerignore).
#
#   deploy/compose/init.sh [USER] [ROLES]      # defaults: demo, user
#
# The password is read from the terminal without echo (or from stdin when piped) and hashed
# by `countersign hash-password`: the local build if there is one, else the image.
set -euo pipefail
cd "$(dirname "$0")"
user=${1:-demo}
roles=${2:-user}

if [[ ! -s secrets/k1 ]]; then
  # The folder is private to the host user; the file itself is world-readable because compose
  # bind-mounts it as is and the containers run as uid 10001, not as its owner.
  mkdir -p secrets
  chmod 700 secrets
  (umask 022 && head -c 32 /dev/urandom | base64 >secrets/k1)
  echo "wrote secrets/k1 (signing key, base64 of 32 random bytes)"
fi

if [[ -e users.toml ]]; then
  echo "users.toml exists; leaving it alone"
  exit 0
fi

hash_password() {
  local bin=../../target/release/countersign
  [[ -x $bin ]] || bin=../../target/debug/countersign
  if [[ -x $bin ]]; then
    "$bin" hash-password
  else
    docker run --rm -i --entrypoint /usr/local/bin/countersign countersign:local hash-password
  fi
}

echo "password for $user:" >&2
hash=$(hash_password)
IFS=', ' read -r -a role_list <<<"$roles"
roles_toml=$(printf '"%s", ' "${role_list[@]}")
(
  umask 022 # read by uid 10001 in the containers; it holds hashes, not passwords
  cat >users.toml <<TOML
# Users for the compose deployment. Hashes from \`countersign hash-password\` (argon2id).
[[users]]
name = "$user"
password = "$hash"
roles = [${roles_toml%, }]
TOML
)
echo "wrote users.toml ($user: ${roles})"
