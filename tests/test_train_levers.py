"""Training speed levers of finetune.py that need a GPU to train (--attention flex, --liger): what a CPU can
check.  FlexAttention: the BlockMask allows exactly the pairs of the dense block-diagonal mask, the forward
loss equals the SDPA path, and packed samples stay isolated.  FlexAttention and liger-kernel: training on a
CPU (or without the package) stops with one clear message.

FlexAttention has no backward pass on a CPU, so only forwards run here (under torch.no_grad).
transformers compiles flex_attention with inductor on its first call; on a CPU that costs ~25 s of C++
builds.  The forwards therefore run under torch.compiler.set_stance("force_eager"): the compiled call runs
as plain PyTorch, and FlexAttention evaluates the same BlockMask with its reference (unfused)
implementation.  What is tested is the mask and how it reaches the model; the fused GPU kernel is compared
with SDPA by bench/bench_train.py on a GPU (variants flex, liger_flex).
"""
import contextlib
import copy
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, SAMPLE_PKL

import config
import finetune
import fused_kernels
import model_loader
import packing
import train_step
from model_loader import LoaderError

LENGTH = 256


def tiny_models():
    """The tiny shape (config.TINY_MODEL) with random weights, once with SDPA and once with FlexAttention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = config.TINY_MODEL
    cfg = LlamaConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                      num_hidden_layers=t["num_layers"], num_attention_heads=t["num_heads"],
                      num_key_value_heads=t["num_heads"], max_position_embeddings=t["max_position_embeddings"],
                      initializer_range=t["initializer_range"], rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    # each model gets its own config: the attention choice is stored in it
    sdpa = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    flex = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="flex_attention").eval()
    assert (sdpa.config._attn_implementation, flex.config._attn_implementation) == ("sdpa", "flex_attention")
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def packed_batch(seed=0):
    """Two packed rows of LENGTH tokens as the datasets yield them: several samples per row (a prompt not
    learned, an answer learned), a padding tail; position ids restart per sample and at the padding."""
    rng = random.Random(seed)
    samples = []
    for _ in range(9):
        prompt, answer = rng.randint(5, 20), rng.randint(10, 60)
        ids = [rng.randrange(3, config.TINY_MODEL["vocab_size"]) for _ in range(prompt + answer)] + [2]
        samples.append((ids, [-100] * prompt + ids[prompt:]))
    packed = packing.pack_samples(samples, LENGTH, pad_token_id=2)
    rows = [packing.row_item(packed["input_ids"][i], packed["labels"][i], packed["attention_mask"][i],
                             packed["sample_starts"][i], LENGTH) for i in range(2)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    assert all(len(packed["sample_starts"][i]) >= 2 for i in range(2))      # really packed
    assert int(batch["attention_mask"].sum()) < 2 * LENGTH                  # with a padding tail
    return batch, [packed["sample_starts"][i] for i in range(2)]


@contextlib.contextmanager
def flex_uncompiled():
    """FlexAttention without inductor (see the module docstring); its warning about it is expected."""
    with torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def test_block_mask_allows_exactly_the_dense_mask_pairs():
    batch, _ = packed_batch()
    position_ids = batch["position_ids"]
    block_mask = packing.block_causal_block_mask(position_ids, batch["attention_mask"])
    assert tuple(block_mask.shape) == (2, 1, LENGTH, LENGTH)
    b = torch.arange(2).view(2, 1, 1)
    q = torch.arange(LENGTH).view(1, LENGTH, 1)
    kv = torch.arange(LENGTH).view(1, 1, LENGTH)
    allowed = block_mask.mask_mod(b, torch.zeros_like(b), q, kv)                    # (2, L, L)
    dense_allowed = packing.block_causal_mask(position_ids, torch.float32)[:, 0] == 0
    for row in range(2):
        real = int(batch["attention_mask"][row].sum())
        # every real token sees exactly what the dense SDPA mask lets it see
        assert torch.equal(allowed[row, :real], dense_allowed[row, :real])
        # the padding tail is a document of its own: causal among the pads, blind to the samples
        assert not allowed[row, real:, :real].any()
        assert torch.equal(allowed[row, real:, real:], torch.ones(LENGTH - real, LENGTH - real, dtype=torch.bool).tril())
    # without the attention mask the padding belongs to the last sample, as in the dense mask
    no_pad_info = packing.block_causal_block_mask(position_ids)
    assert torch.equal(no_pad_info.mask_mod(b, torch.zeros_like(b), q, kv), dense_allowed)
    # 128 x 128 tiles that lie entirely across samples are skipped: 4 x 4 tiles, causal keeps 10 of 16; two
    # samples of 256 keep 3 + 3
    causal = packing.block_causal_block_mask(torch.arange(512).view(1, 512))
    two_samples = packing.block_causal_block_mask(torch.arange(512).remainder(256).view(1, 512))
    assert (causal.sparsity(), two_samples.sparsity()) == (100 * 6 / 16, 100 * 10 / 16)


def test_flex_forward_loss_equals_sdpa_block_mask_and_samples_stay_apart():
    sdpa, flex = tiny_models()
    batch, starts = packed_batch()
    with torch.no_grad(), flex_uncompiled():
        ref_sum, ref_count = train_step.forward_loss_sum(sdpa, batch, "sdpa", torch.float32)
        flex_sum, flex_count = train_step.forward_loss_sum(flex, batch, "flex_attention", torch.float32)
        assert flex_count == ref_count > 50
        assert abs(float(flex_sum) - float(ref_sum)) <= 1e-5 * abs(float(ref_sum))

        def hidden(model, impl, input_ids):
            mask = train_step.attention_mask_for(impl, batch["position_ids"], torch.float32)
            return model.model(input_ids=input_ids, attention_mask=mask, position_ids=batch["position_ids"],
                               use_cache=False).last_hidden_state

        def run_flex(input_ids):
            return hidden(flex, "flex_attention", input_ids)

        before = run_flex(batch["input_ids"])
        assert torch.allclose(before, hidden(sdpa, "sdpa", batch["input_ids"]), atol=1e-4, rtol=1e-4)
        # new tokens for sample 1 of row 0: sample 2 of that row (and row 1) must not notice
        s1, s2 = starts[0][0], starts[0][1]
        changed = batch["input_ids"].clone()
        changed[0, s1:s2] = torch.randint(3, config.TINY_MODEL["vocab_size"], (s2 - s1,),
                                          generator=torch.Generator().manual_seed(1))
        after = run_flex(changed)
        assert (after[0, s1:s2] - before[0, s1:s2]).abs().max() > 1e-2          # sample 1 itself changed
        assert torch.equal(after[0, s2:], before[0, s2:])                          # the rest of the row did not
        assert torch.equal(after[1], before[1])
        # the control: a token changed inside sample 2 does reach sample 2's later positions
        inside = batch["input_ids"].clone()
        inside[0, s2] = (inside[0, s2] + 1) % config.TINY_MODEL["vocab_size"]
        assert (run_flex(inside)[0, s2 + 1:s2 + 10] - before[0, s2 + 1:s2 + 10]).abs().max() > 1e-2


def test_attention_choice_and_its_refusals():
    cpu = torch.device("cpu")
    assert model_loader.training_attention("sdpa", cpu)[0] == "sdpa"
    assert model_loader.training_attention(False, cpu)[0] == "sdpa"          # the old --use_flash_attention switch
    assert model_loader.training_attention("flash", cpu)[0] == "sdpa"       # falls back, as before
    with pytest.raises(LoaderError, match=r"--attention flex trains on a CUDA GPU only: FlexAttention has no "
                                          r"backward pass on a CPU .*use --attention sdpa"):
        model_loader.training_attention("flex", cpu)
    base = ["--model_path", "m", "--data_path", "d.pkl"]
    assert finetune.parse_args(base).attention == config.TRAINING_ATTENTION == "sdpa"
    args = finetune.parse_args(base + ["--use_flash_attention"])
    assert args.attention == "flash" and args.use_flash_attention
    args = finetune.parse_args(base + ["--attention", "flex", "--liger"])
    assert (args.attention, args.liger, args.use_flash_attention) == ("flex", "all", False)
    assert finetune.parse_args(base + ["--liger", "kernels"]).liger == "kernels"
    assert finetune.parse_args(base).liger == "off"
    with pytest.raises(SystemExit):
        finetune.parse_args(base + ["--use_flash_attention", "--attention", "flex"])


def test_liger_refuses_on_cpu_and_without_the_package():
    fused_kernels.check_liger("off", torch.device("cpu"))                     # nothing asked, nothing checked
    with pytest.raises(LoaderError, match=r"--liger needs a CUDA GPU: liger-kernel's kernels are Triton GPU code"):
        fused_kernels.check_liger("all", torch.device("cpu"))
    try:
        import liger_kernel.transformers  # noqa: F401
        pytest.skip("liger-kernel is installed here; the missing-package message cannot be shown")
    except ImportError:
        pass
    # a CUDA device (not touched: the package check comes first) without the package
    with pytest.raises(LoaderError, match=r"--liger needs the liger-kernel package \(and triton\).*"
                                          r"requirements-gpu\.txt"):
        fused_kernels.check_liger("kernels", torch.device("cuda"))


@pytest.mark.slow
def test_finetune_stops_with_one_message_for_gpu_only_levers(tmp_path):
    """finetune.py on a CPU with --attention flex, and with --liger: exit 2 (data_io.fail), one "error:" line, no traceback,
    before any model or data is loaded (the model path does not even exist)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    base = [sys.executable, "code/finetune.py", "--use_lora", "--model_path", str(tmp_path / "no_model"),
            "--data_path", SAMPLE_PKL, "--save_dir", str(tmp_path)]
    runs = {flag: subprocess.Popen(base + list(flag), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            for flag in (("--attention", "flex"), ("--liger",))}
    for flag, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (flag, out[-2000:], err[-2000:])
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err[-2000:]
        expected = "error: --attention flex trains on a CUDA GPU only" if flag[0] == "--attention" \
            else "error: --liger needs a CUDA GPU: liger-kernel's kernels"
        assert errors[0].startswith(expected), errors


def test_readme_gpu_extra_resolves():
    """README's `pip install -r requirements-gpu.txt`: the pinned GPU extra exists in the package index
    (a dry run without dependencies; installing it needs a CUDA machine's triton)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "-r",
                           os.path.join(REPO, "requirements-gpu.txt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Would install liger_kernel-0.8.5" in proc.stdout
