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
# 4. the measurement: 13B shape, 2 x 2048 tokens, bf16, LoRA, variants plain, checkpointing, loss_unchunked
#    (the whole logits at once, against the chunked default) and qlora_nf4 (needs bitsandbytes; saves the
#    random weights once, ~26 GB, to load them quantized), 2 warm-up + 6 timed steps each ->
#    $OUT/bench_train_13b.json.
# Everything printed also goes to $OUT/log.  Expected wall time on an H200: 2-4 minutes (model
# built on the GPU in ~10-30 s per variant, ~1 s per step; qlora_nf4 adds ~1-2 min for saving and loading the
# weights); time-outs of 90 s (smoke) and 480 s (13B) below bound it near 10 minutes; the JSON is rewritten after each
# variant, so a time-out keeps what was measured.
# Exit status: that of the 13B run (0 ok, 1 a variant failed or changed the loss, 2 missing
# package / no GPU, 124 timed out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bench_train_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run() {
    echo "== $(date -u '+%F %T') UTC, $(hostname), repo $(pwd)"
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "== installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
            # one wheel for another Python/platform fails the whole batch: install the others one by one
            echo "!! batch install failed; installing the wheels one by one"
            for wheel in .whl/*.whl; do
                "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" \
                    || echo "!! skipped $(basename "$wheel") (bench_train.py names what is missing)"
            done
        fi
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "== no .whl/ folder: using the installed packages"
    fi
    echo "== nvidia-smi"
    nvidia-smi || echo "!! nvidia-smi failed"
    echo "== versions"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "peft", "deepspeed", "accelerate", "safetensors", "hjson", "ninja",
             "py-cpuinfo", "msgpack", "einops", "pydantic", "pydantic-core", "psutil", "packaging", "numpy",
             "tqdm", "bitsandbytes", "flash-attn", "liger-kernel", "torchao", "nvidia-ml-py"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} not installed")
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    print("sdpa backends: flash", torch.backends.cuda.flash_sdp_enabled(), "mem_efficient",
          torch.backends.cuda.mem_efficient_sdp_enabled(), "math", torch.backends.cuda.math_sdp_enabled())
except Exception as e:
    print("!! torch:", type(e).__name__, e)
EOF
    echo "== smoke: tiny shape on the GPU"
    timeout -k 10 90 "$PY" bench/bench_train.py --shape tiny --steps 2 --warmup 1 \
        --json "$OUT/bench_train_tiny_gpu.json"
    echo "== smoke exit status: $?"
    echo "== 13B shape: finetune.train_step, 2 x 2048 tokens"
    timeout -k 15 480 "$PY" bench/bench_train.py --shape 13b --steps 6 --warmup 2 \
        --variants plain,checkpointing,loss_unchunked,qlora_nf4 --json "$OUT/bench_train_13b.json"
    local rc=$?
    echo "== 13B exit status: $rc"
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
    echo "== done $(date -u '+%F %T') UTC"
    return $rc
}

run 2>&1 | tee "$OUT/log"
exit "${PIPESTATUS[0]}"
