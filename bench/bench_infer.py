"""Inference speed of inference.py's own generation path: prefill time, decode tokens/s at batch 1 and
batch 8, peak memory, start-up (compile) cost, for the plain path and the --fast path.

    # CPU, tiny shape (config.TINY_MODEL): what CI runs, seconds
    python bench/bench_infer.py --shape tiny --json /tmp/bench_infer_tiny.json

    # one GPU, the CuteGPT-13B shape (LLaMA-13B + 49,954-token vocabulary), 512-token prompts
    python bench/bench_infer.py --shape 13b --variants int8_fast,bf16_fast,bf16,int8,nf4 --json bench_infer_13b.json

    # the unattended GPU check (installs carried wheels, prints versions, runs the line above)
    OUT=/tmp/out bash bench/gpu_infer_check.sh

What is timed is the project's code, not a copy of it:

- the model: ``model_loader.load_model_and_tokenizer(..., quant, fast)`` on a model directory of the shape
  with random weights and the tiny model's tokenizer (built by code/build_tiny_model.py); or, for
  the variants marked "in memory", the same model built directly on the device in the dtype the loader
  gives (bf16 on a GPU), with the loader's own after-steps: ``model_loader.enable_fast_path`` and, for
  int8_fast, torchao's ``quantize_`` with ``model_loader.fast_int8_config()`` on every linear layer but
  the output layer, which is what the loader's TorchAoConfig does as each weight is loaded
  (tests/test_bench_infer.py checks that both give the same int8 weights).  Speed does not depend on the
  weight values, and so 26 GB need not be written and read; bitsandbytes quantizes only while loading, so
  int8 / nf4 (plain) save the random weights once (--weights_dir, 26 GB for 13b) and load them;
- batch 1: ``chat.Reply`` -- the object inference.py, the API server and the web demo stream from (its
  generation thread, streamer and stop criterion) with greedy ``chat.generation_settings`` and
  ``generate_overrides={"min_new_tokens": N}`` so that random weights cannot stop early;
- batch 8: ``model.generate`` with the same ``chat.generate_kwargs`` and stop criterion, in a fresh
  thread as Reply runs it (Reply answers one conversation at a time).

Figures per variant and batch size (random prompts of --prompt_len tokens, --new_tokens generated):
first call (includes compiling / CUDA-graph recording on the fast path), then timed calls: prefill =
one generated token; decode tokens/s = (new_tokens - 1) x batch / (full call - prefill call); peak
memory = torch.cuda.max_memory_allocated() over the timed calls (weights, cache, activations) on a GPU,
the process's max RSS on a CPU.  Start-up = first call - timed call; it pays off after
start-up / (1/plain tok/s - 1/fast tok/s) tokens against the plain variant with the same weights type.

A variant whose package is missing (bitsandbytes for int8 / nf4, torchao for int8_fast) stops the run
before any work with exit 2 and a line naming the package.  A variant that fails (out of memory, say) is
recorded with its error and the next one still runs (exit 1 at the end); the JSON is rewritten after
every variant, so a time-out keeps what was measured.
"""
import argparse
import os
import platform
import sys
import tempfile
import threading
import time
import traceback

import torch
from transformers import StoppingCriteriaList

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

# training and inference are measured and recorded alike (bench_common): the model shapes (13B: LLaMA-13B
# with CuteGPT's vocabulary, the shape of the H200 baseline), the machine description and the JSON report
import bench_common  # noqa: E402
import chat  # noqa: E402
import config  # noqa: E402
import data_io  # noqa: E402
import model_loader  # noqa: E402
from bench_common import free_memory, peak_memory, reset_peak, say, shape_of, sync, write_json  # noqa: E402

# variant: (--quant, --fast, where the weights come from)
VARIANTS = {
    "int8": ("int8", False, "loader"),          # the seed's bitsandbytes LLM.int8(): the faithful default
    "nf4": ("nf4", False, "loader"),
    "int8_fast": ("int8", True, "memory"),      # torchao int8 weight-only + static cache + compile
    "bf16": ("bf16", False, "memory"),
    "bf16_fast": ("bf16", True, "memory"),
    "fp32": ("fp32", False, "memory"),          # the CPU's precision
    "fp32_fast": ("fp32", True, "memory"),
    "int8_fast_loader": ("int8", True, "loader"),   # int8_fast through the loader's TorchAoConfig
}
NEEDS = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "int8_fast": "torchao", "int8_fast_loader": "torchao"}
# the plain variant each fast one is compared with (same weights type)
PLAIN_OF = {"int8_fast": "int8", "int8_fast_loader": "int8", "bf16_fast": "bf16", "fp32_fast": "fp32"}
DEFAULT_VARIANTS = {"tiny": "fp32,fp32_fast,int8_fast", "13b": "int8_fast,bf16_fast,bf16,int8,nf4"}

# the baseline: plain transformers generate on one H200, 13B shape, random weights, batch 1 (bf16 also
# batch 16), 512-token prompt, greedy
BASELINE = {
    "source": "plain transformers generate on one H200 (torch 2.11, transformers 5.17, bitsandbytes 0.50.2)",
    "int8": {"decode_tokens_per_s": 3.28, "prefill_s": 0.3354, "peak_mem_GiB": 13.55},
    "nf4": {"decode_tokens_per_s": 14.18, "prefill_s": 0.0716, "peak_mem_GiB": 7.33},
    "bf16": {"decode_tokens_per_s": 8.82, "prefill_s": 1.0626, "peak_mem_GiB": 25.23},
    "bf16_bs16": {"decode_tokens_per_s": 118.31, "peak_mem_GiB": 31.93},
}
# the targets for the fast path at batch 1 on the 13B shape
TARGETS = {"int8_fast": {"decode_tokens_per_s": 100, "peak_mem_GiB": 16}, "bf16_fast": {"decode_tokens_per_s": 120}}


def check_packages(variant_list):
    """Versions of what is installed; exit 2 naming any package a requested variant needs."""
    versions = {name: bench_common.installed_version(name)
                for name in ("torch", "transformers", "accelerate", "safetensors", "bitsandbytes", "torchao", "peft")}
    missing = []
    for name in ("torch", "transformers"):
        if versions[name] is None:
            missing.append(f"{name} (needed by every variant)")
    for package in sorted(set(NEEDS.get(v) for v in variant_list) - {None}):
        if versions[package] is None:
            users = [v for v in variant_list if NEEDS.get(v) == package]
            missing.append(f"{package} (needed by {', '.join(users)})")
    bench_common.say_versions(versions)
    if missing:
        data_io.fail("missing package(s): " + "; ".join(missing) + ".  Install them (pip install -r "
                     "requirements.txt) or leave those variants out of --variants.")
    return versions


# ----------------------------------------------------------------------------------------------
# model directory, weights
# ----------------------------------------------------------------------------------------------
def random_model(model_dir, device, dtype, seed):
    """A model of the directory's config with seeded random weights, built directly on ``device``."""
    torch.manual_seed(seed)
    return bench_common.random_model(model_dir, device, dtype).eval()


def quantize_in_memory(model):
    """int8_fast on weights built in memory: torchao's quantize_ with the loader's config on every
    linear layer but the output layer (what transformers' TorchAoConfig converts by default)."""
    from torchao.quantization import quantize_

    output = model.get_output_embeddings()
    quantize_(model, model_loader.fast_int8_config(),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and module is not output)
    return model


def load_variant(name, model_dir, device, seed):
    """(model, tokenizer, how) for a variant."""
    quant, fast, source = VARIANTS[name]
    if source == "loader":
        model, tokenizer = model_loader.load_model_and_tokenizer(model_dir, quant=quant, device=str(device),
                                                                 fast=fast, notice=lambda message: None)
        return model, tokenizer, "random weights saved, loaded by model_loader.load_model_and_tokenizer"
    tokenizer = model_loader.load_tokenizer(model_dir)
    if quant == "int8":   # the loader's dtype for --fast --quant int8
        dtype = model_loader.compute_dtype(str(device))
    else:
        dtype = model_loader.FLOAT_DTYPES[quant]
    model = random_model(model_dir, device, dtype, seed)
    how = f"random weights built on {device} in {str(dtype).replace('torch.', '')}"
    if quant == "int8":
        quantize_in_memory(model)
        how += ", quantized by torchao quantize_(model_loader.fast_int8_config())"
    if fast:
        model_loader.enable_fast_path(model)
        how += ", model_loader.enable_fast_path"
    return model, tokenizer, how


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def generate_ids(model, tokenizer, input_ids, new_tokens):
    """Generated ids (batch, new) through the real path: chat.Reply at batch 1, else model.generate
    with chat's arguments and stop criterion in a fresh thread."""
    settings = chat.generation_settings(do_sample=False, max_new_tokens=new_tokens)
    if input_ids.shape[0] == 1:
        prepared = chat.Prompt(input_ids[0].tolist(), 0, "", False)
        reply = chat.Reply(model, tokenizer, prepared, settings, "", generate_overrides={"min_new_tokens": new_tokens})
        reply.result()
        return torch.tensor([reply._generated])
    kwargs = dict(chat.generate_kwargs(settings, tokenizer), min_new_tokens=new_tokens)
    criteria = chat.StopAtMarkerOrCancel(tokenizer, input_ids.shape[1], threading.Event())
    box = {}

    def run():
        try:
            with torch.inference_mode():
                box["out"] = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                            stopping_criteria=StoppingCriteriaList([criteria]), **kwargs)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["out"][:, input_ids.shape[1]:].cpu()


def time_batch(model, tokenizer, device, batch, prompt_len, new_tokens, seed, low_id=3):
    gen = torch.Generator().manual_seed(seed + batch)
    high = min(len(tokenizer), model.config.vocab_size)
    input_ids = torch.randint(low_id, high, (batch, prompt_len), generator=gen).to(model_loader.input_device(model))

    def timed(n):
        sync(device)
        start = time.perf_counter()
        out = generate_ids(model, tokenizer, input_ids, n)
        sync(device)
        return time.perf_counter() - start, out

    first_s, _ = timed(new_tokens)           # compiles / records CUDA graphs on the fast path
    reset_peak(device)
    prefill_s, _ = timed(1)
    full_s, out = timed(new_tokens)
    decode_s = max(full_s - prefill_s, 1e-9)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "first_call_s": first_s,
            "prefill_s": prefill_s, "full_call_s": full_s, "startup_s": max(first_s - full_s, 0.0),
            "decode_tokens_per_s": (new_tokens - 1) * batch / decode_s,
            "peak_mem_GiB": peak_memory(device), "generated_ids_row0": out[0].tolist(),
            "generated_lengths": [len(row) for row in out.tolist()]}


def run_variant(name, opts, model_dir, device):
    quant, fast, source = VARIANTS[name]
    result = {"variant": name, "quant": quant, "fast": fast}
    free_memory(device)
    if source == "loader":
        # bf16 on a GPU, fp32 on a CPU
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result["weights_saved_s"] = bench_common.save_random_weights(model_dir, device, dtype, opts.seed)
    free_memory(device)
    reset_peak(device)
    start = time.perf_counter()
    model, tokenizer, how = load_variant(name, model_dir, device, opts.seed)
    sync(device)
    result.update(load_s=time.perf_counter() - start, weights=how, load_peak_mem_GiB=peak_memory(device),
                  fast_path_active=model_loader.fast_path_active(model),
                  weight_type=type(model.get_input_embeddings().weight).__name__)
    layer = model.get_decoder().layers[0].mlp.up_proj
    result["linear_weight_type"] = f"{type(layer).__name__} / {type(layer.weight).__name__}"
    if device.type == "cuda":
        result["resident_GiB"] = torch.cuda.memory_allocated(device) / 2 ** 30
    result["batches"] = []
    for batch in opts.batch_list:
        figures = time_batch(model, tokenizer, device, batch, opts.prompt_len, opts.new_tokens, opts.seed)
        result["batches"].append(figures)
        say(f"[{name}] batch {batch}: prefill {figures['prefill_s']:.3f} s, decode "
            f"{figures['decode_tokens_per_s']:.1f} tok/s, first call {figures['first_call_s']:.1f} s, "
            f"peak {figures['peak_mem_GiB']:.2f} GiB")
    del model, tokenizer, layer
    free_memory(device)
    return result


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def compare(results):
    """Per fast variant: break-even against its plain variant, and how far their greedy ids agree."""
    by_name = {r["variant"]: r for r in results if "batches" in r}
    for r in by_name.values():
        plain = by_name.get(PLAIN_OF.get(r["variant"]))
        if plain is None:
            continue
        f1, p1 = r["batches"][0], plain["batches"][0]
        gain = 1 / p1["decode_tokens_per_s"] - 1 / f1["decode_tokens_per_s"]
        r["vs_plain"] = {"plain": plain["variant"], "decode_speedup": f1["decode_tokens_per_s"] / p1["decode_tokens_per_s"],
                         "startup_s": f1["startup_s"],
                         "pays_off_after_tokens": (f1["startup_s"] / gain) if gain > 0 else None}
        if VARIANTS[r["variant"]][0] == VARIANTS[plain["variant"]][0] and VARIANTS[r["variant"]][0] != "int8":
            a, b = f1["generated_ids_row0"], p1["generated_ids_row0"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            r["vs_plain"]["greedy_ids_equal_prefix"] = same
            r["vs_plain"]["greedy_ids_compared"] = min(len(a), len(b))


def table(results, memory_unit):
    head = ["variant", "weights", "batch", "prefill s", "decode tok/s", f"peak {memory_unit}", "first call s",
            "start-up s", "pays off after", "vs baseline"]
    rows = []
    for r in results:
        if "batches" not in r:
            rows.append([r["variant"], "FAILED (see below)"] + [""] * (len(head) - 2))
            continue
        for f in r["batches"]:
            ratio = f.get("vs_baseline_decode")
            vs = r.get("vs_plain", {})
            payoff = vs.get("pays_off_after_tokens") if f is r["batches"][0] else None
            rows.append([r["variant"], r["linear_weight_type"].split(" / ")[-1], f["batch"], f"{f['prefill_s']:.3f}",
                         f"{f['decode_tokens_per_s']:.1f}", f"{f['peak_mem_GiB']:.2f}", f"{f['first_call_s']:.1f}",
                         f"{f['startup_s']:.1f}", f"{payoff:,.0f} tokens" if payoff else "",
                         f"x{ratio:.1f}" if ratio else ""])
    return bench_common.markdown_table(head, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "13b"], default="tiny",
                   help="model shape: tiny = config.TINY_MODEL (CPU, CI); 13b = LLaMA-13B with the 49,954-token "
                        "vocabulary (needs a CUDA GPU) (default: %(default)s)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, run in this order; known: {', '.join(VARIANTS)} "
                        f"(default: {DEFAULT_VARIANTS['tiny']} for tiny, {DEFAULT_VARIANTS['13b']} for 13b)")
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--prompt_len", type=int, default=None,
                   help="prompt tokens (default: 512 for 13b, as the baseline; 64 for tiny)")
    p.add_argument("--new_tokens", type=int, default=None,
                   help="generated tokens per timed call (default: 64 for 13b, 32 for tiny)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--weights_dir", default=None,
                   help="model directory for the variants that load saved weights (int8, nf4): the random "
                        "weights are saved there once and reused by later runs (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts (default: %(default)s)")
    p.add_argument("--json", default="", help="write the figures, settings and versions to this JSON file")
    opts = p.parse_args(argv)
    opts.variants = opts.variants or DEFAULT_VARIANTS[opts.shape]
    opts.variant_list = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in opts.variant_list if v not in VARIANTS]
    if unknown or not opts.variant_list:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    try:
        opts.batch_list = [int(b) for b in opts.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch_sizes {opts.batch_sizes}: give whole numbers separated by commas, e.g. 1,8")
    if not opts.batch_list or min(opts.batch_list) < 1:
        p.error("--batch_sizes: every batch size must be 1 or more")
    opts.prompt_len = opts.prompt_len or (512 if opts.shape == "13b" else 64)
    opts.new_tokens = opts.new_tokens or (64 if opts.shape == "13b" else 32)
    if opts.prompt_len < 1 or opts.new_tokens < 2:
        p.error("--prompt_len must be 1 or more and --new_tokens 2 or more")
    return opts


def check_run(opts):
    """The torch.device of the run, or an error line (exit 2) when the options cannot run here."""
    try:
        device = torch.device(model_loader.resolve_device(opts.device))
    except model_loader.LoaderError as e:
        return None, str(e)
    if opts.shape == "13b" and device.type != "cuda":
        return None, "--shape 13b needs a CUDA GPU; use --shape tiny on a CPU"
    context = shape_of(opts.shape)["max_position_embeddings"]
    if opts.prompt_len + opts.new_tokens > context:
        return None, f"--prompt_len + --new_tokens must fit the context of {context} tokens"
    return device, None


def new_report(opts, argv, versions, device, machine, memory_unit):
    """The JSON report before any variant ran (rewritten after each one)."""
    return {
        "benchmark": "bench/bench_infer.py",
        "date_utc": bench_common.utc_now(),
        "command": bench_common.command_line("bench/bench_infer.py", argv),
        "machine": machine, "versions": dict(versions, torch=torch.__version__), "device": str(device),
        "shape_name": opts.shape, "shape": shape_of(opts.shape), "prompt_len": opts.prompt_len,
        "new_tokens": opts.new_tokens, "batch_sizes": opts.batch_list, "seed": opts.seed, "fast_config": config.FAST,
        "memory": memory_unit, "baseline": None, "targets": TARGETS, "complete": False, "variants": [],
        "wall_s": None,
    }


def run_variants(opts, device, report, started):
    """Every variant in order on one model directory; a failing variant is recorded and the next runs."""
    results = report["variants"]
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        tokenizer_dir = bench_common.build_tokenizer(os.path.join(tmp, "tiny_tokenizer"))
        model_dir = bench_common.prepare_model_dir(report["shape"], opts.weights_dir or os.path.join(tmp, "model"), tokenizer_dir)
        for name in opts.variant_list:
            try:
                result = run_variant(name, opts, model_dir, device)
            except Exception as e:   # e.g. out of memory: record it, free, and go on with the next variant
                traceback.print_exc()
                result = {"variant": name, "error": f"{type(e).__name__}: {e}"[:2000]}
            results.append(result)
            free_memory(device)
            compare(results)
            report["wall_s"] = time.perf_counter() - started
            write_json(opts.json, report)   # what is measured so far survives a later crash or time-out


def add_baseline(report, opts, device):
    """On the baseline's setting (13B shape, a GPU, 512-token prompts): each variant's batch-1 decode
    speed against the plain transformers figure of its weights type."""
    if not (opts.shape == "13b" and device.type == "cuda" and opts.prompt_len == 512):
        return
    report["baseline"] = BASELINE
    for r in report["variants"]:
        ref = BASELINE.get(r["variant"].replace("_fast", "").replace("_loader", ""))
        for f in r.get("batches", []):
            if ref and f["batch"] == 1:
                f["vs_baseline_decode"] = f["decode_tokens_per_s"] / ref["decode_tokens_per_s"]


def print_summary(report):
    results = report["variants"]
    say("")
    say(table(results, report["memory"]))
    for r in results:
        vs = r.get("vs_plain")
        if vs:
            say(f"{r['variant']} vs {vs['plain']}: decode x{vs['decode_speedup']:.2f} at batch 1, start-up "
                f"{vs['startup_s']:.1f} s" + (f", pays off after {vs['pays_off_after_tokens']:,.0f} generated tokens"
                                              if vs["pays_off_after_tokens"] else ", never pays off")
                + (f"; greedy ids equal for the first {vs['greedy_ids_equal_prefix']} of {vs['greedy_ids_compared']}"
                   if "greedy_ids_equal_prefix" in vs else ""))
        if "error" in r:
            say(f"{r['variant']} FAILED: {r['error'][:500]}")
    if report["baseline"]:
        say(f"baseline (plain transformers, {BASELINE['source']}): " + ", ".join(
            f"{k} {v['decode_tokens_per_s']} tok/s" for k, v in BASELINE.items() if isinstance(v, dict)))


def main(argv=None):
    opts = parse_args(argv)
    started = time.perf_counter()
    versions = check_packages(opts.variant_list)
    device, error = check_run(opts)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    machine = bench_common.machine_info(device)
    memory_unit = bench_common.memory_unit(device)
    say(f"device: {device} ({machine.get('gpu') or platform.processor()}); shape {opts.shape}: "
        f"{shape_of(opts.shape)}; prompt {opts.prompt_len} tokens, {opts.new_tokens} new, batch sizes "
        f"{opts.batch_list}; fast path: {config.FAST}")
    report = new_report(opts, argv, versions, device, machine, memory_unit)
    run_variants(opts, device, report, started)
    add_baseline(report, opts, device)
    print_summary(report)
    failed = [r for r in report["variants"] if "error" in r]
    report.update(complete=not failed, wall_s=time.perf_counter() - started)
    write_json(opts.json, report)
    if opts.json:
        say(f"wrote {opts.json}")
    if failed:
        print(f"error: variant(s) failed: {', '.join(r['variant'] for r in failed)}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
