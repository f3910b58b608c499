"""finetune.py and finetune.sh on CPU with the tiny model: real learning (loss halves, answers
memorised), data-parallel equivalence, packed-row isolation, checkpoints, and bad input."""
import glob
import json
import math
import os
import sys

import pytest
import torch

from conftest import SAMPLE_PKL, run_launcher, run_script

import config
import data_io
import dataset
import distributed
import finetune
import model_loader
import packing
import train_step

MAX_LENGTH = 256
LORA_EPOCHS = 8
COPIES = 60   # each dialogue repeated, so one epoch is many optimizer steps (and few per-epoch checkpoints)


def small_dialogues():
    """The canned two-turn dialogue plus three short single-turn ones from the sample data."""
    dialogues = data_io.load_dialogues(SAMPLE_PKL)
    short = sorted((d for d in dialogues[1:] if len(d) == 1 and not d[0]["input"] and 15 <= len(d[0]["output"]) <= 30),
                   key=lambda d: d[0]["instruction"])[:3]
    return [dialogues[0]] + short


def convert(tokenizer_dir, out_dir, dialogues, *extra):
    path = os.path.join(out_dir, "dialogues.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dialogues, f, ensure_ascii=False)
    run_script(["code/convert_data.py", "--tokenizer", tokenizer_dir, "--max_length", str(MAX_LENGTH),
                "--out_data_path", out_dir, "--data_file", path, "--template", "zh",
                "--max_dialogues_per_sample", "1", *extra], check=True)
    return os.path.join(out_dir, "llama_ift_data_ids.pkl")


def losses(run_dir):
    with open(os.path.join(run_dir, "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def greedy_answer(model, tokenizer, history, query):
    """The answer inference.py's own path (chat.start_reply: the prompt, the stop at the end marker,
    the clean-up) gives with greedy decoding and no repetition penalty."""
    import chat

    settings = chat.generation_settings(do_sample=False, repetition_penalty=1.0, max_new_tokens=160)
    result = chat.start_reply(model, tokenizer, history, query, settings).result()
    assert result.finish_reason == "stop", result
    return result.response


def assert_memorised(model, tokenizer, dialogues):
    canned = dialogues[0]
    first = greedy_answer(model, tokenizer, [], canned[0]["instruction"])
    assert first == canned[0]["output"]
    second = greedy_answer(model, tokenizer, [(canned[0]["instruction"], first)], canned[1]["instruction"])
    assert second == canned[1]["output"]


@pytest.fixture(scope="module")
def lora_data(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_data"))
    return convert(tiny_model_dir, out, small_dialogues() * COPIES)


@pytest.mark.slow
def test_finetune_sh_lora_two_ranks_learns_and_memorises(tiny_model_dir, lora_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = dict(GPUS="0,1", MASTER_PORT="29731", MODEL_PATH=tiny_model_dir, DATA_PATH=lora_data,
               SAVE_DIR=str(tmp_path / "ckp"))
    args = ["--max_length", str(MAX_LENGTH), "--micro_batch_size", "1", "--grad_accum", "2", "--lr", "1e-2",
            "--warmup_steps", "5", "--lora_dropout", "0", "--no_progress", "--seed", "1", "--lr_schedule", "linear"]
    proc = run_launcher(["bash", "finetune.sh"] + args + ["--max_epoches", str(LORA_EPOCHS)], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "attention: PyTorch SDPA (the flash_attn package is not installed" in proc.stdout
    assert "ranks: 2" in proc.stdout
    assert "effective configuration" not in proc.stdout     # saved to training_config.json, printed on request only
    run_dir = tmp_path / "ckp" / "llama_lora"
    history = losses(run_dir)
    assert sum(history[-3:]) / 3 <= 0.5 * sum(history[:3]) / 3
    # --lr_schedule linear: up to 1e-2 over 5 steps, then down to 0 at the last step (a constant 1e-2
    # leaves the adapter hopping around the minimum, and the greedy answers then fail now and then)
    rates = [json.loads(line)["lr"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert abs(max(rates) - 1e-2) < 1e-9 and rates.index(max(rates)) <= 5
    assert rates[-1] < 0.01 * max(rates) and all(a >= b for a, b in zip(rates[5:], rates[6:]))
    # the seed's layout: one checkpoint per epoch, each a standard PEFT adapter + tokenizer + config
    final = run_dir / f"llama_lora_epoch{LORA_EPOCHS - 1}"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_config.json",
                 "tokenizer.model", "chat_template.jinja", "generation_config.json"):
        assert (final / name).exists(), name
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("llama_lora_epoch")) == \
        sorted(f"llama_lora_epoch{e}" for e in range(LORA_EPOCHS))
    assert not glob.glob(str(run_dir / ".tmp*"))
    record = json.loads((run_dir / "training_config.json").read_text(encoding="utf-8"))
    assert record["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 1
    assert record["deepspeed_config"]["gradient_accumulation_steps"] == 2
    assert record["deepspeed_config"]["zero_optimization"]["stage"] == 1
    assert record["world_size"] == 2 and record["precision"] == "fp32"
    assert record["deepspeed_config"]["scheduler"]["type"] == "WarmupDecayLR"
    assert (run_dir / "loss_curve.png").exists() and glob.glob(str(run_dir / "tensorboard" / "events.*"))
    # plain PeftModel.from_pretrained loads it, and greedy decoding gives back the trained answers
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final)).eval()
    assert_memorised(model, tokenizer, small_dialogues())
    # the README's resume command: one more epoch, continuing from the newest checkpoint
    steps_done = len(history)
    proc = run_launcher(["bash", "finetune.sh"] + args + ["--max_epoches", str(LORA_EPOCHS + 1),
                                                          "--resume_from", "latest"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming from {final}: step {steps_done}, epoch {LORA_EPOCHS}, step 0" in proc.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps_done + steps_done // LORA_EPOCHS + 1))
    assert (run_dir / f"llama_lora_epoch{LORA_EPOCHS}" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_full_finetune_without_launcher_memorises(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = convert(tiny_model_dir, str(tmp_path / "data"), small_dialogues() * COPIES, "--special_end_token")
    proc = run_script(["code/finetune.py", "--model_path", tiny_model_dir, "--data_path", data,
                       "--dataset_type", "DatasetIds", "--max_length", str(MAX_LENGTH), "--max_epoches", "4",
                       "--save_dir", str(tmp_path / "ckp"), "--save_name", "full", "--micro_batch_size", "4",
                       "--grad_accum", "1", "--lr", "3e-3", "--warmup_steps", "5", "--no_progress", "--seed", "1",
                       "--print_config"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "added '<end>' as token" in proc.stdout and "ranks: 1" in proc.stdout
    assert "effective configuration:" in proc.stdout      # --print_config
    run_dir = tmp_path / "ckp" / "full"
    history = losses(run_dir)
    assert sum(history[-3:]) / 3 <= 0.5 * sum(history[:3]) / 3
    final = run_dir / "full_epoch3"
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    # '<end>' is one token (the last), which only the template produces: the project's loader keeps it
    # characters when written in text; engines (AutoTokenizer) parse it, as the rendered chat template needs
    tokenizer = model_loader.load_tokenizer(str(final))
    assert tokenizer.convert_tokens_to_ids("<end>") == len(tokenizer) - 1
    assert len(tokenizer("<end>", add_special_tokens=False)["input_ids"]) > 1
    engine = AutoTokenizer.from_pretrained(str(final))
    assert engine("<end>", add_special_tokens=False)["input_ids"] == [len(tokenizer) - 1]
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert_memorised(model, tokenizer, small_dialogues())


def lora_weights(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_twice_the_batch(tiny_model_dir, lora_data, tmp_path):
    common = ["code/finetune.py", "--use_lora", "--model_path", tiny_model_dir, "--data_path", lora_data,
              "--max_length", str(MAX_LENGTH), "--max_epoches", "1", "--max_steps", "3", "--lr", "1e-2",
              "--warmup_steps", "1", "--lora_dropout", "0", "--no_progress", "--seed", "3", "--save_steps", "1000"]
    runs = {
        "two_ranks_mb1": (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29741"] + common
                          + ["--micro_batch_size", "1", "--grad_accum", "1"]),
        "one_rank_mb2": common + ["--micro_batch_size", "2", "--grad_accum", "1"],
        "one_rank_mb1_accum2": common + ["--micro_batch_size", "1", "--grad_accum", "2"],
    }
    weights = {}
    for name, args in runs.items():
        args = args + ["--save_dir", str(tmp_path), "--save_name", name]
        proc = run_launcher([sys.executable] + args, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        weights[name] = lora_weights(tmp_path / name / f"{name}_epoch0")
    reference = weights["one_rank_mb2"]
    initial_changed = False
    for name, w in weights.items():
        assert w.keys() == reference.keys()
        for key in reference:
            assert torch.allclose(w[key], reference[key], atol=1e-4, rtol=0), (name, key)
            if "lora_B" in key and reference[key].abs().max() > 1e-3:
                initial_changed = True  # lora_B starts at zero: the runs really trained
    assert initial_changed


def test_packed_row_loss_equals_samples_run_alone(tiny_model_dir, tiny_tokenizer):
    """A packed row's token-mean loss equals the token-weighted loss of its samples run one by one."""
    from transformers import AutoModelForCausalLM

    import prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    samples = []
    for dialogue in small_dialogues():
        ids, labels = prompt.encode_segments(tiny_tokenizer, prompt.conversation_segments(dialogue, template="zh"))
        samples.append((ids + [tiny_tokenizer.eos_token_id], labels + [tiny_tokenizer.eos_token_id]))
    packed = packing.pack_samples(samples, 512, dataset.pad_token_id_of(tiny_tokenizer))
    assert len(packed["input_ids"]) == 1 and len(packed["sample_starts"][0]) == 4
    row = packing.row_item(packed["input_ids"][0], packed["labels"][0], packed["attention_mask"][0],
                           packed["sample_starts"][0], 512)
    batch = {k: v.unsqueeze(0) for k, v in row.items()}
    with torch.no_grad():
        loss_sum, count = train_step.forward_loss_sum(model, batch, "sdpa", torch.float32)
        alone_sum, alone_count = 0.0, 0
        for ids, labels in samples:
            single = packing.row_item(ids, labels, [1] * len(ids), [0], len(ids))
            s, n = train_step.forward_loss_sum(model, {k: v.unsqueeze(0) for k, v in single.items()}, "sdpa", torch.float32)
            alone_sum, alone_count = alone_sum + float(s), alone_count + n
        assert count == alone_count
        assert abs(float(loss_sum) / count - alone_sum / alone_count) < 1e-4
        # without the block mask (plain causal attention over the row) the samples leak into each other
        leaky = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        leaky_sum = torch.nn.functional.cross_entropy(leaky[0, :-1], batch["labels"][0, 1:], ignore_index=-100,
                                                      reduction="sum")
        assert abs(float(leaky_sum) / count - alone_sum / alone_count) > 1e-3


def test_end_token_embedding_starts_as_mean_of_its_pieces(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import finetune

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pieces = finetune.add_end_token(tokenizer)
    assert pieces and len(pieces) > 1
    before_in = model.get_input_embeddings().weight[pieces].mean(0).clone()
    before_out = model.get_output_embeddings().weight[pieces].mean(0).clone()
    new_id = finetune.init_end_embedding(model, tokenizer, pieces)
    assert new_id == len(tokenizer) - 1 == model.get_input_embeddings().weight.shape[0] - 1
    assert torch.allclose(model.get_input_embeddings().weight[new_id], before_in)
    assert torch.allclose(model.get_output_embeddings().weight[new_id], before_out)
    assert finetune.add_end_token(tokenizer) is None  # already one token: nothing added twice


def bad_run(args):
    proc = run_script(["code/finetune.py"] + args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.slow
def test_bad_inputs_stop_before_training(tiny_model_dir, lora_data, tmp_path):
    base = ["--use_lora", "--model_path", tiny_model_dir, "--data_path", lora_data, "--max_length", str(MAX_LENGTH),
            "--save_dir", str(tmp_path / "ckp")]
    err = bad_run(base[:3] + ["--data_path", str(tmp_path / "missing.pkl"), "--max_length", "256"])
    assert "--data_path" in err and "missing.pkl" in err and "convert_data.py" in err
    err = bad_run(["--use_lora", "--model_path", str(tmp_path / "no_model"), "--data_path", lora_data,
                   "--max_length", str(MAX_LENGTH), "--save_dir", str(tmp_path / "ckp")])
    assert "--model_path" in err and "no_model" in err
    err = bad_run(base[:-2] + ["--max_length", "128", "--save_dir", str(tmp_path / "ckp")])
    assert "max_length 256" in err and "--max_length 128" in err
    err = bad_run(base + ["--load_lora"])
    assert "--load_lora needs --load_lora_path" in err
    # full fine-tuning on data converted for LoRA: the vocabulary differs by the '<end>' token
    err = bad_run(["--model_path", tiny_model_dir, "--data_path", lora_data, "--max_length", str(MAX_LENGTH),
                   "--save_dir", str(tmp_path / "ckp")])
    assert "--special_end_token" in err and "vocabulary" in err
    # an ids file made with another tokenizer
    other = str(tmp_path / "other_tok")
    run_script(["code/build_tiny_model.py", "--data", SAMPLE_PKL, "--out", other, "--vocab_size", "900"], check=True)
    other_data = convert(other, str(tmp_path / "other_data"), small_dialogues())
    err = bad_run(base[:3] + ["--data_path", other_data, "--max_length", str(MAX_LENGTH), "--save_dir", str(tmp_path / "ckp")])
    assert "tokenizer" in err and "convert_data.py" in err
    # a save_dir that cannot be written
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = bad_run(base[:-2] + ["--save_dir", str(blocker / "sub")])
    assert "--save_dir" in err
    assert not (tmp_path / "ckp").exists() or not any((tmp_path / "ckp").rglob("*.safetensors"))


@pytest.mark.slow
def test_load_lora_continues_from_the_adapter(tiny_model_dir, lora_data, tmp_path):
    """--load_lora starts from the saved adapter (not a fresh zero-initialised one)."""
    common = ["code/finetune.py", "--use_lora", "--model_path", tiny_model_dir, "--data_path", lora_data,
              "--max_length", str(MAX_LENGTH), "--max_epoches", "1", "--lr", "1e-2", "--lora_dropout", "0",
              "--micro_batch_size", "2", "--grad_accum", "1", "--no_progress", "--save_dir", str(tmp_path)]
    proc = run_script(common + ["--max_steps", "3", "--warmup_steps", "1", "--save_name", "first"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = lora_weights(tmp_path / "first" / "first_epoch0")
    # WarmupLR starts at lr 0, so one step after loading changes nothing: the result is the loaded adapter
    proc = run_script(common + ["--max_steps", "1", "--warmup_steps", "5", "--save_name", "second", "--load_lora",
                                "--load_lora_path", str(tmp_path / "first" / "first_epoch0")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = lora_weights(tmp_path / "second" / "second_epoch0")
    assert any("lora_B" in k and first[k].abs().max() > 1e-4 for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_chunked_output_layer_gives_the_same_loss_and_gradients(tiny_model_dir, lora_data):
    """--loss_chunk: the output layer and loss in chunks (recomputed in backward) equal the whole logits."""
    import data_io
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():   # non-zero B, so the LoRA gradients are not trivially equal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    rows = dataset.DatasetIds(None, data_io.safe_load_pickle(lora_data), MAX_LENGTH)
    batch = {k: torch.stack([rows[0][k], rows[1][k]]) for k in ("input_ids", "labels", "position_ids")}

    def loss_and_grads(chunk):
        model.zero_grad()
        loss_sum, count = train_step.forward_loss_sum(model, batch, "sdpa", torch.float32, loss_chunk=chunk)
        loss_sum.backward()
        return loss_sum.item(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole_loss, whole_count, whole_grads = loss_and_grads(0)
    # the reference: the model's own logits over every position, masked the same way
    with torch.no_grad():
        mask = packing.block_causal_mask(batch["position_ids"], torch.float32)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
        reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                      batch["labels"][:, 1:].reshape(-1), reduction="sum")
    assert whole_count > 7 * 3
    assert abs(whole_loss - float(reference)) <= 1e-4 * abs(float(reference))
    chunk_loss, chunk_count, chunk_grads = loss_and_grads(7)    # many chunks, the last one partial
    assert chunk_count == whole_count
    assert abs(chunk_loss - whole_loss) <= 1e-5 * abs(whole_loss)
    for name, grad in whole_grads.items():
        # fp32 sums in another order: off by rounding, relative to the tensor's own scale (the gradients
        # reach ~200 here, and an element-wise atol of 1e-6 failed on AMD EPYC by 1.5e-4)
        assert float((chunk_grads[name] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()), name


@pytest.mark.slow
def test_qlora_nf4_base_trains_the_adapter(tiny_model_dir, lora_data, tmp_path):
    """--quant nf4: the frozen base in 4 bits (bitsandbytes, also on a CPU); the adapter still learns."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = run_script(["code/finetune.py", "--use_lora", "--quant", "nf4",
                       "--model_path", tiny_model_dir, "--data_path", lora_data, "--max_length", str(MAX_LENGTH),
                       "--max_epoches", "1", "--max_steps", "40", "--micro_batch_size", "2", "--grad_accum", "1",
                       "--lr", "1e-2", "--warmup_steps", "2", "--lora_dropout", "0", "--no_progress",
                       "--save_steps", "1000", "--save_dir", str(tmp_path), "--save_name", "qlora"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = losses(tmp_path / "qlora")
    assert len(history) == 40
    assert sum(history[-3:]) / 3 <= 0.5 * sum(history[:3]) / 3
    # the adapter is a plain PEFT adapter: it loads on the unquantized base
    adapter = tmp_path / "qlora" / "qlora_epoch0"
    record = json.loads((adapter / "training_config.json").read_text(encoding="utf-8"))
    assert record["args"]["quant"] == "nf4"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    assert any("lora_B" in n and p.abs().max() > 1e-3 for n, p in model.named_parameters())
    # full fine-tuning of a quantized base is refused with the fix named
    err = bad_run(["--quant", "nf4", "--model_path", tiny_model_dir, "--data_path", lora_data])
    assert "--quant nf4" in err and "--use_lora" in err


def test_lr_schedules_fall_to_zero_at_the_last_step():
    """--lr_schedule linear / cosine: DeepSpeed's schedulers built from finetune's config warm up to the peak
    and reach 0 at the last step; constant keeps config.py's WarmupLR."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR

    args = finetune.parse_args(["--use_lora", "--model_path", "m", "--data_path", "d", "--lr", "2e-3",
                                "--warmup_steps", "10"])
    ds = distributed.resolve_ds_config(args, "fp32", torch.device("cpu"))
    assert distributed.with_lr_schedule(ds, "constant", 100) == ds
    for schedule, cls in (("linear", WarmupDecayLR), ("cosine", WarmupCosineLR)):
        section = distributed.with_lr_schedule(ds, schedule, 100)["scheduler"]
        assert section["type"] == cls.__name__
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        scheduler = cls(optimizer, **section["params"])
        rates = []
        for _ in range(100):
            scheduler.step()
            rates.append(scheduler.get_lr()[0])
        assert abs(rates[10] - 2e-3) < 2e-6, rates[:12]           # the peak once warmed up (step 10)
        middle = 2e-3 * (0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert abs(rates[55] - middle) < 2e-3 * 0.03, (schedule, rates[55])
        assert rates[-1] < 2e-3 * 0.02 and all(a >= b for a, b in zip(rates[10:], rates[11:]))
    with pytest.raises(SystemExit):
        finetune.parse_args(["--use_lora", "--model_path", "m", "--data_path", "d", "--deepspeed_config", "x.json",
                             "--lr_schedule", "cosine"])


def test_deepspeed_configs_keep_their_values():
    """config.py writes the shared part of the two DeepSpeed configs once; the resolved dicts stay the seed's."""
    zero = {"stage": 1, "allgather_partitions": True, "allgather_bucket_size": 2e8, "reduce_scatter": True,
            "reduce_bucket_size": 2e8, "contiguous_gradients": True}
    shared = {"bf16": {"enabled": True}, "gradient_clipping": 1.0, "steps_per_print": 1000000,
              "wall_clock_breakdown": False}
    warmup = {"warmup_min_lr": 0.0, "warmup_num_steps": 300, "warmup_type": "linear"}
    assert config.DS_CONFIG_lora == dict(
        shared, zero_optimization=zero, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=8,
        optimizer={"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        scheduler={"type": "WarmupLR", "params": dict(warmup, warmup_max_lr=3e-4)})
    assert config.DS_CONFIG_ft == dict(
        shared, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=16,
        zero_optimization=dict(zero, offload_optimizer={"device": "cpu", "pin_memory": True}),
        optimizer={"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}},
        scheduler={"type": "WarmupLR", "params": dict(warmup, warmup_max_lr=1e-5)})
