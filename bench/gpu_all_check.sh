#!/usr/bin/env bash
# One unattended run of the most telling GPU measurements of all three benchmarks, for a session whose
# device time allows a single command (the device tool allows 10 minutes a command, 15 minutes a session
# with the machine's start-up included; bench/gpu_infer_check.sh and bench/gpu_train_check.sh together
# need up to 15 minutes).
#
#     OUT=/some/folder bash bench/gpu_all_check.sh        # from the repo root, or anywhere
#
# 1. installs the wheels carried in .whl/ once (bench/gpu_setup.sh) and prints the versions;
# 2. inference (issue 9), 13B shape, 512-token prompts, batch 1: int8_fast (torchao int8 weight-only +
#    static cache + CUDA graphs), bf16_fast and bf16 (plain: the fast path's pay-off is counted against it)
#    -> $OUT/bench_infer_13b_fast.json                                                (cut at 230 s);
# 3. training (issue 8), 13B shape, 2 x 2048, 2 warm-up + 4 timed steps: plain, flex, flex_checkpointing,
#    liger_flex, liger_flex_checkpointing -> $OUT/bench_train_13b.json              (cut at 230 s);
# 4. conversion (issue 2) on the host's CPU cores: bench_convert.py, 20,000 dialogues, default --threads
#    -> $OUT/bench_convert_host.json                                                  (cut at 60 s).
# No tiny-shape smoke runs: a broken install fails the first 13B step within seconds, with the reason.
# Left for the full scripts: inference at batch 8 and the bitsandbytes baselines (gpu_infer_check.sh),
# training's checkpointing/liger-alone/qlora_nf4 variants (gpu_train_check.sh), conversion repeats
# (host_convert_check.sh).  Expected wall time on an H200: 7-9 minutes; the caps bound it at 8.7 minutes
# plus set-up (give the device call a 590 s limit).  Every JSON is rewritten after each variant, so a cut keeps what was measured.
# Exit status: 0 when all three succeeded, else that of the first that did not (1 a variant failed or
# changed the loss / ids differ, 2 missing package or no GPU, 124 cut by its time limit).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bench_all_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
# shellcheck source=gpu_setup.sh
source bench/gpu_setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {   # step NAME SECONDS COMMAND...: run it under a time limit, print and keep its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (cut at $limit s): $*"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@"
    local rc=$?
    echo "== $name: exit status $rc after $((SECONDS - start)) s"
    if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
}

run() {
    status=0
    gpu_setup bench_train.py torch transformers peft deepspeed accelerate safetensors hjson pydantic \
        bitsandbytes torchao liger-kernel triton sentencepiece tokenizers numpy
    step "inference, 13B, batch 1" 230 "$PY" bench/bench_infer.py --shape 13b --variants int8_fast,bf16_fast,bf16 \
        --batch_sizes 1 --json "$OUT/bench_infer_13b_fast.json"
    step "training, 13B, 2 x 2048" 230 "$PY" bench/bench_train.py --shape 13b --steps 4 --warmup 2 \
        --variants plain,flex,flex_checkpointing,liger_flex,liger_flex_checkpointing --json "$OUT/bench_train_13b.json"
    echo "== cores: nproc $(nproc), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    step "conversion on the host CPU" 60 "$PY" bench/bench_convert.py --dialogues "${DIALOGUES:-20000}" \
        --json "$OUT/bench_convert_host.json"
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
    echo "== done $(date -u '+%F %T') UTC"
    return "$status"
}

run 2>&1 | tee "$OUT/log"
exit "${PIPESTATUS[0]}"
