"""code/build_tiny_model.py: the SentencePiece tokenizer, the Hugging Face files and the random model."""
import json
import os

import pytest

from conftest import SAMPLE_PKL, run_script

import build_tiny_model
import config

# mixed text: Chinese, English, digits, emoji, spaces, tabs, newlines, the end marker written out
SMALL_DIALOGUES = [
    [{"instruction": "你好，请介绍一下你自己。", "input": "",
      "output": "你好！我是 CuteGPT, a language model. 我可以回答问题 123 😀"}],
    [{"instruction": "Translate to English", "input": "今天天气很好。\n我们去公园吧。",
      "output": "The weather is nice today.\nLet's go to the park."},
     {"instruction": "再来一句", "input": "", "output": "Numbers: 3.14159, 2024年5月1日\ttab\t and  two  spaces."}],
    [{"instruction": "Write <end> literally", "input": "x<end>y", "output": "Here: <end> and <end2> done."}],
    [{"instruction": "列出三种水果", "input": "", "output": "1. 苹果 🍎\n2. 香蕉 🍌\n3. 橙子 🍊"}],
]
MIXED = ["你好, World 123 😀", "第一行\n第二行\n\n  indented\tand tab", "emoji only 😀🎉👍🏽", "x<end>",
         "Numbers 1234567890 and 3.14", "Ünïcödé ÀÉÎ ß", "a\nb"]


def data_texts(dialogues):
    return [turn[k] for dialogue in dialogues for turn in dialogue for k in ("instruction", "input", "output") if turn[k]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model dir, data texts): built from data/test/ift_data.pkl when present, else a small .json."""
    base = tmp_path_factory.mktemp("build_tiny")
    if os.path.isfile(SAMPLE_PKL):
        data = SAMPLE_PKL
    else:
        data = str(base / "dialogues.json")
        with open(data, "w", encoding="utf-8") as f:
            json.dump(SMALL_DIALOGUES, f, ensure_ascii=False)
    out = base / "model"
    proc = run_script(["code/build_tiny_model.py", "--data", data, "--out", str(out)], check=True, timeout=120)
    assert "wrote" in proc.stdout
    import data_io

    return str(out), data_texts(data_io.load_dialogues(data))


@pytest.fixture(scope="module")
def sp(built):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(built[0], "tokenizer.model"))


def tokenizer_classes():
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

    return [AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast]


def test_files(built):
    names = set(os.listdir(built[0]))
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "config.json",
            "model.safetensors", "chat_template.jinja", "generation_config.json"} <= names
    assert not any(name.startswith(".tmp") for name in os.listdir(os.path.dirname(built[0])))
    with open(os.path.join(built[0], "tokenizer_config.json"), encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    # the plain fast class built from tokenizer.model (sp_convert): a LlamaTokenizer entry would make
    # AutoTokenizer rebuild transformers' own pipeline, whose ids differ from SentencePiece's
    assert tokenizer_config["tokenizer_class"] in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert tokenizer_config["split_special_tokens"] is False   # engines parse the chat template's control tokens


@pytest.mark.parametrize("index", range(4))
def test_tokenizer_classes_load_with_llama_special_ids(built, sp, index):
    cls = tokenizer_classes()[index]
    tokenizer = cls.from_pretrained(built[0])
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None  # LLaMA has no pad token
    assert len(tokenizer) == sp.get_piece_size()
    ids = tokenizer("hello")["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2  # bos added, eos not (as LLaMA)
    assert sp.id_to_piece(13) == "<0x0A>"  # byte pieces at LLaMA's ids: "\n" is 13


def test_end_marker_is_not_one_token(built, sp):
    assert sp.piece_to_id(config.END_MARKER) == sp.unk_id()  # not a piece
    for cls in tokenizer_classes():
        tokenizer = cls.from_pretrained(built[0])
        assert len(tokenizer(config.END_MARKER, add_special_tokens=False)["input_ids"]) > 1
        # the full fine-tuning adds it as one special token
        tokenizer.add_special_tokens({"additional_special_tokens": [config.END_MARKER]})
        assert len(tokenizer(config.END_MARKER, add_special_tokens=False)["input_ids"]) == 1


def test_round_trip_mixed_text(built, sp):
    for cls in tokenizer_classes():
        tokenizer = cls.from_pretrained(built[0])
        for text in MIXED:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text, (cls.__name__, text)
            assert 0 not in ids  # byte fallback: never <unk>
    for text in MIXED:
        assert sp.decode(sp.encode(text)) == text


def test_fast_ids_equal_sentencepiece_ids(built, sp):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = built[1] + MIXED + [config.META_PROMPT] + build_tiny_model.template_fragments()
    expected = [sp.encode(text) for text in texts]
    # the project's path: AutoTokenizer, batched.  transformers 5 rebuilds LlamaTokenizer with a Metaspace
    # pre-tokenizer that adds no dummy '▁' before a leading space: such texts are the one known difference.
    auto = AutoTokenizer.from_pretrained(built[0])
    batched = auto(texts, add_special_tokens=False)["input_ids"]
    differing = [t for t, a, b in zip(texts, batched, expected) if a != b and not t.startswith(" ")]
    assert differing == []
    # tokenizer.json holds SentencePiece's exact pipeline: equal on every text, leading spaces included
    fast = PreTrainedTokenizerFast.from_pretrained(built[0])
    texts += [" leading space", "  two", " ", " 你好"]
    batched = fast(texts, add_special_tokens=False)["input_ids"]
    assert batched == [sp.encode(text) for text in texts]


def test_no_dummy_prefix_agrees_everywhere(tmp_path, built):
    """--no_dummy_prefix: every class agrees with SentencePiece, leading spaces included."""
    import sentencepiece

    lines, _, _, _ = build_tiny_model.training_lines(SMALL_DIALOGUES, 400)
    build_tiny_model.train_sentencepiece(lines, str(tmp_path / "tokenizer.model"), 400, False, "test")
    build_tiny_model.save_tokenizer(str(tmp_path), False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    texts = data_texts(SMALL_DIALOGUES) + MIXED + [" leading space", "  two", " 你好"]
    for cls in tokenizer_classes():
        tokenizer = cls.from_pretrained(str(tmp_path))
        assert tokenizer(texts, add_special_tokens=False)["input_ids"] == [sp.encode(t) for t in texts], cls
        assert [tokenizer.decode(sp.encode(t)) for t in texts] == texts


def test_model_loads_and_matches_vocab(built):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(built[0])
    model = LlamaForCausalLM.from_pretrained(built[0])
    t = config.TINY_MODEL
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), t["hidden_size"])
    assert model.config.num_hidden_layers == t["num_layers"]
    assert model.config.num_attention_heads == t["num_heads"]
    assert model.config.intermediate_size == t["intermediate_size"]
    assert model.config.max_position_embeddings == t["max_position_embeddings"]
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tokenizer("你好, World 123 😀", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights(built, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(built[0]))
    t = config.TINY_MODEL
    built_weights = load_file(os.path.join(built[0], "model.safetensors"))
    for seed, same in ((t["seed"], True), (t["seed"] + 1, False)):
        directory = tmp_path / f"seed{seed}"
        directory.mkdir()
        build_tiny_model.save_model(str(directory), vocab, t["hidden_size"], t["num_layers"], seed)
        weights = load_file(str(directory / "model.safetensors"))
        assert weights.keys() == built_weights.keys()
        equal = all(weights[k].equal(built_weights[k]) for k in weights)
        assert equal == same, seed


@pytest.mark.slow
def test_missing_data_file_fails_cleanly(tmp_path):
    out = tmp_path / "model"
    missing = tmp_path / "no_such_dialogues.pkl"
    proc = run_script(["code/build_tiny_model.py", "--data", str(missing), "--out", str(out)], timeout=60)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_invalid_dialogues_fail_cleanly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[{"instruction": "q", "input": ""}]]), encoding="utf-8")
    out = tmp_path / "model"
    proc = run_script(["code/build_tiny_model.py", "--data", str(bad), "--out", str(out)], timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and "bad.json" in proc.stderr and "output" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
