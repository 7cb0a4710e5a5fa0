#!/usr/bin/env bash
# llmq and vLLM's CPU build, side by side in one run, same machine, same load
# (the README's benchmark table). Run from the project root after `make install`
# and `llmq demo-model`:
#   bash bench/side_by_side.sh [CLIENTS...]        (default: 1 16 64)
# Starts vLLM with ../shared/anchors/vllm.sh (first start builds its venv and
# compiles for minutes; it is left running, stop it with the line that script
# prints), then Redis, the API and a worker of llmq on spare ports, and runs
# `python -m bench http` (streaming chat, 64 new tokens, temperature 0)
# against each, one system at a time. Figures: var/bench/*.json.
# Worker options go in LLMQ_BENCH_WORKER_ARGS (e.g. "--max-step-tokens 1024").
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=("$@"); [ ${#CLIENTS[@]} -eq 0 ] && CLIENTS=(1 16 64)
PY=.venv/bin/python; OUT=var/bench; LOGS=var/bench/logs; mkdir -p "$LOGS"
VLLM_PORT=${VLLM_PORT:-8003}; REDIS_PORT=${REDIS_PORT:-6391}; API_PORT=${API_PORT:-8011}
ANCHOR=${ANCHOR:-../shared/anchors/vllm.sh}

curl -sf "127.0.0.1:$VLLM_PORT/v1/models" >/dev/null || bash "$ANCHOR" models/smollm2-135m-instruct "$VLLM_PORT"

export LLMQ_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0 LLMQ_MAX_QUEUE_DEPTH=1024
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$LOGS/redis.log" 2>&1 & pids+=($!)
sleep 0.5
$PY -m cli.main api --port "$API_PORT" --log-level warning > "$LOGS/api.log" 2>&1 & pids+=($!)
# A batch of 64 rows, so 64 clients are batched as vLLM batches them; 32k tokens of KV cache.
# shellcheck disable=SC2086
$PY -m cli.main worker --model-path models/smollm2-135m-instruct --model-name smollm2 --concurrency 64 \
  --kv-cache-tokens 32768 ${LLMQ_BENCH_WORKER_ARGS:-} > "$LOGS/worker.log" 2>&1 & pids+=($!)
for _ in $(seq 1 180); do curl -sf "127.0.0.1:$API_PORT/v1/models" | grep -q smollm2 && break; sleep 1; done

for c in "${CLIENTS[@]}"; do
  n=$((c * 4)); [ "$c" -lt 4 ] && n=6
  for sys in llmq vllm; do
    port=$API_PORT; [ $sys = vllm ] && port=$VLLM_PORT
    echo "== $sys, $c client(s), $n requests"
    $PY -m bench http --base-url "http://127.0.0.1:$port/v1" --model smollm2 --concurrency "$c" --requests "$n" \
      --max-tokens 64 --temperature 0 --json "$OUT/$sys-c$c.json" | grep -E "tokens/s|TTFT|ITL|errors"
  done
done
