"""bench/bench_train.py on CPU (tiny shape): it runs finetune.py's own step end to end, reports
positive speed figures for both variants, and gradient checkpointing leaves the loss unchanged.

Speed is not asserted: it depends on the machine and its load.
"""
import json
import os

import pytest

from conftest import load_script, run_script

import bench_common
import data_io
import dataset
import packing
import train_figures



def load_bench():
    return load_script("bench/bench_train.py")


def test_synthetic_rows_are_packed_with_several_samples(tmp_path):
    bench = load_bench()
    shape = bench.shape_of("tiny")
    path = str(tmp_path / "ids.pkl")
    info = bench.write_ids_file(path, shape, 512, rows_needed=8, seed=3)
    datas = data_io.safe_load_pickle(path)          # the reader finetune.py uses
    rows = dataset.DatasetIds(None, datas, 512)
    assert len(rows) == info["rows"] >= 8
    assert 0.5 < info["real_token_share_all_rows"] < 1.0
    assert sum(len(starts) > 1 for starts in datas["sample_starts"]) >= len(rows) // 2   # packed rows
    item = rows[0]
    assert int((item["position_ids"] == 0).sum()) >= len(datas["sample_starts"][0])
    assert int(item["input_ids"].max()) < shape["vocab_size"]
    learned = item["labels"] != packing.IGNORE_INDEX
    assert 0 < int(learned.sum()) < int(item["attention_mask"].sum())
    again = str(tmp_path / "again.pkl")
    bench.write_ids_file(again, shape, 512, rows_needed=8, seed=3)
    assert data_io.safe_load_pickle(again) == datas


def test_flops_formula_reproduces_the_baseline_figures():
    """The baseline formula column, fed the H200 baseline's tokens/s, gives its TFLOP/s (384.0 and 418.7)."""
    s = bench_common.SHAPE_13B
    d, L, f, V = s["hidden_size"], s["num_layers"], s["intermediate_size"], s["vocab_size"]
    params = 2 * V * d + L * (4 * d * d + 3 * d * f + 2 * d) + d     # LlamaForCausalLM, untied embeddings
    lora = L * 2 * 8 * (d + d)                                        # r 8 on q_proj and v_proj
    for ckpt, name in ((False, "plain"), (True, "checkpointing")):
        flops = train_figures.flops_per_position(s, 2048, lora, params, ckpt)
        base = train_figures.BASELINE[name]
        assert abs(flops["baseline_formula"] * base["tokens_per_s"] / 1e12 - base["tflops"]) < 0.1
        assert flops["hw"] >= flops["model"]
        assert (flops["hw"] > flops["model"]) == ckpt


@pytest.mark.slow
def test_bench_runs_on_cpu_and_checkpointing_keeps_the_loss(tmp_path):
    out = tmp_path / "bench_train.json"
    proc = run_script(["bench/bench_train.py", "--shape", "tiny", "--steps", "3", "--warmup", "1",
                       "--variants", "plain,checkpointing,loss_unchunked,qlora_nf4,flex,liger", "--json", str(out)],
                      timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "losses agree across variants (tolerance 0.001): yes" in proc.stdout
    assert "TFLOP/s" in proc.stdout and "FLOPs per position" in proc.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["command"].startswith("python bench/bench_train.py --shape tiny")
    assert report["shape_name"] == "tiny" and report["device"] == "cpu"
    assert report["losses_agree"] is True
    variants = {v["variant"]: v for v in report["variants"]}
    assert list(variants) == ["plain", "checkpointing", "loss_unchunked", "qlora_nf4", "flex", "liger"]
    # GPU-only levers are recorded as skipped with finetune's reason, and the run still succeeds
    assert variants["flex"]["skipped"].startswith("--attention flex trains on a CUDA GPU only")
    assert variants["liger"]["skipped"].startswith("--liger needs a CUDA GPU")
    assert "losses" not in variants["flex"] and "losses" not in variants["liger"]
    assert "flex skipped: --attention flex" in proc.stdout
    plain, ckpt = variants["plain"], variants["checkpointing"]
    # the whole logits at once: the same losses as the chunked default
    assert variants["loss_unchunked"]["loss_max_abs_diff"] <= 1e-5
    # QLoRA: a 4-bit base loaded through finetune.build_model; it trains, its loss is not compared
    qlora = variants["qlora_nf4"]
    assert qlora["trainable_params"] == plain["trainable_params"] and "loss_reference" not in qlora
    assert all(0 < loss < 20 for loss in qlora["losses"]) and qlora["tokens_per_s"] > 0
    assert plain["checkpointing_active"] is False and ckpt["checkpointing_active"] is True
    for v in (plain, ckpt):
        assert v["model_freed"] is True     # the next variant starts from a clean slate
        assert v["attention"] == "sdpa"
        assert v["tokens_per_s"] > 0 and v["all_tokens_per_s"] >= v["tokens_per_s"]
        assert v["tflops_model"] > 0 and v["peak_mem_GiB"] > 0
        assert 0.5 < v["real_token_share"] <= 1.0
        assert len(v["losses"]) == 4 and all(loss > 0 for loss in v["losses"])
    # identical data and seeds: checkpointing must not change the loss
    assert len(plain["losses"]) == len(ckpt["losses"])
    for a, b in zip(plain["losses"], ckpt["losses"]):
        assert abs(a - b) <= 1e-3
    assert plain["real_tokens"] == ckpt["real_tokens"]
    probe = report["attention_probe"]
    assert probe["block_mask"]["default"] > 0 and probe["causal_no_mask"]["default"] > 0
    # the DeepSpeed config is distributed.resolve_ds_config's (config.DS_CONFIG_lora with the overrides)
    ds = report["deepspeed_config"]
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"] == {"enabled": False}


@pytest.mark.slow
def test_missing_deepspeed_is_named_and_exits_nonzero(tmp_path):
    """A machine without deepspeed gets one clear line naming it, and a non-zero exit."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "deepspeed.py").write_text("raise ImportError(\"No module named 'hjson'\")\n", encoding="utf-8")
    env = {"PYTHONPATH": str(shadow) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = run_script(["bench/bench_train.py", "--shape", "tiny", "--steps", "1", "--warmup", "0"], env=env,
                      timeout=300)
    assert proc.returncode == 2
    assert "deepspeed (ImportError: No module named 'hjson')" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_13b_shape_refuses_a_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_script(["bench/bench_train.py", "--shape", "13b", "--steps", "1"], timeout=300)
    assert proc.returncode == 2
    assert "--shape 13b needs a CUDA GPU" in proc.stderr


def test_variant_order_and_loss_tolerance_by_precision():
    """liger variants must come last (liger patches transformers' LLaMA for the whole process); the default
    loss tolerance follows the precision (fp32 exact on the CPU, bf16 wider)."""
    bench = load_bench()
    assert bench.parse_args(["--variants", "plain,flex,liger_flex,liger"]).variant_list[-1] == "liger"
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "liger_flex,plain"])
    assert bench.parse_args([]).loss_tol is None          # resolved by precision once the device is known
    assert bench.LOSS_TOL["fp32"] == 1e-3 and bench.LOSS_TOL["bf16"] == 2e-2
    # every GPU variant is a set of finetune.py flags that finetune's own parser accepts
    import finetune

    for name, flags in bench.VARIANTS.items():
        args = finetune.parse_args(["--model_path", "m", "--data_path", "d.pkl", "--use_lora"] + flags)
        assert ("--liger" in flags) == (args.liger != "off"), name
