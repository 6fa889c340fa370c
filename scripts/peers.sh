#!/usr/bin/env bash
# Peers for the load tests (loadtest/): redis-server and Mooncake Store.
#
#   scripts/peers.sh install   install what is missing (Debian packages, then pip packages into
#                              .venv); idempotent, apt-get runs only when something is missing
#   scripts/peers.sh check     say what is present, exit 1 when something is missing
#
# Mooncake is for benchmarks only; `make test` does not need it (its smoke test skips without it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
DEB_PKGS=(redis-server libibverbs1 librdmacm1 libnuma1 liburing2)
# Kept in step with loadtest/README.md; versions are the ones measured in docs/benchmarks-peers.md.
PIP_PKGS=("matplotlib>=3.8" "mooncake-transfer-engine-non-cuda")

missing_debs() {
  local p
  for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

missing_pips() {
  "$PY" - <<'EOF'
import importlib.util
for mod, pkg in (("matplotlib", "matplotlib>=3.8"), ("mooncake.store", "mooncake-transfer-engine-non-cuda")):
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        print(pkg)
EOF
}

install() {
  mapfile -t need < <(missing_debs)
  if [ ${#need[@]} -gt 0 ]; then
    echo "peers: apt-get install ${need[*]}" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  mapfile -t pneed < <(missing_pips)
  if [ ${#pneed[@]} -gt 0 ]; then
    echo "peers: pip install ${pneed[*]}" >&2
    local cons=()
    [ -f constraints.txt ] && cons=(-c constraints.txt)
    "$PY" -m pip install -q "${cons[@]}" "${pneed[@]}"
  fi
  check
}

check() {
  local rc=0 p
  for p in $(missing_debs); do echo "missing Debian package: $p" >&2; rc=1; done
  for p in $(missing_pips); do echo "missing pip package: $p" >&2; rc=1; done
  if [ $rc -eq 0 ]; then echo "peers: all present" >&2; fi
  return $rc
}

case "${1:-}" in
  install) install ;;
  check) check ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
