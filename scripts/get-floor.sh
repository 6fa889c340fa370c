#!/usr/bin/env bash
# GET of 1 MiB blocks, 16 clients: the floor server (loadtest/put_floor.py --get-bytes: headers
# and a memoryview written to the transport, nothing else), the bare aiohttp dict server,
# redis-server and kvgate (HTTP, no shared memory), in alternating rounds of one run, with each
# server's CPU time per GET. docs/benchmarks.md ("HTTP against its floor") shows a run.
#
#   scripts/get-floor.sh [ROUNDS] [SECONDS]      # default 3 rounds x 4 s
DEFAULT_ROUNDS=3
BASE=${GET_FLOOR_BASE_PORT:-18195}
source "$(dirname "$0")/floor-rounds.sh" "$@"

start floor "$PY" -m loadtest.put_floor --port $((BASE + 2)) --get-bytes 1MiB --get-keys 64
floor=$last_pid
start dict "$PY" -m loadtest.dict_server --port $((BASE + 3))
dict=$last_pid
start kvgate "$PY" -m gateway.cli serve --port $((BASE + 1)) --data-dir "$tmp/kv" \
  --hbm-bytes 256MiB --dram-bytes 512MiB --disk-bytes 2GiB --no-shm
kvgate=$last_pid
start_redis "$BASE"
redis=$last_pid
wait_ready $((BASE + 1))

rounds hot-get "floor dict $((BASE + 2)) $floor" "dict dict $((BASE + 3)) $dict" \
  "redis redis $BASE $redis" "kvgate kvgate $((BASE + 1)) $kvgate"
