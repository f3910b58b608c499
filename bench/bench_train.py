"""Training speed of finetune.py's own LoRA step: tokens/s, TFLOP/s, peak memory, real-token share.

    # CPU, tiny shape (config.TINY_MODEL): what CI runs, well under a minute
    python bench/bench_train.py --shape tiny --steps 3 --warmup 1 --json /tmp/bench_train_tiny.json

    # one GPU, the CuteGPT-13B shape (LLaMA-13B + 49,954-token vocabulary), bf16, 2 x 2048 tokens
    python bench/bench_train.py --shape 13b --steps 6 --warmup 2 --json bench_train_13b.json

    # the unattended GPU check (installs carried wheels, prints versions, runs the line above)
    OUT=/tmp/out bash bench/gpu_train_check.sh

What is timed is code/finetune.py itself, not a copy of it:

- the arguments are ``finetune.parse_args([...])`` of the flags a LoRA run would get (--use_lora
  --max_length --micro_batch_size --grad_accum --precision, plus the variant's own flags such as
  --gradient_checkpointing, --attention flex or --liger);
- ``distributed.init_distributed`` (one process, no launcher); ``finetune.training_settings`` (precision,
  ``distributed.resolve_ds_config``: config.DS_CONFIG_lora with those overrides, the attention kernel and
  liger checks); ``finetune.load_train_dataset`` (dataset.DatasetIds over an ids file in convert_data.py's
  format) and the sampler and ``finetune.epoch_batches`` of ``finetune.main``; ``finetune.build_model``
  (use_cache off, peft LoRA with config.py's r/alpha/targets, gradient checkpointing with
  use_reentrant=False); ``train_step.make_engine`` (deepspeed.initialize with that config); and
  ``train_step.train_step`` (block-diagonal causal mask for SDPA, summed loss / learned tokens,
  engine.backward + engine.step) for every timed step.

Two things differ from a real run, both outside the timed step:

- weights: build_model gets a ``base_model`` made by ``AutoModelForCausalLM.from_config`` of the
  shape's config (written as a config-only model directory in a temporary folder) with random weights,
  created directly on the target device in the dtype finetune would load (bf16 on a GPU; fp32 on a CPU
  unless --precision says otherwise).
  Speed does not depend on weight values, and nothing of 26 GB is written or read;
- data: the rows are random token ids in synthetic samples (a question of 4..S/16 tokens, not learned,
  then an answer of 8..S/2 tokens, log-uniform, learned, then eos), packed by ``packing.pack_samples``
  exactly as convert_data.py packs (a pool of at least 4x the rows used), and written as a small ids
  .pkl.  So rows hold several samples, position ids restart per sample and the block mask path runs;
  the share of real (non-pad) tokens of the timed rows is reported.

Variants (--variants, each in a fresh model and engine, memory freed in between) run on identical
rows with identical seeds, so their losses must agree: a lever that changes speed or memory must not
change the loss.  The per-step losses of every variant are compared with the first variant of the
same --lora_dropout; a difference above --loss_tol makes the script exit 1 (after the table and JSON).
The default tolerance depends on the precision (LOSS_TOL): 1e-3 in fp32, where the CPU variants agree
exactly; 2e-2 in bf16/fp16, where kernels that round differently (FlexAttention, liger's fused kernels)
and even activation recomputation move the 13B step loss of ~11.9 by a few 1e-3.  A variant that cannot
run here (FlexAttention or liger-kernel on a CPU, a package that is not installed) is recorded as skipped
with the reason.  liger-kernel patches transformers'
LLaMA module for the whole process, so liger variants must come after all others in --variants.

Figures (after --warmup untimed steps; GPU work is synchronised before each clock read):

- tokens/s: real (non-pad) tokens of the timed steps / their wall time; "all tok/s" counts pad too;
- TFLOP/s: FLOPs per processed position (pad included: the GPU computes them) x positions / time,
  with the formula printed; "model" leaves out activation recomputation, "hw" adds it;
  "baseline formula" is the formula of gpu_anchors.py (in shared/bench/ beside the repo), for a
  like-for-like comparison with its H200 figures;
- peak memory: torch.cuda.max_memory_allocated() since the variant's model was built (weights
  included) on a GPU; on a CPU the process's peak resident set (getrusage), which only ever grows,
  so later variants' figures include earlier ones.

After the variants, one layer's attention alone (forward + backward, the run's shape and dtype) is
timed twice: the causal kernel without a mask (what training without packing gets) and SDPA with
finetune's block-diagonal mask; on a GPU also with each SDPA backend forced.  It shows what the
mask costs.  A variant that fails (out of memory, say) is recorded with its error and the next one
still runs (exit 1 at the end); the JSON is rewritten after every variant, so a time-out keeps what
was measured.  Defaults: --seq_len 2048 for 13b and 512 for tiny, micro-batch 2, one micro-batch
per optimizer step (--grad_accum 1, as the baseline), variants plain and checkpointing.
"""
import argparse
import logging
import math
import os
import random
import sys
import tempfile
import time
import traceback
import weakref

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

import bench_common  # noqa: E402
import data_io  # noqa: E402
import dataset  # noqa: E402
import distributed  # noqa: E402
import finetune  # noqa: E402
import model_loader  # noqa: E402
import packing  # noqa: E402
import train_figures  # noqa: E402
import train_step  # noqa: E402
from attention_probe import attention_probe, say_probe  # noqa: E402
from bench_common import free_memory, reset_peak, say, shape_of, sync, write_json  # noqa: E402

# each variant is a set of finetune.py flags; checkpointing must not change the loss
VARIANTS = {
    "plain": [],
    "checkpointing": ["--gradient_checkpointing"],
    "flash": ["--attention", "flash"],
    "flash_checkpointing": ["--attention", "flash", "--gradient_checkpointing"],
    # FlexAttention with the block-diagonal BlockMask (CUDA only: no backward pass on a CPU)
    "flex": ["--attention", "flex"],
    "flex_checkpointing": ["--attention", "flex", "--gradient_checkpointing"],
    # liger-kernel (CUDA + the package): fused RMSNorm, SwiGLU, RoPE and linear cross-entropy ...
    "liger": ["--liger"],
    "liger_checkpointing": ["--liger", "--gradient_checkpointing"],
    "liger_flex": ["--liger", "--attention", "flex"],
    "liger_flex_checkpointing": ["--liger", "--attention", "flex", "--gradient_checkpointing"],
    # ... or without the fused cross-entropy (the chunked loss of --loss_chunk instead)
    "liger_kernels_flex": ["--liger", "kernels", "--attention", "flex"],
    "no_lora_dropout": ["--lora_dropout", "0"],
    # the output layer and loss over all learned positions at once (the default computes them in chunks of
    # config.LOSS_CHUNK_TOKENS positions, recomputed in backward)
    "loss_unchunked": ["--loss_chunk", "0"],
    # QLoRA: the frozen base quantized by bitsandbytes, loaded through finetune.build_model's own path
    "qlora_nf4": ["--quant", "nf4", "--gradient_checkpointing"],
    "qlora_int8": ["--quant", "int8", "--gradient_checkpointing"],
}
# default --loss_tol by precision: fp32 variants agree exactly on the CPU; bf16 keeps 8 bits of mantissa
# (a relative step of 2^-8 = 0.4%), and kernels that round differently (activation recomputation included)
# move the mean loss of a 13B step (~11.9, over ~4k tokens) by a few 1e-3
LOSS_TOL = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}
DEFAULT_VARIANTS = "plain,checkpointing"

REQUIRED = ("torch", "transformers", "peft", "deepspeed")
OPTIONAL = ("bitsandbytes", "flash_attn", "liger_kernel", "torchao")


def check_packages():
    """Import what the step needs; name any missing package (and what it is missing) and exit 2.

    The optional packages are only looked up (their installed version), not imported.
    """
    versions, missing = {}, []
    for name in REQUIRED:
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "installed")
        except Exception as e:  # ImportError, or a broken install raising something else
            versions[name] = None
            missing.append(f"{name} ({type(e).__name__}: {e})")
    versions.update((name, bench_common.installed_version(name)) for name in OPTIONAL)
    bench_common.say_versions(versions)
    if missing:
        data_io.fail(
            "cannot run finetune.py's training step without: " + "; ".join(missing) + ".  Install it (pip install "
            "-r requirements.txt; deepspeed also needs hjson, ninja, py-cpuinfo, msgpack, einops, pydantic, psutil) "
            "and re-run.")
    return versions


# ----------------------------------------------------------------------------------------------
# model directory and synthetic data
# ----------------------------------------------------------------------------------------------
def write_config_dir(shape, seq_len, directory):
    """A config-only model directory (config.json) of the shape: what --model_path points at."""
    bench_common.llama_config(shape, max(shape["max_position_embeddings"], seq_len)).save_pretrained(directory)
    return directory


def synthetic_samples(rng, vocab_size, seq_len, total_tokens, eos_id=2):
    """(input_ids, labels) samples: a question (not learned), an answer and eos (learned)."""
    samples, tokens = [], 0
    low_id = 3  # <unk>, <s>, </s> are 0, 1, 2
    while tokens < total_tokens:
        q = rng.randint(4, max(4, seq_len // 16))
        a = int(math.exp(rng.uniform(math.log(8), math.log(max(9, seq_len // 2)))))
        a = max(1, min(a, seq_len - q - 1))
        ids = [rng.randrange(low_id, vocab_size) for _ in range(q + a)] + [eos_id]
        labels = [-100] * q + ids[q:]
        samples.append((ids, labels))
        tokens += len(ids)
    return samples


def write_ids_file(path, shape, seq_len, rows_needed, seed):
    """Packed synthetic rows in convert_data.py's ids-file format (read back by dataset.DatasetIds)."""
    rng = random.Random(seed)
    # a pool of rows larger than the run needs, as a real data set is: best-fit packing then fills
    # rows as convert_data.py's does; the sampler draws the run's rows from the whole pool
    pool_rows = max(4 * rows_needed, 32)
    samples = synthetic_samples(rng, shape["vocab_size"], seq_len, int(pool_rows * seq_len * 0.97))
    packed = packing.pack_samples(samples, seq_len, pad_token_id=2)
    while len(packed["input_ids"]) < rows_needed:   # the sampler draws from all rows: keep a few spare
        samples += synthetic_samples(rng, shape["vocab_size"], seq_len, seq_len)
        packed = packing.pack_samples(samples, seq_len, pad_token_id=2)
    datas = dict(packed, format=dataset.IDS_FORMAT,
                 meta={"max_length": seq_len, "synthetic": "bench/bench_train.py", "samples": len(samples),
                       "seed": seed, "tokenizer": None, "special_end_token": False})
    data_io.atomic_write_pickle(path, datas)
    real = sum(sum(m) for m in packed["attention_mask"])
    return {"rows": len(packed["input_ids"]), "samples": len(samples),
            "real_token_share_all_rows": real / (len(packed["input_ids"]) * seq_len)}


# ----------------------------------------------------------------------------------------------
# one variant
# ----------------------------------------------------------------------------------------------
def variant_args(name, opts, model_dir, data_path):
    """finetune.py's arguments for a LoRA run with the variant's flags."""
    return finetune.parse_args(
        ["--use_lora", "--model_path", model_dir, "--data_path", data_path, "--dataset_type", "DatasetIds",
         "--max_length", str(opts.seq_len), "--micro_batch_size", str(opts.micro_batch_size),
         "--grad_accum", str(opts.grad_accum), "--precision", opts.precision, "--seed", str(opts.seed),
         "--no_progress"] + VARIANTS[name])


def unavailable(args, device):
    """Why the variant cannot run here (finetune's own checks, a missing package), or None; else its settings."""
    try:
        settings = finetune.training_settings(args, device)
    except model_loader.LoaderError as e:
        return str(e), None
    attn, attn_note = settings[3], settings[4]
    if args.attention == "flash" and attn != "flash_attention_2":
        return attn_note, settings
    if args.quant != "none" and not model_loader.bitsandbytes_available():
        return f"--quant {args.quant} needs bitsandbytes, which is not installed (pip install bitsandbytes)", settings
    return None, settings


def variant_model(args, model_dir, device, dtype, attn):
    """finetune.build_model around random weights of the shape (built on the device, or saved once and
    loaded where bitsandbytes quantizes while loading)."""
    if args.quant != "none":
        bench_common.save_random_weights(model_dir, device, dtype, args.seed, attn)
        torch.manual_seed(args.seed)
        return finetune.build_model(args, None, dtype, attn, device=device)
    base_model = bench_common.random_model(model_dir, device, dtype, attn)
    return finetune.build_model(args, None, dtype, attn, base_model=base_model)


def time_steps(name, engine, groups, opts, device, world_size):
    """Run warm-up + timed optimizer steps with train_step.train_step; per-step losses, seconds, tokens."""
    steps, out = opts.warmup + opts.steps, {"losses": [], "step_seconds": [], "real_tokens": [], "positions": []}
    for step in range(steps):
        group = next(groups)
        sync(device)
        start = time.perf_counter()
        loss, real_tokens = train_step.train_step(engine, group, device, world_size)
        sync(device)
        out["step_seconds"].append(time.perf_counter() - start)
        out["losses"].append(loss)
        out["real_tokens"].append(real_tokens)
        out["positions"].append(sum(int(b["input_ids"].numel()) for b in group))
        say(f"[{name}] step {step + 1}/{steps}{' (warm-up)' if step < opts.warmup else ''}: "
            f"loss {loss:.6f}, {out['step_seconds'][-1]:.3f} s, {real_tokens} real tokens")
    return out


def run_variant(name, opts, shape, model_dir, data_path, device, world_size):
    """One variant in a fresh model and engine: finetune's setup, data and step; returns (result, DeepSpeed config)."""
    args = variant_args(name, opts, model_dir, data_path)
    result = {"variant": name, "flags": VARIANTS[name], "precision": model_loader.training_precision(args.precision, device),
              "gradient_checkpointing": args.gradient_checkpointing, "lora_dropout": args.lora_dropout,
              "liger": args.liger}
    reason, settings = unavailable(args, device)
    if reason:
        result.update(attention=settings[3] if settings else args.attention, skipped=reason)
        if settings:
            result["attention_note"] = settings[4]
        say(f"[{name}] skipped: {reason}")
        return result, settings and settings[2]
    _, dtype, ds_config, attn, attn_note = settings
    result.update(attention=attn, attention_note=attn_note)
    train_dataset = finetune.load_train_dataset(args, None)
    sampler = DistributedSampler(train_dataset, num_replicas=world_size, rank=0, shuffle=True, seed=args.seed)

    free_memory(device)
    reset_peak(device)
    if device.type == "cuda":
        result["mem_allocated_at_start_GiB"] = torch.cuda.memory_allocated(device) / 2 ** 30
    torch.manual_seed(args.seed)   # as finetune.main: same base weights and LoRA init in every variant
    t0 = time.perf_counter()
    model = variant_model(args, model_dir, device, dtype, attn)
    engine = train_step.make_engine(model, ds_config, attn, dtype, args.loss_chunk, fused_loss=args.liger == "all")
    sync(device)
    result["setup_s"] = time.perf_counter() - t0
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    result.update(trainable_params=lora_params, base_params=base_params,
                  checkpointing_active=any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()))
    groups = finetune.epoch_batches(train_dataset, sampler, 0, 0, ds_config["train_micro_batch_size_per_gpu"],
                                    ds_config["gradient_accumulation_steps"], args.seed)
    timing = time_steps(name, engine, groups, opts, device, world_size)
    result.update(train_figures.speed_figures(timing, opts, shape, lora_params, base_params,
                                              args.gradient_checkpointing, device))

    # free everything before the next variant
    if hasattr(engine, "destroy"):
        engine.destroy()
    model_ref = weakref.ref(model)
    del engine, model, groups, train_dataset
    free_memory(device)
    result["model_freed"] = model_ref() is None   # nothing (DeepSpeed, peft, hooks) still holds the weights
    if device.type == "cuda":
        result["mem_allocated_after_free_GiB"] = torch.cuda.memory_allocated(device) / 2 ** 30
    return result, ds_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "13b"], default="tiny",
                   help="model shape: tiny = config.TINY_MODEL (CPU, CI); 13b = LLaMA-13B with the 49,954-token "
                        "vocabulary (needs a GPU with ~60 GiB free) (default: %(default)s)")
    p.add_argument("--seq_len", type=int, default=None,
                   help="tokens per row, finetune's --max_length (default: 2048 for 13b, 512 for tiny)")
    p.add_argument("--micro_batch_size", type=int, default=2, help="rows per forward pass (default: %(default)s)")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step, i.e. per timed step (default: %(default)s: an optimizer "
                        "step after every micro-batch, as the baseline; config.py trains with 8)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: %(default)s)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, run in this order, each in a fresh model and engine; known: "
                        f"{', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="shorthand for --variants checkpointing (only the checkpointing variant)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="finetune.py's --precision: auto = bf16 on a GPU that has it, else fp32 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=10, help="seed of the weights, LoRA init, data and order (default: %(default)s)")
    p.add_argument("--loss_tol", type=float, default=None,
                   help="largest allowed per-step loss difference between variants (default by precision: "
                        + ", ".join(f"{k} {v:g}" for k, v in LOSS_TOL.items()) + ")")
    p.add_argument("--json", default="", help="write the figures, settings and versions to this JSON file")
    opts = p.parse_args(argv)
    if opts.gradient_checkpointing:
        opts.variants = "checkpointing"
    opts.variant_list = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in opts.variant_list if v not in VARIANTS]
    if unknown or not opts.variant_list:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    liger_at = [i for i, v in enumerate(opts.variant_list) if "--liger" in VARIANTS[v]]
    other_at = [i for i, v in enumerate(opts.variant_list) if "--liger" not in VARIANTS[v]]
    if liger_at and other_at and liger_at[0] < other_at[-1]:
        p.error(f"--variants: {opts.variant_list[liger_at[0]]} uses liger-kernel, which patches transformers' LLaMA "
                f"for the rest of the process, so {opts.variant_list[other_at[-1]]} after it would run liger's "
                f"kernels too: list the liger variants last")
    if opts.seq_len is None:
        opts.seq_len = 2048 if opts.shape == "13b" else 512
    for name in ("seq_len", "micro_batch_size", "grad_accum", "steps"):
        if getattr(opts, name) < 1:
            p.error(f"--{name} must be 1 or more")
    if opts.warmup < 0:
        p.error("--warmup must be 0 or more")
    return opts


def run_variants(opts, shape, device, world_size, report, started):
    """Every variant on the same synthetic rows, then the attention probe; fills ``report`` as it goes."""
    results = report["variants"]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        model_dir = write_config_dir(shape, opts.seq_len, os.path.join(tmp, "model"))
        data_path = os.path.join(tmp, "llama_ift_data_ids.pkl")
        rows_needed = (opts.warmup + opts.steps) * opts.grad_accum * opts.micro_batch_size
        report["data"] = data_info = write_ids_file(data_path, shape, opts.seq_len, rows_needed, opts.seed)
        say(f"data: {data_info['samples']} synthetic samples packed into {data_info['rows']} rows "
            f"({data_info['real_token_share_all_rows']:.1%} real tokens); {rows_needed} rows used")
        for name in opts.variant_list:
            try:
                result, ds = run_variant(name, opts, shape, model_dir, data_path, device, world_size)
                report["deepspeed_config"] = report["deepspeed_config"] or ds
            except Exception as e:   # e.g. out of memory: record it, free, and go on with the next variant
                traceback.print_exc()
                result = {"variant": name, "flags": VARIANTS[name], "error": f"{type(e).__name__}: {e}"[:2000]}
            results.append(result)
            free_memory(device)
            report["wall_s"] = time.perf_counter() - started
            write_json(opts.json, report)   # what is measured so far survives a later crash or time-out
        ran = [r for r in results if "losses" in r]
        if ran:
            rows = dataset.DatasetIds(None, data_io.safe_load_pickle(data_path), opts.seq_len)
            position_ids = torch.stack([rows[i]["position_ids"] for i in range(opts.micro_batch_size)])
            report["attention_probe"] = attention_probe(shape, opts.seq_len, opts.micro_batch_size,
                                                        model_loader.FLOAT_DTYPES[ran[0]["precision"]], device,
                                                        position_ids)
    return ran


def main(argv=None):
    opts = parse_args(argv)
    started = time.perf_counter()
    versions = check_packages()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _, world_size, device = distributed.init_distributed()
    if world_size != 1:
        print("error: run bench_train.py as one process (no launcher)", file=sys.stderr)
        return 2
    if opts.shape == "13b" and device.type != "cuda":
        print("error: --shape 13b needs a CUDA GPU (about 60 GiB); use --shape tiny on a CPU", file=sys.stderr)
        return 2
    shape = shape_of(opts.shape)
    if opts.loss_tol is None:   # by the precision the variants will train in
        opts.loss_tol = LOSS_TOL[model_loader.training_precision(opts.precision, device)]
    machine = bench_common.machine_info(device)
    memory_unit = bench_common.memory_unit(device)
    say(f"device: {device} ({machine.get('gpu') or machine.get('cpu')}); "
        f"shape {opts.shape}: {shape}; rows {opts.micro_batch_size} x {opts.seq_len} tokens, "
        f"grad_accum {opts.grad_accum}, {opts.warmup} warm-up + {opts.steps} timed steps per variant")
    report = {
        "benchmark": "bench/bench_train.py",
        "date_utc": bench_common.utc_now(),
        "command": bench_common.command_line("bench/bench_train.py", argv),
        "machine": machine, "versions": dict(versions, torch=torch.__version__),
        "device": str(device), "shape_name": opts.shape, "shape": shape, "seq_len": opts.seq_len,
        "micro_batch_size": opts.micro_batch_size, "grad_accum": opts.grad_accum, "steps": opts.steps,
        "warmup": opts.warmup, "seed": opts.seed, "data": None, "deepspeed_config": None,
        "flops_formula": train_figures.FORMULA, "memory": memory_unit, "loss_tol": opts.loss_tol, "losses_agree": None,
        "complete": False, "baseline": None, "variants": [], "attention_probe": None, "wall_s": None,
    }
    ran = run_variants(opts, shape, device, world_size, report, started)

    results = report["variants"]
    losses_agree = train_figures.compare_losses(results, opts.loss_tol)
    failed = [r for r in results if "error" in r]
    say("\n" + train_figures.FORMULA + "\n")
    say(train_figures.table(results, memory_unit))
    if ran:
        say(f"{ran[0]['attention_note']}; precision {ran[0]['precision']}; "
            f"trainable (LoRA) parameters {ran[0]['trainable_params']:,}; base parameters {ran[0]['base_params']:,}")
    train_figures.compare_with_baseline(opts, device, report, ran)
    for r in results:
        if "skipped" in r:
            say(f"{r['variant']} skipped: {r['skipped']}")
        if "error" in r:
            say(f"{r['variant']} FAILED: {r['error'][:500]}")
    if report["attention_probe"]:
        say_probe(report["attention_probe"], device)
    say(f"losses agree across variants (tolerance {opts.loss_tol:g}): {'yes' if losses_agree else 'NO'}")

    report.update(losses_agree=losses_agree, complete=not failed, wall_s=time.perf_counter() - started)
    write_json(opts.json, report)
    if opts.json:
        say(f"wrote {opts.json}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if failed:
        print(f"error: variant(s) failed: {', '.join(r['variant'] for r in failed)}", file=sys.stderr)
        return 1
    if not losses_agree:
        print(f"error: a variant changed the loss by more than {opts.loss_tol:g} (see |dloss| max)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
