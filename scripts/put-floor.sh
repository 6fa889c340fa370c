#!/usr/bin/env bash
# PUT of 1 MiB blocks, 16 clients: the floor server (loadtest/put_floor.py), the bare aiohttp
# dict server, redis-server and kvgate with disk_shed (bodies adopted from the arena's landing
# pages, and copied in as before), in alternating rounds of one run, with
# each server's CPU time per PUT. docs/perf.md, "The floor for PUT", shows a run.
#
#   scripts/put-floor.sh [ROUNDS] [SECONDS]      # default 5 rounds x 4 s
DEFAULT_ROUNDS=5
BASE=${PUT_FLOOR_BASE_PORT:-18095}
source "$(dirname "$0")/floor-rounds.sh" "$@"

start floor "$PY" -m loadtest.put_floor --port $((BASE + 2))
floor=$last_pid
start dict "$PY" -m loadtest.dict_server --port $((BASE + 3))
dict=$last_pid
start kvgate env KVGATE_DISK_SHED=true "$PY" -m gateway.cli serve --port $((BASE + 1)) \
  --data-dir "$tmp/kv" --hbm-bytes 256MiB --dram-bytes 512MiB --disk-bytes 2GiB --no-shm
kvgate=$last_pid
# The same, with every body copied in from a buffer instead of adopted from the arena's
# landing pages: what receiving in place is worth, in the same run.
start kvgate-copy env KVGATE_DISK_SHED=true KVGATE_LANDING_BYTES=0 "$PY" -m gateway.cli serve \
  --port $((BASE + 4)) --data-dir "$tmp/kv-copy" --hbm-bytes 256MiB --dram-bytes 512MiB \
  --disk-bytes 2GiB --no-shm
kvcopy=$last_pid
start_redis "$BASE"
redis=$last_pid
wait_ready $((BASE + 1)) $((BASE + 4))

rounds put "floor dict $((BASE + 2)) $floor" "dict dict $((BASE + 3)) $dict" \
  "redis redis $BASE $redis" "kvgate-shed kvgate $((BASE + 1)) $kvgate" \
  "kvgate-shed-copy kvgate $((BASE + 4)) $kvcopy"
