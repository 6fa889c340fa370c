#!/usr/bin/env bash
# GET of 1 MiB blocks, 16 clients: the floor server (loadtest/put_floor.py --get-bytes: headers
# and a memoryview written to the transport, nothing else), the bare aiohttp dict server,
# redis-server and kvgate (HTTP, no shared memory), in alternating rounds of one run, with each
# server's CPU time per GET. docs/benchmarks.md ("HTTP GET against its floor") shows a run.
#
#   scripts/get-floor.sh [ROUNDS] [SECONDS]      # default 3 rounds x 4 s
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECONDS_PER_ROUND=${2:-4}
PY=${PYTHON:-.venv/bin/python}
BASE=${GET_FLOOR_BASE_PORT:-18195}
tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

command -v redis-server >/dev/null || { echo "redis-server not found (scripts/system-deps.sh)" >&2; exit 1; }
"$PY" -m loadtest.put_floor --port $((BASE + 2)) --get-bytes 1MiB --get-keys 64 & pids+=($!); floor=$!
"$PY" -m loadtest.dict_server --port $((BASE + 3)) & pids+=($!); dict=$!
"$PY" -m gateway.cli serve --port $((BASE + 1)) --data-dir "$tmp/kv" \
  --hbm-bytes 256MiB --dram-bytes 512MiB --disk-bytes 2GiB --no-shm >"$tmp/kvgate.log" 2>&1 &
pids+=($!); kvgate=$!
redis-server --port "$BASE" --save "" --appendonly no --maxmemory 1gb \
  --maxmemory-policy allkeys-lru --client-output-buffer-limit "normal 0 0 0" >"$tmp/redis.log" 2>&1 &
pids+=($!); redis=$!

for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$((BASE + 1))/readyz" >/dev/null 2>&1 && break
  sleep 0.2  # waiting for start-up, not for time to pass in a test
done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
echo "round target GB/s server_cpu_us_per_get"
for round in $(seq "$ROUNDS"); do
  for spec in "floor dict $((BASE + 2)) $floor" "dict dict $((BASE + 3)) $dict" \
              "redis redis $BASE $redis" "kvgate kvgate $((BASE + 1)) $kvgate"; do
    read -r name target port pid <<<"$spec"
    url=http://127.0.0.1:$port
    [ "$target" = redis ] && url=redis://127.0.0.1:$port/0
    c0=$(cpu "$pid")
    out=$("$PY" -m loadtest.run hot-get --target "$target" --url "$url" \
      --duration "$SECONDS_PER_ROUND" --no-plots 2>/dev/null | tail -1)
    c1=$(cpu "$pid")
    echo "$out" | "$PY" -c "
import json, sys
d = json.load(sys.stdin)['summary']['hot-get']['$target']
ops = d['ops_per_s'] * $SECONDS_PER_ROUND
print($round, '$name', d['gbps'], round(($c1 - $c0) / $hz * 1e6 / ops))"
  done
done
