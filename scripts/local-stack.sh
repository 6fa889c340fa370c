#!/usr/bin/env bash
# The compose topology as local processes, for hosts without a Docker engine: one redis-server
# and two gateways sharing it (`kvgate serve --remote`), acting as one cache. Ctrl-C stops all.
#
#   scripts/local-stack.sh                 # gateways on 127.0.0.1:8080 and :8081, redis on :6379
#   KVGATE_STACK_DIR=/tmp/stack PORT_A=9080 PORT_B=9081 REDIS_PORT=7379 scripts/local-stack.sh
#
# OTLP export follows the usual OTEL_* variables (point OTEL_EXPORTER_OTLP_ENDPOINT at a
# collector if you run one); Prometheus can scrape http://127.0.0.1:PORT/metrics of each gateway.
set -euo pipefail
cd "$(dirname "$0")/.."

STACK_DIR=${KVGATE_STACK_DIR:-./data/stack}
PORT_A=${PORT_A:-8080}
PORT_B=${PORT_B:-8081}
REDIS_PORT=${REDIS_PORT:-6379}
KVGATE=${KVGATE:-.venv/bin/kvgate}

command -v redis-server >/dev/null || { echo "redis-server missing: scripts/system-deps.sh" >&2; exit 1; }
[ -x "$KVGATE" ] || { echo "$KVGATE missing: run 'make run' or 'make test' once" >&2; exit 1; }
mkdir -p "$STACK_DIR/redis" "$STACK_DIR/a" "$STACK_DIR/b"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# noeviction: the remote tier keeps its own budget (--remote-bytes) and LRU; Redis must not
# drop its keys behind its back. Give Redis more memory than the budget.
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
  --maxmemory 6gb --maxmemory-policy noeviction --dir "$STACK_DIR/redis" &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

REMOTE="redis://127.0.0.1:$REDIS_PORT/0"
"$KVGATE" serve --port "$PORT_A" --data-dir "$STACK_DIR/a" --remote "$REMOTE" --remote-bytes 4GiB &
pids+=($!)
"$KVGATE" serve --port "$PORT_B" --data-dir "$STACK_DIR/b" --remote "$REMOTE" --remote-bytes 4GiB &
pids+=($!)
echo "local stack: http://127.0.0.1:$PORT_A and http://127.0.0.1:$PORT_B share $REMOTE (Ctrl-C stops)"
wait -n
