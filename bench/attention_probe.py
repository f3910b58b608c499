"""What finetune's block-diagonal mask costs: one layer's attention alone, forward + backward, at the run's
shape and dtype, without a mask (the causal kernel) and with the mask (SDPA; on a GPU also each SDPA backend
forced, and FlexAttention with its BlockMask).  bench/bench_train.py runs it after its variants."""
import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import packing
from bench_common import say, sync


def error_text(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def seconds_per_call(step, device, reps):
    """Seconds per call of ``step()`` over ``reps`` calls after one untimed call; or the error, as text."""
    try:
        for rep in range(reps + 1):
            if rep == 1:
                sync(device)
                start = time.perf_counter()
            step()
        sync(device)
        return round((time.perf_counter() - start) / reps, 6)
    except Exception as e:  # a backend that cannot take this input
        return error_text(e)


def attention_probe(shape, seq_len, micro_batch, dtype, device, position_ids, reps=3):
    """Seconds per forward+backward of one layer's SDPA at the run's shape: the causal kernel without
    a mask (what plain causal training gets, flash-eligible) against finetune's block-diagonal mask
    (packing.block_causal_mask of the run's first micro-batch), with the default dispatch and with
    each backend forced.  A failure is recorded, never raised."""
    heads, head_dim = shape["num_heads"], shape["hidden_size"] // shape["num_heads"]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(micro_batch, heads, seq_len, head_dim, device=device, dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    mask = packing.block_causal_mask(position_ids.to(device), dtype)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

    def timed(use_mask, backend):
        def step():
            out = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask) if use_mask
                   else F.scaled_dot_product_attention(q, k, v, is_causal=True))
            out.sum().backward()

        with sdpa_kernel([backends[backend]]) if backend else contextlib.nullcontext():
            return seconds_per_call(step, device, reps)

    probe = {"what": "s per forward+backward of one layer's SDPA", "batch": micro_batch, "heads": heads,
             "head_dim": head_dim, "seq_len": seq_len, "dtype": str(dtype)}
    for label, use_mask in (("causal_no_mask", False), ("block_mask", True)):
        probe[label] = {"default": timed(use_mask, None)}
        if device.type == "cuda":
            for name in backends:
                probe[label][name] = timed(use_mask, name)
    if device.type == "cuda":   # FlexAttention has no backward pass on a CPU
        probe["flex_block_mask"] = {"default": flex_timed(q, k, v, position_ids.to(device), reps)}
    return probe


def flex_timed(q, k, v, position_ids, reps):
    """Seconds per forward+backward of compiled FlexAttention with finetune's BlockMask
    (packing.block_causal_block_mask, built once), after one untimed call that compiles it; or the error."""
    try:
        # imported here: it loads torch's compiler stack, which only this GPU-only timing needs
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = packing.block_causal_block_mask(position_ids)
        flex = torch.compile(flex_attention)
    except Exception as e:
        return error_text(e)
    return seconds_per_call(lambda: flex(q, k, v, block_mask=block_mask).sum().backward(), q.device, reps)


def say_probe(probe, device):
    """One line: the probe's times in ms."""
    fmt = lambda x: f"{x * 1e3:.2f} ms" if isinstance(x, float) else x  # noqa: E731
    say(f"attention alone (one layer, forward+backward, {probe['dtype']}): causal without mask "
        f"{fmt(probe['causal_no_mask']['default'])}, finetune's block mask {fmt(probe['block_mask']['default'])}"
        + ("" if device.type != "cuda" else "; forced backends (causal | block mask): " + ", ".join(
            f"{name} {fmt(probe['causal_no_mask'][name])} | {fmt(probe['block_mask'][name])}"
            for name in ("flash", "efficient", "cudnn", "math") if name in probe["block_mask"]))
        + (f"; FlexAttention with the BlockMask {fmt(probe['flex_block_mask']['default'])}"
           if "flex_block_mask" in probe else ""))
