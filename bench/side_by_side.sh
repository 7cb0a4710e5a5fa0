#!/usr/bin/env bash
# llmq and an engine's own OpenAI server, side by side in one run, same
# machine, same load (the README's benchmark tables). Run from the project
# root after `make install install-engines` and `llmq demo-model`:
#   ENGINE=transformers bash bench/side_by_side.sh [CLIENTS...]   (default engine; clients 1 16 64)
#   ENGINE=vllm         bash bench/side_by_side.sh 1 16
#   ENGINE=llama.cpp    bash bench/side_by_side.sh 1 16
# The anchor: vLLM's server (../shared/anchors/vllm.sh) for transformers and
# vllm; for llama.cpp, llama-server with the anchor's arguments (16 slots,
# 16384 tokens, 2 threads) from the build `make install-engines` made (the
# anchor's own -march=native build dies with SIGILL in ggml's AMX kernel on
# an AMX CPU). Then Redis, the API and an llmq worker of that engine on
# spare ports, configured as the anchor is, and `python -m bench http`
# (streaming chat, 64 new tokens, temperature 0) against each, one system
# at a time, ROUNDS times (default 1) in alternating order; the table at the
# end gives each figure's median over the rounds (bench/sides.py). Figures:
# var/bench/$ENGINE-*-r*.json. Extra worker options go in
# LLMQ_BENCH_WORKER_ARGS (e.g. "--max-step-tokens 1024"). CLIENT=closedloop
# drives both with the independent client instead (bench/closedloop.py: 8
# short questions, REQUESTS answers, default 128, tokens counted with the
# model's tokenizer); its figures go to var/bench/$ENGINE-closedloop-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=("$@"); [ ${#CLIENTS[@]} -eq 0 ] && CLIENTS=(1 16 64)
ENGINE=${ENGINE:-transformers}
ROUNDS=${ROUNDS:-1}
CLIENT=${CLIENT:-http}; TAG=$ENGINE; [ "$CLIENT" = closedloop ] && TAG=$ENGINE-closedloop
PY=.venv/bin/python; OUT=var/bench; LOGS=var/bench/logs; mkdir -p "$LOGS"
REDIS_PORT=${REDIS_PORT:-6391}; API_PORT=${API_PORT:-8011}
DEMO=models/smollm2-135m-instruct
GGUF=$($PY -m cli.main demo-model --gguf)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

case $ENGINE in
  transformers|vllm)
    ANCHOR_PORT=${VLLM_PORT:-8003}
    curl -sf "127.0.0.1:$ANCHOR_PORT/v1/models" >/dev/null || bash ../shared/anchors/vllm.sh "$DEMO" "$ANCHOR_PORT"
    ANCHOR_NAME=vllm ;;
  llama.cpp)
    ANCHOR_PORT=${LLAMA_PORT:-8002}
    B=$(realpath .engines/llama-server)
    LD_LIBRARY_PATH=$(dirname "$B") "$B" -m "$GGUF" --host 127.0.0.1 --port "$ANCHOR_PORT" -np 16 -c 16384 -t 2 \
      --alias smollm2 > "$LOGS/llama-server.log" 2>&1 & pids+=($!)
    for _ in $(seq 1 120); do curl -sf "127.0.0.1:$ANCHOR_PORT/v1/models" >/dev/null && break; sleep 1; done
    ANCHOR_NAME=llamacpp ;;
  *) echo "ENGINE: transformers, vllm or llama.cpp" >&2; exit 2 ;;
esac

# The llmq worker, sized as its anchor: transformers and vLLM batch up to 64
# rows (32k tokens of KV cache for transformers, vLLM's 1 GiB for vllm);
# llama.cpp gets the anchor's 16 slots over 16384 tokens.
case $ENGINE in
  transformers) WORKER=(--model-path "$DEMO" --concurrency 64 --kv-cache-tokens 32768) ;;
  vllm)         WORKER=(--engine vllm --model-path "$DEMO" --concurrency 64 --dtype float32) ;;
  llama.cpp)    WORKER=(--engine llama.cpp --model-path "$GGUF" --concurrency 16 --kv-cache-tokens 16384) ;;
esac

export LLMQ_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0 LLMQ_MAX_QUEUE_DEPTH=1024
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$LOGS/redis.log" 2>&1 & pids+=($!)
sleep 0.5
$PY -m cli.main api --port "$API_PORT" --log-level warning > "$LOGS/api.log" 2>&1 & pids+=($!)
# shellcheck disable=SC2086
$PY -m cli.main worker --model-name smollm2 "${WORKER[@]}" ${LLMQ_BENCH_WORKER_ARGS:-} \
  > "$LOGS/worker-$ENGINE.log" 2>&1 & pids+=($!)
for _ in $(seq 1 900); do curl -sf "127.0.0.1:$API_PORT/v1/models" | grep -q smollm2 && break; sleep 1; done

for c in "${CLIENTS[@]}"; do
  n=$((c * 8)); [ "$c" -lt 3 ] && n=24
  for r in $(seq 0 $((ROUNDS - 1))); do
    order=(llmq "$ANCHOR_NAME"); [ $((r % 2)) -eq 1 ] && order=("$ANCHOR_NAME" llmq)
    for sys in "${order[@]}"; do
      port=$API_PORT; [ "$sys" != llmq ] && port=$ANCHOR_PORT
      echo "== $sys ($ENGINE), $c client(s), $n requests, round $((r + 1)) of $ROUNDS"
      if [ "$CLIENT" = closedloop ]; then
        $PY -m bench.closedloop --base-url "http://127.0.0.1:$port/v1" --model smollm2 --concurrency "$c" \
          --requests "${REQUESTS:-128}" --tokenizer "$DEMO" --json "$OUT/$TAG-$sys-c$c-r$r.json"
      else
        $PY -m bench http --base-url "http://127.0.0.1:$port/v1" --model smollm2 --concurrency "$c" --requests "$n" \
          --max-tokens 64 --temperature 0 --json "$OUT/$TAG-$sys-c$c-r$r.json" | grep -E "tokens/s|TTFT|ITL|errors"
      fi
    done
  done
done
$PY -m bench.sides "$TAG" "$ANCHOR_NAME" "${CLIENTS[@]}" --rounds "$ROUNDS"
