#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks need (redis-server, docker-compose for
# validating compose.yaml, chromium for the headless dashboard test). Idempotent and quiet when
# everything is present; needs root or sudo only when something is missing.
set -euo pipefail
need=()
# Mooncake Store's wheel (a benchmark peer) loads these at import time.
for lib in libibverbs1 librdmacm1 libnuma1 liburing2; do
  dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q 'install ok installed' || need+=("$lib")
done
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  need+=(chromium fonts-dejavu-core)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "system-deps: installing ${need[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "system-deps: need root to install ${need[*]}; tests needing them will skip" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
