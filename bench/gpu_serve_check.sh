#!/usr/bin/env bash
# The unattended GPU check of the API server's batching (issue 18): LLaMA-13B's shape with random bf16
# weights behind code/api_server.py, 1, 16 and 64 concurrent clients (bench/bench_serve.py --shape 13b).
#
#     OUT=/some/folder bash bench/gpu_serve_check.sh        # from the repo root, or anywhere
#
# 1. installs the wheels carried in .whl/ (bench/gpu_setup.sh; the server needs fastapi, uvicorn and
#    httpx besides torch and transformers) and prints the versions;
# 2. writes the random weights once (26 GB under $WEIGHTS, default /tmp/serve_13b, removed at the end),
#    starts the server on them (its output: $OUT/server.log) and measures 1, 16 and 64 clients, 4
#    streamed requests of 64 tokens each, 3 rounds -> $OUT/bench_serve_13b.json; the goal is 64 clients
#    at 10x or more the tokens/s of one.
# Expected wall time on an H200: 4-6 minutes (weights 1-2, server start 1, rounds 1-2); cut at 480 s.
# Exit status: that of bench_serve.py (0 measured, 1/2 a failure it names, 124 cut by the time limit).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bench_serve_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
# shellcheck source=gpu_setup.sh
source bench/gpu_setup.sh
WEIGHTS=${WEIGHTS:-/tmp/serve_13b}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run() {
    gpu_setup bench_serve.py torch transformers accelerate safetensors fastapi uvicorn httpx sentencepiece tokenizers
    echo "== 13B shape behind the API server: 1, 16 and 64 clients"
    timeout -k 15 480 "$PY" bench/bench_serve.py --shape 13b --weights_dir "$WEIGHTS" --clients 1,16,64 \
        --server_log "$OUT/server.log" --json "$OUT/bench_serve_13b.json"
    local rc=$?
    echo "== exit status: $rc"
    rm -rf "$WEIGHTS"
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
    echo "== done $(date -u '+%F %T') UTC"
    return "$rc"
}

run 2>&1 | tee "$OUT/log"
exit "${PIPESTATUS[0]}"
