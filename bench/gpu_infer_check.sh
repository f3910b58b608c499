#!/usr/bin/env bash
# The unattended GPU check of inference.py's generation path (bench/bench_infer.py), for one H200.
#
#     OUT=/some/folder bash bench/gpu_infer_check.sh        # from the repo root, or anywhere
#
# 1. installs the wheels carried in .whl/ (if any; e.g. torchao, bitsandbytes) into $SITE (default
#    /tmp/site), offline, and puts it on PYTHONPATH;
# 2. prints nvidia-smi, the Python / torch / CUDA / package versions;
# 3. a smoke run: tiny shape on the GPU, bf16 plain and --fast (compiles; catches a broken install);
# 4. 13B shape, 512-token prompts, 64 new tokens, batch 1 and 8: int8_fast (torchao int8 weight-only +
#    static cache + CUDA graphs, the weights built on the GPU and quantized in memory as the loader does),
#    bf16_fast, bf16 (plain) -> $OUT/bench_infer_13b_fast.json;
# 5. 13B shape, the bitsandbytes baselines through the loader: int8 (the faithful default) and nf4, batch 1,
#    32 new tokens; saves the random weights once (26 GB, under $WEIGHTS, default
#    /tmp/bench_infer_weights, removed at the end) -> $OUT/bench_infer_13b_bnb.json.
# Everything printed also goes to $OUT/log.  The time-outs (60 s smoke, 270 s fast variants, 180 s
# bitsandbytes) bound the run near 8.5 minutes (BENCHMARKS.md has the measured times); each JSON is
# rewritten after each variant, so a time-out keeps what was measured.  A missing package (torchao, bitsandbytes) is named by bench_infer.py
# (exit 2) and the other step still runs.
# Exit status: 0 when both 13B runs succeeded, else that of the first that did not (1 a variant failed,
# 2 missing package / no GPU, 124 timed out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bench_infer_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
# shellcheck source=gpu_setup.sh
source bench/gpu_setup.sh
WEIGHTS=${WEIGHTS:-/tmp/bench_infer_weights}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run() {
    gpu_setup bench_infer.py torch transformers accelerate safetensors peft bitsandbytes torchao sentencepiece tokenizers numpy triton
    echo "== smoke: tiny shape on the GPU, bf16 plain and fast"
    timeout -k 10 60 "$PY" bench/bench_infer.py --shape tiny --device cuda --variants bf16,bf16_fast \
        --batch_sizes 1 --new_tokens 8 --json "$OUT/bench_infer_tiny_gpu.json"
    echo "== smoke exit status: $?"
    echo "== 13B shape: fast paths and bf16 plain, batch 1 and 8"
    timeout -k 15 270 "$PY" bench/bench_infer.py --shape 13b --variants int8_fast,bf16_fast,bf16 \
        --batch_sizes 1,8 --json "$OUT/bench_infer_13b_fast.json"
    local rc_fast=$?
    echo "== 13B fast exit status: $rc_fast"
    echo "== 13B shape: bitsandbytes int8 (default) and nf4 through the loader, batch 1"
    timeout -k 15 180 "$PY" bench/bench_infer.py --shape 13b --variants int8,nf4 --batch_sizes 1 \
        --new_tokens 32 --weights_dir "$WEIGHTS" --json "$OUT/bench_infer_13b_bnb.json"
    local rc_bnb=$?
    echo "== 13B bitsandbytes exit status: $rc_bnb"
    rm -rf "$WEIGHTS"
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
    echo "== done $(date -u '+%F %T') UTC"
    if [ "$rc_fast" -ne 0 ]; then return "$rc_fast"; fi
    return "$rc_bnb"
}

run 2>&1 | tee "$OUT/log"
exit "${PIPESTATUS[0]}"
