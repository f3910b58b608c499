"""The figures of bench/bench_train.py: FLOPs per position, speed and memory of a variant, the loss
comparison between variants, the table, and the comparison with the H200 baseline."""
import bench_common
from bench_common import peak_memory, say

# h200_hf_baseline.json (shared/bench/ beside the repo): plain transformers + peft on one H200, 13B shape, bf16,
# LoRA r8 q/v, micro-batch 2 x 2048, SDPA, random tokens without padding, optimizer step every micro-batch
BASELINE = {
    "source": "shared/bench/h200_hf_baseline.json beside the repo (gpu_anchors.py, torch 2.11, transformers 5.17, peft 0.21)",
    "plain": {"tokens_per_s": 7183.8, "tflops": 384.0, "peak_mem_GiB": 60.09},
    "checkpointing": {"tokens_per_s": 5255.5, "tflops": 418.7, "peak_mem_GiB": 28.77},
}

# variants whose loss is not compared (quantized weights compute a different function)
LOSS_NOT_COMPARED = ("qlora_nf4", "qlora_int8")

FORMULA = """FLOPs per position (S = seq_len, L layers, d hidden, f MLP, V vocabulary, kv = K/V width):
  N_layers = L*(2*d*d + 2*d*kv + 3*d*f)   matmul weights of the decoder layers (frozen)
  N_head   = V*d                           LM head (frozen; the embedding lookup is no matmul)
  N_lora   = trainable LoRA parameters     (forward 2, input grad 2, weight grad 2 per parameter)
  A        = 2*L*S*d                       causal attention forward (QK^T and AV, S/2 keys per query)
  model    = 4*(N_layers + N_head) + 6*N_lora + 3*A
             (frozen weights: forward 2N + input-grad backward 2N, no weight grad; attention backward = 2x forward)
  hw       = model + [checkpointing] (2*N_layers + 2*N_lora + A)   the recomputed layer forwards
  TFLOP/s  = FLOPs per position x positions (rows x S, pad included) / time / 1e12
  baseline formula (gpu_anchors.py): (6 if ckpt else 4)*(P - 2*V*d) + 4*V*d + (3 if ckpt else 2)*2*L*S*d,
             P = all base-model parameters (norms included)"""


def flops_per_position(shape, seq_len, lora_params, base_params, checkpointing):
    """The terms of FORMULA for a shape and sequence length."""
    d, L, f, V = shape["hidden_size"], shape["num_layers"], shape["intermediate_size"], shape["vocab_size"]
    kv = d // shape["num_heads"] * shape["num_kv_heads"]
    n_layers = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    n_head = V * d
    attn = 2 * L * seq_len * d
    model = 4 * (n_layers + n_head) + 6 * lora_params + 3 * attn
    hw = model + ((2 * n_layers + 2 * lora_params + attn) if checkpointing else 0)
    baseline = ((6 if checkpointing else 4) * (base_params - 2 * V * d) + 4 * V * d
                + (3 if checkpointing else 2) * 2 * L * seq_len * d)
    return {"model": model, "hw": hw, "baseline_formula": baseline, "N_layers": n_layers, "N_head": n_head,
            "N_lora": lora_params, "A": attn}


def speed_figures(timing, opts, shape, lora_params, base_params, checkpointing, device):
    """tokens/s, TFLOP/s and peak memory of a variant's timed steps (after the warm-up ones)."""
    timed = slice(opts.warmup, opts.warmup + opts.steps)
    seconds = sum(timing["step_seconds"][timed])
    real_timed, pos_timed = sum(timing["real_tokens"][timed]), sum(timing["positions"][timed])
    flops = flops_per_position(shape, opts.seq_len, lora_params, base_params, checkpointing)
    return dict(timing, seconds_per_step=seconds / opts.steps, tokens_per_s=real_timed / seconds,
                all_tokens_per_s=pos_timed / seconds, real_token_share=real_timed / pos_timed,
                flops_per_position=flops, tflops_model=flops["model"] * pos_timed / seconds / 1e12,
                tflops_hw=flops["hw"] * pos_timed / seconds / 1e12,
                tflops_baseline_formula=flops["baseline_formula"] * pos_timed / seconds / 1e12,
                peak_mem_GiB=peak_memory(device), peak_mem_kind=bench_common.peak_memory_kind(device))


def compare_losses(results, tol):
    """Each variant's per-step losses against the first variant run with the same lora_dropout."""
    refs, ok = {}, True
    for r in results:
        if "losses" not in r or r["variant"] in LOSS_NOT_COMPARED:
            continue
        ref = refs.setdefault(r["lora_dropout"], r)
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        r["loss_reference"] = ref["variant"]
        r["loss_max_abs_diff"] = diff
        r["loss_agrees"] = diff <= tol
        ok = ok and r["loss_agrees"]
    return ok


def table(results, memory_unit):
    """One row per variant (a skipped or failed one says so)."""
    head = ["variant", "attention", "liger", "ckpt", "s/step", "real tok/s", "all tok/s", "TFLOP/s model", "TFLOP/s hw",
            "TFLOP/s base-formula", f"peak {memory_unit}", "real share", "loss step 1", "|dloss| max"]
    rows = []
    for r in results:
        if "losses" not in r:
            rows.append([r["variant"], "skipped (see below)" if "skipped" in r else "FAILED (see below)"]
                        + [""] * (len(head) - 2))
            continue
        rows.append([r["variant"], r["attention"], r.get("liger", "off"), "yes" if r["gradient_checkpointing"] else "no",
                     f"{r['seconds_per_step']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['all_tokens_per_s']:,.0f}",
                     f"{r['tflops_model']:.3g}", f"{r['tflops_hw']:.3g}", f"{r['tflops_baseline_formula']:.3g}",
                     f"{r['peak_mem_GiB']:.2f}", f"{r['real_token_share']:.1%}", f"{r['losses'][0]:.6f}",
                     (f"{r['loss_max_abs_diff']:.1e} vs {r['loss_reference']}" if "loss_reference" in r
                      else "not compared (quantized base)")])
    return bench_common.markdown_table(head, rows)


def compare_with_baseline(opts, device, report, ran):
    """On the baseline's own setting (13B shape, GPU, 2 x 2048, no accumulation): each variant against it."""
    if not (opts.shape == "13b" and device.type == "cuda" and opts.seq_len == 2048 and opts.micro_batch_size == 2
            and opts.grad_accum == 1):
        return
    report["baseline"] = BASELINE
    for r in ran:
        ref = BASELINE["checkpointing" if r["gradient_checkpointing"] else "plain"]
        r["vs_baseline"] = {"all_tokens_per_s_ratio": r["all_tokens_per_s"] / ref["tokens_per_s"],
                            "peak_mem_ratio": r["peak_mem_GiB"] / ref["peak_mem_GiB"]}
        say(f"vs baseline ({'ckpt' if r['gradient_checkpointing'] else 'no ckpt'}: {ref['tokens_per_s']:,.0f} tok/s, "
            f"{ref['peak_mem_GiB']} GiB): {r['variant']} all tok/s x{r['vs_baseline']['all_tokens_per_s_ratio']:.2f}, "
            f"peak memory x{r['vs_baseline']['peak_mem_ratio']:.2f}")


