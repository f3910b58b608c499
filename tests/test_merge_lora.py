"""merge_lora.py: merged logits equal base + adapter (fp32, 1e-5), the directory loads with plain
transformers and runs in inference.py, sharding, and an existing --out is refused."""
import json
import os
import shutil

import pytest
import torch

from conftest import run_script

import config


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model re-initialised at LLaMA's initializer_range 0.02 (the tiny model's 0.3 gives logits
    near 17, where fp32 itself cannot hold 1e-5), saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.initializer_range = 0.02
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base02") / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.model"), out / "tokenizer.model")   # not re-saved by v5
    return str(out)


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """A LoRA adapter (config.py's settings) with random non-zero A and B: a fresh adapter's B is zero,
    which would make any merge look exact."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
        r=config.LORA_R, lora_alpha=config.LORA_ALPHA, lora_dropout=0.0, target_modules=config.LORA_TARGET_MODULES,
        bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def merged(base_dir, adapter_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("merged") / "model")
    proc = run_script(["code/merge_lora.py", "--model_path", base_dir, "--lora_path", adapter_dir,
                       "--out", out, "--max_shard_size", "2MB"], check=True)
    assert "--lora_path none" in proc.stdout
    return out


def test_merged_logits_equal_base_plus_adapter(base_dir, adapter_dir, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = torch.tensor([tokenizer("问：请推荐五本名著\n答：1.《红楼梦》", add_special_tokens=False)["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert (adapted - plain).abs().max() > 1e-2            # the adapter really changes the model
    assert (merged_logits - adapted).abs().max() <= 1e-5
    assert torch.equal(merged_logits.argmax(-1), adapted.argmax(-1))


def test_merged_directory_is_a_plain_sharded_model(merged):
    names = set(os.listdir(merged))
    assert "adapter_config.json" not in names
    assert {"config.json", "tokenizer.json", "tokenizer.model", "model.safetensors.index.json", "chat_template.jinja",
            "generation_config.json"} <= names
    with open(os.path.join(merged, "model.safetensors.index.json"), encoding="utf-8") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) >= 2 and shards <= names          # 2MB shards of a ~3 MB model
    assert not any(name.startswith(".tmp") for name in os.listdir(os.path.dirname(merged)))
    from transformers import AutoTokenizer

    import prompt

    assert prompt.segment_encoder(AutoTokenizer.from_pretrained(merged)) is not None  # the SentencePiece fast path


@pytest.mark.slow
def test_inference_runs_the_merged_model(merged):
    proc = run_script(["inference.py", "--model_path", merged, "--lora_path", "none", "--greedy",
                       "--max_new_tokens", "4", "--queries", "你好"], check=True)
    assert "你好" in proc.stdout


def test_refuses_a_non_empty_out(base_dir, adapter_dir, merged):
    before = sorted(os.listdir(merged))
    proc = run_script(["code/merge_lora.py", "--model_path", base_dir, "--lora_path", adapter_dir, "--out", merged])
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(merged)) == before


def test_fp16_merge_in_process(base_dir, adapter_dir, tmp_path):
    """The README's --dtype fp16: half-precision weights on disk, loading as fp16."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import merge_lora

    out = str(tmp_path / "fp16")
    merge_lora.merge(merge_lora.parse_args(["--model_path", base_dir, "--lora_path", adapter_dir,
                                            "--out", out, "--dtype", "fp16"]))
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16
