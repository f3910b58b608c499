"""ZeRO-3 (--zero_stage 3, offload): the flags and the config they resolve to, partitioned loading, and on
2 CPU ranks checkpoints as complete as at stage 2 (the same weights, 1e-6, fp32), an exact resume after
kill -9, data-parallel equivalence of the loss curve (1e-4), and the results loading in merge_lora.py and
inference's loader (inference.py and the API server load through it).

The launcher runs are few and short (tiny model, 4 steps); each serves several assertions.  The
equal-weights runs read their DeepSpeed config from a file with gradient clipping off: ZeRO-2 and
ZeRO-3 sum the gradient norm in different orders, so the clip factor differs in its last bit, and Adam
turns a gradient that is rounding noise near its eps (a sum that cancels) into a change of up to the
learning rate; a small rate (1e-4 full, 1e-3 LoRA) keeps such changes well under 1e-6.  Everything else (optimizer, schedule, precision, data, seed) is the same at both stages.
"""
import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_launcher
from test_finetune import MAX_LENGTH, convert, lora_weights, small_dialogues
from test_resume import WRAPPER, finish, kill_when_hanging, logged, start

import config
import distributed
import finetune
import merge_lora
import model_loader

STEPS = 4


def ds_file(path, base, stage, micro_batch, lr):
    """A DeepSpeed config file: config.py's ``base`` with ZeRO ``stage``, no clipping, a 1-step warm-up."""
    ds = copy.deepcopy(base)
    ds.update(gradient_clipping=0.0, train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1)
    ds["zero_optimization"]["stage"] = stage
    ds["optimizer"]["params"]["lr"] = lr
    ds["scheduler"]["params"].update(warmup_max_lr=lr, warmup_num_steps=1)
    path.write_text(json.dumps(ds))
    return str(path)


def torchrun(port, script, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            script] + args


def run_ok(command):
    proc = run_launcher(command, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def common(model_dir, data, save_dir, name, *extra):
    return ["--model_path", model_dir, "--data_path", data, "--max_length", str(MAX_LENGTH), "--max_epoches", "1",
            "--max_steps", str(STEPS), "--precision", "fp32", "--save_steps", "2", "--no_progress", "--seed", "3",
            "--save_dir", str(save_dir), "--save_name", name, *extra]


def assert_same(actual, expected, atol):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        assert torch.allclose(actual[key], expected[key], atol=atol, rtol=0), (key, (actual[key] - expected[key]).abs().max())


@pytest.mark.slow
def test_zero3_full_finetune_saves_whole_weights_resumes_exactly_and_matches_one_rank(tiny_model_dir, tmp_path):
    data = convert(tiny_model_dir, str(tmp_path / "data"), small_dialogues() * 4, "--special_end_token")
    wrapper = tmp_path / "finetune_with_kill_points.py"
    wrapper.write_text(WRAPPER)
    files = {stage: ds_file(tmp_path / f"ds{stage}.json", config.DS_CONFIG_ft, stage, 1, 1e-4) for stage in (2, 3)}
    one_rank_file = ds_file(tmp_path / "ds3_mb2.json", config.DS_CONFIG_ft, 3, 2, 1e-4)

    # stage 2 on 2 ranks: the reference
    run_ok(torchrun(29931, "code/finetune.py", common(tiny_model_dir, data, tmp_path / "z2", "full",
                                                      "--deepspeed_config", files[2])))
    # stage 3 on 2 ranks, killed (SIGKILL, every process) once the checkpoint of step 2 is written, then resumed
    args = common(tiny_model_dir, data, tmp_path / "z3", "full", "--deepspeed_config", files[3])
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = start(torchrun(29932, str(wrapper), args), markers, HANG_AFTER_STEP=2)
    kill_when_hanging(proc, markers, "after")
    out = finish(start(torchrun(29933, str(wrapper), args + ["--resume_from", "latest"]), markers))
    assert "resuming from" in out and "trainable parameters: 703,360" in out   # full sizes, not the local parts
    # stage 3 on 1 rank with twice the micro-batch
    one_rank = common(tiny_model_dir, data, tmp_path / "one", "full", "--deepspeed_config", one_rank_file)
    run_ok([sys.executable, "code/finetune.py"] + one_rank)

    reference = {step: load_file(str(tmp_path / "z2" / "full" / f"full_{step}" / "model.safetensors")) for step in (2, 4)}
    zero3_dir = tmp_path / "z3" / "full"
    for step in (2, 4):   # step 2: written before the kill; step 4: after the resume
        assert_same(load_file(str(zero3_dir / f"full_{step}" / "model.safetensors")), reference[step], 1e-6)
    assert reference[4]["lm_head.weight"].shape == (1201, 128)   # the '<end>' row added under ZeRO-3 too
    assert max((reference[4][k] - reference[2][k]).abs().max().item() for k in reference[4]) > 5e-5   # it trained
    # the loss curve: 2 ranks x micro-batch 1 (killed and resumed) = 1 rank x micro-batch 2
    two, one = logged(zero3_dir), logged(tmp_path / "one" / "full")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    record = json.loads((zero3_dir / "full_4" / "training_config.json").read_text())
    assert record["deepspeed_config"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    # inference's loader (inference.py, the API server) reads the stage-3 checkpoint
    model, tokenizer = model_loader.load_model_and_tokenizer(str(zero3_dir / "full_4"), quant="fp32", device="cpu")
    assert len(tokenizer) == 1201
    assert torch.allclose(model.lm_head.weight, reference[4]["lm_head.weight"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_zero3_lora_saves_the_stage2_adapter_and_merges(tiny_model_dir, tmp_path):
    data = convert(tiny_model_dir, str(tmp_path / "data"), small_dialogues() * 4)
    weights = {}
    for stage, port in ((2, 29941), (3, 29942)):
        ds = ds_file(tmp_path / f"ds{stage}.json", config.DS_CONFIG_lora, stage, 1, 1e-3)
        # LoRA dropout on: the random streams must match at both stages too
        run_ok(torchrun(port, "code/finetune.py", ["--use_lora", "--lora_dropout", "0.1", "--deepspeed_config", ds]
                        + common(tiny_model_dir, data, tmp_path / f"z{stage}", "lora")))
        weights[stage] = lora_weights(tmp_path / f"z{stage}" / "lora" / "lora_4")
    assert_same(weights[3], weights[2], 1e-6)
    assert any("lora_B" in k and v.abs().max() > 5e-4 for k, v in weights[3].items())   # lora_B starts at 0

    adapter = str(tmp_path / "z3" / "lora" / "lora_4")
    merged = str(tmp_path / "merged")
    merge_lora.merge(merge_lora.parse_args(["--model_path", tiny_model_dir, "--lora_path", adapter, "--out", merged]))
    with_adapter, _ = model_loader.load_model_and_tokenizer(tiny_model_dir, lora_path=adapter, quant="fp32", device="cpu")
    plain, _ = model_loader.load_model_and_tokenizer(merged, quant="fp32", device="cpu")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, plain(ids).logits, atol=1e-4, rtol=0)


# ---- fast checks: flags, the resolved config, bad input -------------------------------------------------------
BASE = ["--model_path", "m", "--data_path", "d.pkl"]


def resolved(*flags, device="cuda", lora=False):
    args = finetune.parse_args(BASE + (["--use_lora"] if lora else []) + list(flags))
    return distributed.resolve_ds_config(args, "bf16", torch.device(device))["zero_optimization"]


def test_zero3_and_offload_flags_resolve_into_the_deepspeed_config():
    zero = resolved("--zero_stage", "3", "--offload_optimizer", "cpu", "--offload_param", "nvme",
                    "--nvme_path", "/nvme/swap")
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == config.OFFLOAD_CPU
    assert zero["offload_param"] == dict(config.OFFLOAD_NVME_PARAM, nvme_path="/nvme/swap")
    assert resolved("--zero_stage", "3", "--offload_optimizer", "nvme", "--nvme_path", "/n",
                    lora=True)["offload_optimizer"]["nvme_path"] == "/n"
    assert "offload_optimizer" not in resolved("--zero_stage", "2", "--offload_optimizer", "none")   # ft default off
    assert "offload_optimizer" not in resolved("--zero_stage", "0")
    assert "offload_param" not in resolved("--zero_stage", "3", "--offload_param", "cpu", device="cpu")   # CPU run
    assert resolved("--zero_stage", "2")["stage"] == 2 and "stage3_prefetch_bucket_size" not in resolved()


@pytest.mark.parametrize("flags, needle", [
    (["--offload_param", "cpu"], "--zero_stage 3"),
    (["--zero_stage", "2", "--offload_param", "cpu"], "--zero_stage 3"),
    (["--zero_stage", "0", "--offload_optimizer", "cpu"], "--zero_stage 1, 2 or 3"),
    (["--zero_stage", "3", "--offload_param", "nvme"], "--nvme_path"),
    (["--nvme_path", "/n"], "--offload_optimizer nvme"),
    (["--use_lora", "--quant", "nf4", "--zero_stage", "3"], "--zero_stage 2"),
    (["--deepspeed_config", "x.json", "--offload_optimizer", "cpu"], "--deepspeed_config replaces"),
])
def test_unusable_zero_and_offload_combinations_stop_with_the_alternative(flags, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(BASE + flags)
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_zero3_file_config_with_qlora_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
                                "gradient_accumulation_steps": 1}))
    args = finetune.parse_args(BASE + ["--use_lora", "--quant", "nf4", "--deepspeed_config", str(path)])
    with pytest.raises(distributed.DataError, match="stage 3 cannot partition.*set stage 2 there, or drop --quant"):
        distributed.resolve_ds_config(args, "fp32", torch.device("cpu"))


def test_parameter_counts_and_checkpoint_estimate_use_full_sizes_of_partitioned_weights():
    """Under ZeRO-3 a rank's tensor is its part (often empty); the counts read DeepSpeed's ds_numel."""
    import checkpoints

    layer = torch.nn.Linear(30, 20, bias=False)
    expected = checkpoints.checkpoint_bytes(layer, torch.float32)
    layer.weight.data = torch.empty(0)   # what a rank holds of a weight partitioned to the other ranks
    layer.weight.ds_numel = 600
    assert checkpoints.trainable_numel(layer) == 600
    assert checkpoints.checkpoint_bytes(layer, torch.float32) == expected
