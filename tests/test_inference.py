"""inference.py, chat.py and model_loader.py on a tiny CuteGPT trained by the project's own pipeline.

One session-scoped run of `inference.py --demo` from an empty cache (with a smaller recipe: eight
sample dialogues, the canned one among them) builds, fine-tunes and caches a toy model that recalls
the sample answers; every other test reuses it.  Covered: the canned conversation with history fed
back, greedy repeatability and real sampling, the token budget (turns dropped, query cut, a
1,000-turn conversation), --output_file, the interactive mode in a pseudo-terminal (streaming,
Ctrl-C, /clear, /quit), the demo cache, old-peft LoRA adapters, and each user error.
"""
import codecs
import json
import os
import pty
import select
import shutil
import signal
import sys
import threading
import time
import warnings

import pytest
import torch

from conftest import CANNED_ANSWERS, REPO, demo_command, load_script, run_script

import chat
import config
import data_io
import demo_model
import model_loader
import prompt

inference = load_script("inference.py")   # a top-level script, not on the import path

def greedy(**overrides):
    return chat.generation_settings(do_sample=False, repetition_penalty=1.0, **overrides)


def run_main(capsys, *argv):
    """inference.main(argv) in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        inference.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def assert_clean_error(proc, *needles):
    """Exit code != 0, one 'error: ...' line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_builds_from_empty_cache_then_reuses_it(demo_run, demo_data):
    proc, first_seconds, demo_dir = demo_run
    for step in (1, 2, 3):
        assert f"[demo {step}/3]" in proc.stderr
    assert "TOY model" in proc.stdout and "sample dialogues" in proc.stdout
    # the two canned queries, answered with the sample's answers
    for query, answer in zip(config.CANNED_QUERIES, CANNED_ANSWERS):
        assert f"问：{query}\n答：{answer}\n" in proc.stdout
    assert sorted(os.listdir(demo_dir)) == ["demo_info.json", "model"]
    assert not [n for n in os.listdir(demo_dir.parent) if n.startswith(".tmp")]   # built aside, renamed in
    info = json.loads((demo_dir / "demo_info.json").read_text())
    assert info["recipe"]["data_sha256"]

    start = time.perf_counter()
    again = run_script(demo_command(demo_data, demo_dir), timeout=300)
    cached_seconds = time.perf_counter() - start
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[demo" not in again.stderr                     # nothing rebuilt
    assert again.stdout == proc.stdout                     # greedy: the same answers
    assert cached_seconds < first_seconds
    print(f"demo (test recipe): first run {first_seconds:.1f}s, cached {cached_seconds:.1f}s")


@pytest.mark.slow
def test_demo_rebuilds_a_stale_cache_and_keeps_it_until_done(tmp_path, model_dir):
    """A cache made from other settings or data is rebuilt; a rebuild that fails leaves it as it was."""
    stale = tmp_path / "demo_model"
    shutil.copytree(model_dir, stale / "model")
    info = {"recipe": {"other": True}}
    (stale / demo_model.DEMO_INFO).write_text(json.dumps(info))
    started = []

    def failing_build(work, data_file, log):
        started.append(work)
        raise data_io.DataError("the build failed")

    original = demo_model.build_demo_model
    demo_model.build_demo_model = failing_build
    try:
        with pytest.raises(data_io.DataError, match="the build failed"):
            demo_model.ensure_demo_model(str(stale), log=lambda message: None)
    finally:
        demo_model.build_demo_model = original
    assert started                                                       # a rebuild was started
    assert json.loads((stale / demo_model.DEMO_INFO).read_text()) == info   # the old cache is untouched
    assert (stale / "model" / "config.json").is_file()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]   # no half-built leftovers


# --------------------------------------------------------------------------------------------------
# the conversation
# --------------------------------------------------------------------------------------------------
def test_canned_conversation_feeds_history_back(loaded):
    model, tokenizer = loaded
    session = chat.Chat(model, tokenizer, greedy())
    first = session.ask(config.CANNED_QUERIES[0])
    assert first.response == CANNED_ANSWERS[0]
    assert (first.history_used, first.finish_reason) == (0, "stop")
    prepared = session.prepare(config.CANNED_QUERIES[1])
    # the second prompt holds the first answer, built exactly as training builds it
    expected = prompt.encode_segments(tokenizer, prompt.conversation_segments(
        prompt.chat_turns([(config.CANNED_QUERIES[0], first.response)], config.CANNED_QUERIES[1])))[0]
    assert prepared.input_ids == expected
    assert CANNED_ANSWERS[0] in tokenizer.decode(prepared.input_ids)
    second = session.ask(config.CANNED_QUERIES[1])
    assert second.response == CANNED_ANSWERS[1]
    assert second.history_used == 1
    assert second.prompt_tokens == len(expected)
    assert session.history == [(q, a) for q, a in zip(config.CANNED_QUERIES, CANNED_ANSWERS)]
    for marker in (config.END_MARKER, "<s>", "</s>"):
        assert marker not in first.response + second.response


def test_streamed_pieces_add_up_to_the_answer(loaded):
    model, tokenizer = loaded
    reply = chat.Chat(model, tokenizer, greedy()).stream(config.CANNED_QUERIES[0])
    pieces = list(reply)
    assert len(pieces) > 3
    assert "".join(pieces) == reply.result().response == CANNED_ANSWERS[0]


def test_every_answer_is_generated_on_one_long_lived_thread(loaded):
    """--fast's compiled CUDA graphs are kept per thread, so every generate() runs on one worker thread."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, tokenizer = loaded
    threads = []

    class RecordThread(LogitsProcessor):
        def __call__(self, input_ids, scores):
            threads.append(threading.current_thread())
            return scores

    answers = []
    for query in config.CANNED_QUERIES:
        prepared = chat.build_prompt(tokenizer, [], query)
        reply = chat.Reply(model, tokenizer, prepared, greedy(max_new_tokens=5), query,
                           generate_overrides={"logits_processor": LogitsProcessorList([RecordThread()])})
        answers.append(reply.result())
    assert len(threads) == sum(a.new_tokens for a in answers) >= 2
    assert len(set(threads)) == 1 and threads[0] is not threading.current_thread()
    assert threads[0].name == "cutegpt-generate" and threads[0].daemon


def test_greedy_repeats_and_sampling_samples(loaded):
    model, tokenizer = loaded
    query = "随便说点什么"   # not in the data: the toy model is unsure, so sampling shows
    runs = [chat.Chat(model, tokenizer, greedy(max_new_tokens=30)).ask(query).response for _ in range(2)]
    assert runs[0] == runs[1]
    sampled = {}
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        settings = chat.generation_settings(temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=30)
        sampled.setdefault(seed, []).append(chat.Chat(model, tokenizer, settings).ask(query).response)
    assert sampled[0][0] == sampled[0][1]                 # same seed, same sample
    assert len({v[0] for v in sampled.values()}) > 1      # sampling really happens (the seed ran greedy)


def test_cancel_stops_the_answer(loaded, monkeypatch):
    model, tokenizer = loaded
    on_tokens = chat.Reply._on_tokens

    def cancel_after_first_token(self, ids):   # a front end pressing stop as the first token shows
        on_tokens(self, ids)
        self.cancel()

    monkeypatch.setattr(chat.Reply, "_on_tokens", cancel_after_first_token)
    session = chat.Chat(model, tokenizer, greedy(max_new_tokens=200))
    result = session.ask(config.CANNED_QUERIES[0])
    assert result.finish_reason == "cancelled" and result.new_tokens <= 2   # stopped at the next check
    assert CANNED_ANSWERS[0].startswith(result.response)
    assert session.history == [(config.CANNED_QUERIES[0], result.response)]


# --------------------------------------------------------------------------------------------------
# the token budget
# --------------------------------------------------------------------------------------------------
def test_memory_limit_keeps_the_latest_turns(loaded):
    _, tokenizer = loaded
    history = [(f"问题{i}", f"回答{i}") for i in range(6)]
    p = chat.build_prompt(tokenizer, history, "最后", memory_limit=3, context_length=2048, max_new_tokens=256)
    assert p.history_used == 3
    assert p.input_ids == chat.encode_prompt(tokenizer, history[-3:], "最后")
    assert p.notices == []
    assert chat.build_prompt(tokenizer, history, "最后", memory_limit=0).history_used == 0
    assert chat.build_prompt(tokenizer, history, "最后", memory_limit=None).history_used == 6


def test_oldest_turns_dropped_to_fit_the_context(loaded):
    _, tokenizer = loaded
    history = [(f"问题{i}", "很长的回答" * 20) for i in range(5)]
    full = len(chat.encode_prompt(tokenizer, history, "最后"))
    context, new = 300, 64
    assert full + new > context
    p = chat.build_prompt(tokenizer, history, "最后", memory_limit=None, context_length=context, max_new_tokens=new)
    assert 0 < p.history_used < 5
    assert len(p.input_ids) + new <= context
    assert p.input_ids == chat.encode_prompt(tokenizer, history[-p.history_used:], "最后")
    # one more turn would not have fitted
    assert len(chat.encode_prompt(tokenizer, history[-p.history_used - 1:], "最后")) + new > context
    assert p.notices and "dropped" in p.notices[0] and not p.query_truncated


def test_long_query_is_cut_with_a_notice(loaded):
    _, tokenizer = loaded
    query = "请总结" + "这是一段很长的文字。" * 200
    context, new = 256, 64
    p = chat.build_prompt(tokenizer, [("a", "b")], query, context_length=context, max_new_tokens=new)
    assert p.query_truncated and p.history_used == 0
    assert query.startswith(p.query) and 0 < len(p.query) < len(query)
    assert len(p.input_ids) + new <= context
    assert len(chat.encode_prompt(tokenizer, [], query[:len(p.query) + 1])) + new > context   # the longest cut
    assert any("first" in n and str(len(query)) in n for n in p.notices)
    with pytest.raises(chat.ChatError, match="max_new_tokens"):
        chat.build_prompt(tokenizer, [], "hi", context_length=64, max_new_tokens=64)


class _StubModel(torch.nn.Module):
    """Stands in for the model in the 1,000-turn run: answers with a fixed run of tokens and fails,
    as a real model would, when prompt + answer pass max_position_embeddings."""

    def __init__(self, answer_ids, context):
        super().__init__()
        self.embed = torch.nn.Embedding(4, 2)
        self.config = type("Config", (), {"max_position_embeddings": context})()
        self.answer_ids, self.longest = answer_ids, 0

    def get_input_embeddings(self):
        return self.embed

    def generate(self, input_ids, streamer, max_new_tokens, **kwargs):
        assert input_ids.shape[1] + max_new_tokens <= self.config.max_position_embeddings
        self.longest = max(self.longest, input_ids.shape[1])
        streamer.put(input_ids)
        streamer.put(torch.tensor(self.answer_ids[:max_new_tokens]))   # the whole answer in one piece
        streamer.end()


@pytest.mark.slow
def test_thousand_turns_never_overflow(loaded):
    model, tokenizer = loaded
    answer_ids = tokenizer("一个相当长的回答，" * 6 + config.END_MARKER, add_special_tokens=False)["input_ids"]
    stub = _StubModel(answer_ids, context=160)
    session = chat.Chat(stub, tokenizer, greedy(max_new_tokens=64), memory_limit=None)
    used = []
    for turn in range(1000):
        result = session.ask(f"第{turn}个问题")
        used.append(result.history_used)
        assert result.prompt_tokens + 64 <= 160
    assert result.response == "一个相当长的回答，" * 6
    assert len(session.history) == 1000 and 0 < min(used[5:]) and max(used) < 5
    # and the real model, with its real context, for a long conversation under the default memory limit
    session = chat.Chat(model, tokenizer, greedy(max_new_tokens=8))
    results = [session.ask(q) for q in config.CANNED_QUERIES * 4]
    assert [r.history_used for r in results[:5]] == [0, 1, 2, 3, 3]
    assert len(session.history) == config.MEMORY_LIMIT


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_queries_and_output_file(model_dir, tmp_path, capsys):
    out = tmp_path / "turns.jsonl"
    proc = run_script(["inference.py", "--model_path", model_dir, "--greedy", "--repetition_penalty", "1.0",
                       "--output_file", str(out), "--show_prompt"], check=True)
    assert "fp32" in proc.stderr   # the CPU default, said in one line
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["query"] for r in records] == config.CANNED_QUERIES
    assert [r["response"] for r in records] == CANNED_ANSWERS
    assert [r["history_used"] for r in records] == [0, 1]
    assert [r["turn"] for r in records] == [0, 1]
    assert all(r["finish_reason"] == "stop" and r["new_tokens"] > 0 for r in records)
    # --show_prompt: the second prompt carries the first answer
    second_prompt = proc.stdout.split("问：" + config.CANNED_QUERIES[1])[1]
    assert CANNED_ANSWERS[0] in second_prompt

    code, _, _ = run_main(capsys, "--model_path", model_dir, "--greedy", "--memory_limit", "0", "--max_new_tokens",
                          "16", "--queries", "你好", "再见", "--output_file", str(out))
    assert code == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["query"], r["history_used"]) for r in records] == [("你好", 0), ("再见", 0)]


@pytest.mark.parametrize("argv, needle", [
    (["--interactive", "--queries", "hi"], "--interactive reads the queries"),
    (["--greedy", "--temperature", "0.5"], "--greedy does not sample"),
    (["--demo", "--model_path", "x"], "--demo loads its own toy model"),
    (["--top_p", "1.5"], "--top_p"),
    (["--memory_limit", "-1"], "--memory_limit"),
])
def test_conflicting_flags(argv, needle, capsys):
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and needle in err


def test_error_model_not_found_offline(tmp_path, capsys, monkeypatch):
    # the seed's default run, on a machine that cannot reach the Hub
    proc = run_script(["inference.py"])
    line = assert_clean_error(proc, config.BASE_MODEL, "--demo")
    assert "cannot be reached" in line
    # a Hub that does not answer (closed port): the probe fails fast instead of retrying for ~25 s
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    assert_clean_error(Result(*run_main(capsys, "--model_path", "someone/no-such-model")),
                       "someone/no-such-model", "cannot be reached", "--demo")
    assert time.perf_counter() - start < 30
    assert_clean_error(Result(*run_main(capsys, "--model_path", str(tmp_path / "missing"))),
                       "no such directory", "--demo")


def test_error_quantization_without_bitsandbytes(model_dir, tmp_path, capsys, monkeypatch):
    # a fresh interpreter where `import bitsandbytes` fails
    shim = tmp_path / "shim" / "bitsandbytes"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('bitsandbytes is not installed (test shim)')\n")
    proc = run_script(["inference.py", "--model_path", model_dir, "--quant", "int8"],
                      env={"PYTHONPATH": str(tmp_path / "shim")})
    assert_clean_error(proc, "--quant int8", "bitsandbytes", "pip install bitsandbytes")
    monkeypatch.setattr(model_loader, "bitsandbytes_available", lambda: False)
    assert_clean_error(Result(*run_main(capsys, "--model_path", model_dir, "--quant", "nf4")),
                       "--quant nf4", "pip install bitsandbytes")


def test_int8_loads_through_bitsandbytes(model_dir):
    """int8 as the seed ran it (bitsandbytes works on a CPU too, slowly)."""
    model, tokenizer = model_loader.load_model_and_tokenizer(model_dir, quant="int8", device="cpu",
                                                             notice=lambda message: None)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    result = chat.Chat(model, tokenizer, greedy(max_new_tokens=12)).ask(config.CANNED_QUERIES[0])
    assert result.new_tokens > 0 and result.response


# --------------------------------------------------------------------------------------------------
# LoRA adapters: today's format, an old peft's format, a mismatching base
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(model_dir, demo_data, tmp_path_factory):
    """A LoRA adapter trained by finetune.py (a few steps) on top of the demo model."""
    work = tmp_path_factory.mktemp("lora")
    run_script(["code/convert_data.py", "--tokenizer", model_dir, "--max_length", "256", "--out_data_path",
                str(work / "ids") + os.sep, "--data_file", str(demo_data), "--template", "zh",
                "--max_dialogues_per_sample", "1"], check=True)
    run_script(["code/finetune.py", "--use_lora", "--model_path", model_dir, "--dataset_type", "DatasetIds",
                "--data_path", str(work / "ids" / "llama_ift_data_ids.pkl"), "--max_length", "256",
                "--max_epoches", "1", "--max_steps", "3", "--lr", "1e-2", "--warmup_steps", "1",
                "--micro_batch_size", "1", "--grad_accum", "1", "--save_dir", str(work / "ckp"),
                "--save_name", "lora", "--no_progress"], check=True)
    adapter = work / "ckp" / "lora" / "lora_epoch0"
    assert (adapter / "adapter_config.json").is_file()
    return adapter


def _logits(model, tokenizer):
    ids = torch.tensor([chat.encode_prompt(tokenizer, [], config.CANNED_QUERIES[0])])
    with torch.no_grad():
        return model(input_ids=ids).logits


def make_old_peft_adapter(adapter, out):
    """Rewrite a saved adapter the way peft 0.2/0.3 stored it (as the published CuteGPT LoRA is):
    adapter_model.bin (a torch pickle) and an adapter_config.json with keys peft has since dropped."""
    from safetensors.torch import load_file

    out.mkdir()
    new = json.loads((adapter / "adapter_config.json").read_text())
    old = {"base_model_name_or_path": new["base_model_name_or_path"], "bias": "none", "enable_lora": None,
           "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": new["lora_alpha"],
           "lora_dropout": new["lora_dropout"], "merge_weights": False, "modules_to_save": None,
           "peft_type": "LORA", "r": new["r"], "target_modules": sorted(new["target_modules"]),
           "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(old, indent=2))
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), out / "adapter_model.bin")
    for name in os.listdir(adapter):   # the tokenizer files travel with the adapter, as in the seed
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(adapter / name, out / name)


@pytest.mark.slow
def test_lora_adapter_loads_in_both_formats(model_dir, lora_dir, tmp_path, loaded, capsys):
    base_model, tokenizer = loaded
    model, tok = model_loader.load_model_and_tokenizer(model_dir, lora_path=str(lora_dir), quant="fp32",
                                                       device="cpu", notice=lambda message: None)
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    new_logits = _logits(model, tok)
    assert not torch.allclose(new_logits, _logits(base_model, tokenizer))   # the adapter changes the model

    old_dir = tmp_path / "old_adapter"
    make_old_peft_adapter(lora_dir, old_dir)
    assert not (old_dir / "adapter_model.safetensors").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old, old_tok = model_loader.load_model_and_tokenizer(model_dir, lora_path=str(old_dir), quant="fp32",
                                                             device="cpu", notice=lambda message: None)
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]   # old keys pass quietly
    assert torch.allclose(_logits(old, old_tok), new_logits)
    result = chat.Chat(old, old_tok, greedy(max_new_tokens=10)).ask(config.CANNED_QUERIES[0])
    assert result.new_tokens > 0

    # the command line takes it too
    code, out, err = run_main(capsys, "--model_path", model_dir, "--lora_path", str(old_dir), "--greedy",
                              "--max_new_tokens", "8", "--queries", "你好")
    assert code == 0 and "问：你好\n答：" in out and "Unexpected keyword" not in err


@pytest.mark.slow
def test_lora_on_a_mismatching_base_is_refused(lora_dir, model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    other = tmp_path / "other_base"
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(model_loader.LoaderError, match="another base model") as info:
        model_loader.load_model_and_tokenizer(str(other), lora_path=str(lora_dir), quant="fp32", device="cpu",
                                              notice=lambda message: None)
    assert "--lora_path" in str(info.value) and "--model_path" in str(info.value)
    proc = run_script(["inference.py", "--model_path", str(other), "--lora_path", str(lora_dir)])
    assert_clean_error(proc, "another base model")   # once end to end: one line, no traceback

    # a base whose vocabulary is smaller than the adapter's tokenizer (LLaMA's 32,000 vs CuteGPT's)
    small = tmp_path / "small_vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(small)
    assert_clean_error(Result(*run_main(capsys, "--model_path", str(small), "--lora_path", str(lora_dir))),
                       "tokens", "300 embeddings")
    # an adapter given as the model, a model given as the adapter
    assert_clean_error(Result(*run_main(capsys, "--model_path", str(lora_dir))), "is a LoRA adapter")
    assert_clean_error(Result(*run_main(capsys, "--model_path", model_dir, "--lora_path", model_dir)),
                       "not a LoRA adapter", "--lora_path none")


# --------------------------------------------------------------------------------------------------
# interactive mode in a pseudo-terminal
# --------------------------------------------------------------------------------------------------
SLOW_CHAT = """
import sys, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, {code!r})
import chat
_on_tokens = chat.Reply._on_tokens
def slow(self, ids):            # a slow model: {delay}s per token, so streaming shows
    time.sleep({delay})
    _on_tokens(self, ids)
chat.Reply._on_tokens = slow
import inference
inference.main({argv!r})
"""


class Terminal:
    """A child process on a pseudo-terminal; read() collects output with arrival times."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.chdir(REPO)
            os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
            os.execv(sys.executable, [sys.executable] + argv)
        self.text, self.times = "", []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # characters split across reads

    def read_until(self, needle, timeout=120, start=0):
        deadline = time.time() + timeout
        while needle not in self.text[start:]:
            remaining = deadline - time.time()
            assert remaining > 0, f"timed out waiting for {needle!r}; got:\n{self.text[-3000:]}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b""
                assert data, f"terminal closed waiting for {needle!r}; got:\n{self.text[-3000:]}"
                self.times.append((time.time(), len(self.text)))
                self.text += self.decoder.decode(data)
        return self.text.index(needle, start)

    def arrival(self, position):
        """When the character at ``position`` arrived."""
        return next(t for t, offset in reversed(self.times) if offset <= position)

    def send(self, data):
        os.write(self.fd, data.encode("utf-8"))

    def close(self):
        """Kill the child if it still runs (a failed test leaves nothing behind)."""
        try:
            if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.fd)

    def wait(self, timeout=60):
        """The exit code, reading what is left meanwhile; kills the child after ``timeout``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.text += self.decoder.decode(os.read(self.fd, 4096))
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the interactive session did not end; got:\n{self.text[-3000:]}")


@pytest.mark.slow
def test_interactive_streams_and_survives_ctrl_c(model_dir, tmp_path):
    out = tmp_path / "session.jsonl"
    script = SLOW_CHAT.format(repo=REPO, code=os.path.join(REPO, "code"), delay=0.08, argv=[
        "--model_path", model_dir, "--interactive", "--greedy", "--repetition_penalty", "1.0",
        "--output_file", str(out)])
    term = Terminal(["-c", script])
    try:
        term.read_until("/clear")                 # the commands are said at the start
        term.read_until("问：")
        start = len(term.text)

        # 1. an answer streams: its first characters arrive well before its end
        term.send(config.CANNED_QUERIES[0] + "\n")
        first = term.read_until(CANNED_ANSWERS[0][:3], start=start)
        end = term.read_until("问：", start=first)
        assert CANNED_ANSWERS[0].replace("\n", "\r\n") in term.text[start:end]
        assert term.arrival(end) - term.arrival(first) > 1.0

        # 2. Ctrl-C during the answer stops the answer, not the session
        start = len(term.text)
        term.send(config.CANNED_QUERIES[1] + "\n")
        term.read_until(CANNED_ANSWERS[1][:3], start=start)
        term.send("\x03")
        stopped = term.read_until("[stopped]", start=start)
        term.read_until("问：", start=stopped)
        assert CANNED_ANSWERS[1].replace("\n", "\r\n") not in term.text[start:]

        # 3. /clear forgets the history; the next answer sees none
        term.send("/clear\n")
        term.read_until("(history cleared)", start=stopped)
        mark = len(term.text)
        term.send(config.CANNED_QUERIES[0] + "\n")
        term.read_until("问：", start=term.read_until(CANNED_ANSWERS[0][-3:], start=mark))

        # 4. Ctrl-C at the empty prompt quits cleanly.  (A user's key press, so a moment after the
        # prompt: a SIGINT that lands in the few instructions between readline printing the prompt and
        # waiting for input is only seen at the next key -- CPython's readline loop works that way.)
        time.sleep(0.5)
        term.send("\x03")
        assert term.wait() == 0
        assert "Traceback" not in term.text
    finally:
        term.close()
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["history_used"] for r in records] == [0, 1, 0]
    assert records[1]["finish_reason"] == "cancelled"
    assert records[0]["response"] == records[2]["response"] == CANNED_ANSWERS[0]


@pytest.mark.parametrize("ending", ["/quit", "EOF"])
def test_interactive_commands(model_dir, capsys, monkeypatch, ending):
    lines = iter(["/help", "", config.CANNED_QUERIES[0], "/clear", config.CANNED_QUERIES[1]]
                 + (["/quit", "never read"] if ending == "/quit" else []))

    def fake_input(prompt_text=""):
        print(prompt_text, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, _ = run_main(capsys, "--model_path", model_dir, "--interactive", "--greedy",
                            "--repetition_penalty", "1.0", "--max_new_tokens", "60")
    assert code == 0
    assert out.count("/clear") >= 2                        # said at the start and for /help
    assert f"答：{CANNED_ANSWERS[0]}\n" in out and "(history cleared)" in out
    assert out.rstrip().endswith("bye")
