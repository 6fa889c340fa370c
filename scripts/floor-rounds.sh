# Sourced by scripts/put-floor.sh and scripts/get-floor.sh: the servers' common set-up, and
# the alternating rounds with each server's CPU time per operation.
#
# Sourced as `source "$(dirname "$0")/floor-rounds.sh" "$@"` with DEFAULT_ROUNDS set; the
# script's arguments are [ROUNDS] [SECONDS] (default 4 s). It moves to the repository root and
# sets ROUNDS, SECONDS_PER_ROUND and PY ($PYTHON, else .venv/bin/python). After it: $tmp
# (removed on exit), start NAME COMMAND... (runs a server in the background; its pid is in
# $last_pid) and rounds SCENARIO SPEC... where each SPEC is "name target port pid".

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${1:-$DEFAULT_ROUNDS}
SECONDS_PER_ROUND=${2:-4}
PY=${PYTHON:-.venv/bin/python}

tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

command -v redis-server >/dev/null || { echo "redis-server not found (scripts/system-deps.sh)" >&2; exit 1; }

start() {
  local name=$1
  shift
  "$@" >"$tmp/$name.log" 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
}

start_redis() {
  start redis redis-server --port "$1" --save "" --appendonly no --maxmemory 1gb \
    --maxmemory-policy allkeys-lru --client-output-buffer-limit "normal 0 0 0"
}

wait_ready() {
  local port
  for port in "$@"; do
    for _ in $(seq 100); do
      curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
      sleep 0.2  # waiting for start-up, not for time to pass in a test
    done
  done
}

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

rounds() {
  local scenario=$1
  shift
  local hz round spec name target port pid url c0 c1 out
  hz=$(getconf CLK_TCK)
  echo "round target GB/s server_cpu_us_per_op"
  for round in $(seq "$ROUNDS"); do
    for spec in "$@"; do
      read -r name target port pid <<<"$spec"
      url=http://127.0.0.1:$port
      [ "$target" = redis ] && url=redis://127.0.0.1:$port/0
      c0=$(cpu "$pid")
      out=$("$PY" -m loadtest.run "$scenario" --target "$target" --url "$url" \
        --duration "$SECONDS_PER_ROUND" --no-plots 2>/dev/null | tail -1)
      c1=$(cpu "$pid")
      echo "$out" | "$PY" -c "
import json, sys
d = json.load(sys.stdin)['summary']['$scenario']['$target']
ops = d['ops_per_s'] * $SECONDS_PER_ROUND
print($round, '$name', d['gbps'], round(($c1 - $c0) / $hz * 1e6 / ops))"
    done
  done
}
