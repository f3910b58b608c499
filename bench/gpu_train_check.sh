#!/usr/bin/env bash
# The unattended GPU check of finetune.py's training step (bench/bench_train.py), for one H200.
#
#     OUT=/some/folder bash bench/gpu_train_check.sh        # from the repo root, or anywhere
#
# 1. installs the wheels carried in .whl/ (if any) into $SITE (default /tmp/site), offline, and puts it on PYTHONPATH
#    deepspeed needs at import: hjson, msgpack, einops, pydantic (+ pydantic-core, annotated-types,
#    typing-inspection), psutil, tqdm, packaging, numpy (the last four come with peft/transformers);
#    ninja and py-cpuinfo only for DeepSpeed's compiled ops, which this LoRA config does not use;
# 2. prints nvidia-smi, the Python / torch / CUDA / package versions;
# 3. a smoke run: tiny shape on the GPU, bf16 (seconds; catches a broken install before the big run);
# 4. the measurement: 13B shape, 2 x 2048 tokens, bf16, LoRA, 2 warm-up + 6 timed steps per variant, most
#    informative first within one constraint (liger-kernel patches transformers' LLaMA for the rest of the
#    process, so the liger variants come last):
#      plain                     SDPA + dense block mask: the loss reference
#      flex                      FlexAttention BlockMask
#      flex_checkpointing        the same with checkpointing
#      checkpointing             SDPA with checkpointing
#      liger_flex                + liger's fused RMSNorm/SwiGLU/RoPE/linear cross-entropy (needs liger-kernel)
#      liger_flex_checkpointing  the same with checkpointing
#      liger                     liger with SDPA: what the kernels alone bring
#    -> $OUT/bench_train_13b.json.  Not in the list, to stay within ~7 minutes: qlora_nf4 (~1-2 min for saving
#    and loading the 26 GB of random weights), loss_unchunked, liger_kernels_flex (liger without its fused
#    cross-entropy); run them with --variants in a later session.
# Everything printed also goes to $OUT/log.  Expected wall time on an H200: 3-5 minutes (model built on the
# GPU in ~5-30 s per variant, ~1 s per step; the first flex variant compiles FlexAttention's Triton kernels,
# ~30-60 s, and the first liger one liger's); time-outs of 90 s (smoke) and 330 s (13B) below bound it at
# 7 minutes; the JSON is rewritten after each variant, so a time-out keeps what was measured.  A variant that
# cannot run (liger-kernel not installed: carry its wheel in .whl/) is recorded as skipped with the reason.
# Exit status: that of the 13B run (0 ok, 1 a variant failed or changed the loss, 2 missing
# package / no GPU, 124 timed out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bench_train_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
# shellcheck source=gpu_setup.sh
source bench/gpu_setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run() {
    gpu_setup bench_train.py torch transformers peft deepspeed accelerate safetensors hjson ninja py-cpuinfo msgpack einops pydantic pydantic-core psutil packaging numpy tqdm bitsandbytes flash-attn liger-kernel torchao nvidia-ml-py
    echo "== smoke: tiny shape on the GPU"
    timeout -k 10 90 "$PY" bench/bench_train.py --shape tiny --steps 2 --warmup 1 \
        --json "$OUT/bench_train_tiny_gpu.json"
    echo "== smoke exit status: $?"
    echo "== 13B shape: train_step.train_step, 2 x 2048 tokens"
    timeout -k 15 330 "$PY" bench/bench_train.py --shape 13b --steps 6 --warmup 2 \
        --variants plain,flex,flex_checkpointing,checkpointing,liger_flex,liger_flex_checkpointing,liger \
        --json "$OUT/bench_train_13b.json"
    local rc=$?
    echo "== 13B exit status: $rc"
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
    echo "== done $(date -u '+%F %T') UTC"
    return $rc
}

run 2>&1 | tee "$OUT/log"
exit "${PIPESTATUS[0]}"
