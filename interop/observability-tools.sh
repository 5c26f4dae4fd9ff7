#!/usr/bin/env bash
# Installs the independent checkers tests/support_metrics runs (for tests/proxy_observability.rs
# and tests/proxy_observability_qa.rs) on a live proxy's
# /metrics, the way scripts/interop.sh installs its peer:
#   - python3 (and python3-venv) from Debian when missing;
#   - the PyPI package prometheus-client (pinned in interop/observability-requirements.txt) in
#     a venv at VENV_DIR, re-created when missing, broken or installed from other pins;
#   - promtool, unpacked from the Debian package `prometheus` (about 20 MB) into the venv.
# Usage: interop/observability-tools.sh VENV_DIR
# Exits non-zero when something cannot be installed: the test then fails, it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:?usage: interop/observability-tools.sh VENV_DIR}
requirements=interop/observability-requirements.txt

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  echo "==> apt-get install $*"
  if [[ -z $apt_updated ]]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Two test processes may get here at once: one installs, the other waits for it.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv

stamp="$venv/.requirements"
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$requirements" "$stamp"; then
  echo "==> creating $venv"
  rm -rf "$venv"
  # A Debian python3 without ensurepip fails here until python3-venv is installed.
  if ! python3 -m venv "$venv"; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi
"$venv/bin/python" -c 'import prometheus_client.parser'

# promtool alone, unpacked from the Debian package into the venv: installing the package
# would also set up (and, where systemd runs, start) a Prometheus server on port 9090.
if [[ ! -x $venv/bin/promtool ]]; then
  echo "==> promtool from the Debian package prometheus"
  unpack=$(mktemp -d)
  trap 'rm -rf "$unpack"' EXIT
  if ! (cd "$unpack" && apt-get download prometheus >/dev/null 2>&1); then
    as_root apt-get update -qq
    (cd "$unpack" && apt-get download prometheus)
  fi
  dpkg-deb -x "$unpack"/prometheus_*.deb "$unpack/root"
  cp "$unpack/root/usr/bin/promtool" "$venv/bin/promtool"
fi
"$venv/bin/promtool" --version >/dev/null
