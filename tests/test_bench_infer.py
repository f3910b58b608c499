"""The --fast generation path (model_loader.enable_fast_path, config.FAST) and bench/bench_infer.py on CPU.

On a CPU transformers does not compile, so what runs here is the fast path's static KV cache and
torchao's int8 weight-only kernels; the compiled step (CUDA graphs) runs on a GPU only
(bench/gpu_infer_check.sh).  The figures measured here are CPU figures of a toy model, not the
13B target."""
import json

import pytest
import torch

from conftest import CANNED_ANSWERS, SAMPLE, demo_command, load_script, run_script

import chat
import config
import model_loader

inference = load_script("inference.py")   # a top-level script, not on the import path

N_PROMPTS = 20
NEW_TOKENS = 24


def greedy_ids(model, tokenizer, queries):
    settings = chat.generation_settings(do_sample=False, max_new_tokens=NEW_TOKENS)
    out = []
    for query in queries:
        reply = chat.start_reply(model, tokenizer, [], query, settings)
        reply.result()
        out.append(list(reply._generated))
    return out


def test_fast_path_greedy_equals_plain_on_the_toy_model(model_dir, loaded):
    model, tokenizer = loaded
    fast, _ = model_loader.load_model_and_tokenizer(model_dir, quant="fp32", device="cpu", fast=True,
                                                    notice=lambda message: None)
    assert model_loader.fast_path_active(fast) and not model_loader.fast_path_active(model)
    # the fast path really generates with one static cache of config.FAST["max_cache_len"] positions
    ids = torch.tensor([chat.build_prompt(tokenizer, [], "你好").input_ids])
    out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                        return_dict_in_generate=True)
    assert type(out.past_key_values).__name__ == "StaticCache"
    assert out.past_key_values.get_max_length() == config.FAST["max_cache_len"]

    queries = [turn["instruction"] for dialogue in SAMPLE for turn in dialogue[:1]][:N_PROMPTS]
    assert len(queries) == N_PROMPTS
    plain_ids, fast_ids = greedy_ids(model, tokenizer, queries), greedy_ids(fast, tokenizer, queries)
    differing = [i for i, (a, b) in enumerate(zip(plain_ids, fast_ids)) if a != b]
    print(f"fp32 static cache vs plain: {len(differing)}/{N_PROMPTS} greedy answers differ")
    assert not differing, differing   # fp32 on the same CPU: identical (no near-tie flipped in 20 prompts)
    assert sum(len(a) for a in plain_ids) > N_PROMPTS   # real answers were compared

    # int8 weight-only (torchao) computes with rounded weights: agreement is reported, not required
    pytest.importorskip("torchao")
    int8, _ = model_loader.load_model_and_tokenizer(model_dir, quant="int8", device="cpu", fast=True,
                                                    notice=lambda message: None)
    int8_ids = greedy_ids(int8, tokenizer, queries)
    same = sum(a == b for a, b in zip(plain_ids, int8_ids))
    print(f"torchao int8 fast vs fp32 plain: {same}/{N_PROMPTS} greedy answers identical")
    assert same >= N_PROMPTS // 4   # measured 11/20; a broken quantization would give noise (0/20)


def test_bench_in_memory_int8_equals_the_loaders(tiny_model_dir):
    pytest.importorskip("torchao")
    bench = load_script("bench/bench_infer.py")
    loaded, _ = model_loader.load_model_and_tokenizer(tiny_model_dir, quant="int8", device="cpu", fast=True,
                                                      notice=lambda message: None)
    plain, _ = model_loader.load_model_and_tokenizer(tiny_model_dir, quant="fp32", device="cpu",
                                                     notice=lambda message: None)
    in_memory = bench.quantize_in_memory(plain)
    a, b = dict(loaded.named_modules()), dict(in_memory.named_modules())
    linears = [name for name, m in b.items() if isinstance(m, torch.nn.Linear)]
    quantized = [name for name in linears if type(b[name].weight).__name__ == "Int8Tensor"]
    assert quantized == [name for name in linears if type(a[name].weight).__name__ == "Int8Tensor"]
    assert "lm_head" not in quantized and len(quantized) == 7 * config.TINY_MODEL["num_layers"]
    for name in quantized:
        assert torch.equal(a[name].weight.dequantize(), b[name].weight.dequantize()), name


@pytest.mark.slow
def test_bench_infer_tiny_cpu(tmp_path):
    out = tmp_path / "bench_infer_tiny.json"
    # the README's command (the default variants of the tiny shape: fp32, fp32_fast, int8_fast)
    proc = run_script(["bench/bench_infer.py", "--shape", "tiny", "--batch_sizes", "1,2", "--prompt_len", "16",
                       "--new_tokens", "8", "--json", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| variant" in proc.stdout and "fp32_fast vs fp32" in proc.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["complete"] and report["fast_config"] == config.FAST
    assert [r["variant"] for r in report["variants"]] == ["fp32", "fp32_fast", "int8_fast"]
    for r in report["variants"]:
        assert r["fast_path_active"] == r["fast"]
        assert [f["batch"] for f in r["batches"]] == [1, 2]
        for f in r["batches"]:
            assert f["decode_tokens_per_s"] > 0 and f["prefill_s"] > 0 and f["peak_mem_GiB"] > 0
            assert f["generated_lengths"] == [8] * f["batch"]   # min_new_tokens forced the length
    fast = report["variants"][1]
    assert fast["vs_plain"]["plain"] == "fp32"
    assert fast["vs_plain"]["greedy_ids_equal_prefix"] == fast["vs_plain"]["greedy_ids_compared"] == 8
    assert "Int8Tensor" in report["variants"][2]["linear_weight_type"]


def test_bench_infer_names_a_missing_package(monkeypatch, capsys):
    import importlib.util

    bench = load_script("bench/bench_infer.py")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        bench.check_packages(["fp32", "int8_fast"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: missing package(s): torchao (needed by int8_fast)" in err


def test_fast_flag_refuses_nf4(capsys):
    with pytest.raises(SystemExit) as e:
        inference.parse_args(["--fast", "--quant", "nf4"])
    assert e.value.code == 2
    assert "--fast has no nf4 path" in capsys.readouterr().err
    with pytest.raises(model_loader.LoaderError, match="--fast has no nf4 path"):
        model_loader.model_load_kwargs("nf4", "cpu", True, fast=True)


def test_fast_int8_without_torchao_is_named(monkeypatch):
    monkeypatch.setattr(model_loader, "torchao_available", lambda: False)
    with pytest.raises(model_loader.LoaderError, match="needs torchao"):
        model_loader.model_load_kwargs("int8", "cpu", True, fast=True)


@pytest.mark.slow
def test_readme_fast_demo_command(demo_run, demo_data):
    """`python inference.py --demo --fast --greedy` (README, Fast path) on the cached toy model."""
    proc = run_script(demo_command(demo_data, demo_run[2], "--fast", "--greedy"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for query, answer in zip(config.CANNED_QUERIES, CANNED_ANSWERS):
        assert f"问：{query}\n答：{answer}\n" in proc.stdout
