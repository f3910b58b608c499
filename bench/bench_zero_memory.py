"""Peak memory per rank of full fine-tuning under ZeRO stage 2 and stage 3, on CPU ranks.

    python bench/bench_zero_memory.py --ranks 4 --hidden_size 1536 --num_layers 8 --steps 1

A random CuteGPT-shaped model whose parameters dominate the memory is written once (code/build_tiny_model.py),
then finetune.py itself trains it for --steps steps under torchrun at each stage; every rank reports its
peak resident memory (ru_maxrss) at the end.  Stage 2 keeps every weight and a whole gradient on each rank;
stage 3 loads partitioned (deepspeed.zero.Init through transformers' HfDeepSpeedConfig) and keeps 1/N of the
weights, gradients and optimizer state.  Figures: BENCHMARKS.md.

Two settings make the small model stand for the large one, at both stages alike:
- DeepSpeed's buckets are scaled to the model the way transformers' "auto" values are (hidden^2 elements):
  config.py's are sized for 13B (a 2e8-element gradient bucket is 1.5% of 13B but more than this whole model);
- glibc's malloc gets a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_), so memory freed after ZeRO-3 has
  gathered a weight goes back to the system instead of staying resident in the heap (GPU memory is managed
  by PyTorch's caching allocator, which reuses it); --glibc_default measures without it.
"""
import argparse
import copy
import json
import os
import re
import resource
import subprocess
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "code"))

import bench_common  # noqa: E402  (bench/ helpers; code/ is on the path above)
import distributed  # noqa: E402

REPO = os.path.dirname(BENCH)
PEAK = re.compile(r"^peak_rss rank (\d+): (\d+) MiB$", re.M)
STAGES = (2, 3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden_size", type=int, default=1536, help="model width (default: %(default)s)")
    p.add_argument("--num_layers", type=int, default=8, help="decoder layers (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--max_length", type=int, default=128, help="tokens per row (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=4, help="CPU ranks (default: %(default)s)")
    p.add_argument("--glibc_default", action="store_true", help="leave glibc's malloc settings as they are")
    p.add_argument("--work_dir", default=None, help="where the model, data and checkpoints go (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in ("hidden_size", "num_layers", "steps", "max_length", "ranks"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be 1 or more")
    return args


MMAP_THRESHOLD = str(128 * 1024)   # glibc's initial value, kept fixed instead of growing after frees


def run(command, what, env=None):
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {})))
    if proc.returncode != 0:
        sys.exit(f"bench_zero_memory: {what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepare(args, work):
    model, data = os.path.join(work, "model"), os.path.join(work, "data")
    run([sys.executable, "code/build_tiny_model.py", "--data", "data/test/ift_data.pkl", "--out", model,
         "--hidden_size", str(args.hidden_size), "--num_layers", str(args.num_layers)], "building the model")
    run([sys.executable, "code/convert_data.py", "--tokenizer", model, "--max_length", str(args.max_length),
         "--out_data_path", data, "--data_file", "data/test/ift_data.pkl", "--special_end_token"],
        "converting the sample data")
    return model, os.path.join(data, "llama_ift_data_ids.pkl")


def ds_config_file(args, work, stage):
    """config.py's full fine-tuning config at ZeRO ``stage`` with buckets scaled to the model (hidden^2)."""
    import config

    ds = copy.deepcopy(config.DS_CONFIG_ft)
    bucket = args.hidden_size ** 2
    zero = ds["zero_optimization"]
    zero.update(stage=stage, reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if stage == 3:
        zero.update({k: v for k, v in config.ZERO_3.items() if k not in zero},
                    stage3_prefetch_bucket_size=int(0.9 * bucket), stage3_param_persistence_threshold=10 * args.hidden_size,
                    stage3_max_live_parameters=bucket, stage3_max_reuse_distance=bucket)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    path = os.path.join(work, f"ds_stage{stage}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ds, f)
    return path


def train_peaks(args, work, model, data, stage):
    """({rank: peak RSS in MiB}, trainable parameters) of one finetune.py run at ZeRO ``stage``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port",
               str(distributed.free_port()), os.path.abspath(__file__), "--child", "--model_path", model,
               "--data_path", data, "--max_length", str(args.max_length), "--max_steps", str(args.steps),
               "--max_epoches", "1", "--precision", "fp32", "--deepspeed_config", ds_config_file(args, work, stage),
               "--save_steps", str(10 ** 9), "--no_progress",
               "--save_dir", os.path.join(work, f"ckp{stage}"), "--save_name", "bench",
               "--max_training_samples", str(args.ranks * args.steps)]
    env = {} if args.glibc_default else {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    out = run(command, f"training at ZeRO stage {stage}", env)
    trainable = re.search(r"trainable parameters: ([\d,]+)", out)
    return {int(rank): int(mib) for rank, mib in PEAK.findall(out)}, trainable.group(1) if trainable else "?"


def child(argv):
    """Under torchrun: finetune.py's main, then this rank's peak resident memory."""
    import finetune

    finetune.main(argv)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    print(f"peak_rss rank {os.environ.get('RANK', '0')}: {peak_kib // 1024} MiB", flush=True)


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        model, data = prepare(args, work)
        runs = {stage: train_peaks(args, work, model, data, stage) for stage in STAGES}
    peaks = {stage: run_peaks for stage, (run_peaks, _) in runs.items()}
    print(f"full fine-tuning of {runs[2][1]} parameters (hidden {args.hidden_size}, {args.num_layers} layers), "
          f"fp32, {args.ranks} CPU ranks, {args.steps} step(s) at max_length {args.max_length}, buckets "
          f"{args.hidden_size ** 2:,} elements, glibc malloc {'default' if args.glibc_default else 'fixed mmap threshold'}")
    rows = [[f"ZeRO-{stage}"] + [f"{peaks[stage].get(r, '?')} MiB" for r in range(args.ranks)] for stage in STAGES]
    print(bench_common.markdown_table(["stage"] + [f"rank {r} peak RSS" for r in range(args.ranks)], rows))
    lower = all(peaks[3].get(r, float("inf")) < peaks[2].get(r, 0) for r in range(args.ranks))
    print(f"stage 3 lower on every rank: {'yes' if lower else 'NO'}")


if __name__ == "__main__":
    if "--child" in sys.argv[1:]:
        child([a for a in sys.argv[1:] if a != "--child"])
    else:
        main()
