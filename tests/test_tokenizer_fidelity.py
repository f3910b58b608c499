"""SentencePiece's ids on every path, on LLaMA's real 32,000-piece vocabulary and on an extension of it.

The loader (model_loader.load_tokenizer -> sp_convert) must give exactly SentencePiece's ids and decode back
to the text for a directory with or without tokenizer.json, after extend_vocab.py, after full fine-tuning
added '<end>'; convert_data.py, chat and the API server must build the same ids; text is text ('<s>',
'</s>', '<end>' written by a user are characters); the data's fingerprint changes with the encoding.
"""
import json
import os
import shutil

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from conftest import COMPAT_PKL, SAMPLE, SAMPLE_PKL, run_script

import chat
import config
import convert_data
import data_io
import dataset
import extend_vocab
import model_loader
import prompt
import sp_convert


def dialogue_lines(dialogues):
    return [turn[key] for d in dialogues for turn in d for key in ("instruction", "input", "output") if turn.get(key)]


COMPAT = data_io.load_dialogues(COMPAT_PKL) if os.path.exists(COMPAT_PKL) else []
LINES = dialogue_lines(SAMPLE) + dialogue_lines(COMPAT)
# lines of several kinds the issue names, with spaces around them (probe_texts adds leading spaces to all)
EDGE = ["a  b   c    d", "x\t\ty", "tab\tthen\nnewline\r\nCRLF", "3.14 0.5 100% 1e-5 ２０２３", "🦙🦙 😀😀",
        "\u3000\u3000全角\u3000", "end ", "end  ", " <s>", "</s> ", "<end><end>", "答：<end>\n问：", "\u200b零宽"]


def sp_of(directory):
    return spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))


def texts_for(directory):
    with open(os.path.join(directory, "vocab_tests.json"), encoding="utf-8") as f:
        reference = [t["text"] for t in json.load(f)]
    return sp_convert.probe_texts(LINES + EDGE + reference)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(dialogue_lines(SAMPLE)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def variants(llama_tokenizer_dir, corpus_file, tmp_path_factory):
    """name -> LLaMA-style tokenizer directory."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("variants")
    found = {"llama": llama_tokenizer_dir}
    # transformers' own conversion written as tokenizer.json beside tokenizer.model
    with_json = str(root / "llama_with_json")
    shutil.copytree(llama_tokenizer_dir, with_json)
    AutoTokenizer.from_pretrained(with_json).save_pretrained(with_json)
    found["llama+tokenizer.json"] = with_json
    extended = str(root / "extended")
    extend_vocab.main(["--base_tokenizer", llama_tokenizer_dir, "--corpus", corpus_file, "--vocab_size", "3000",
                       "--out", extended, "--num_threads", "1"])
    shutil.copy(os.path.join(llama_tokenizer_dir, "vocab_tests.json"), extended)
    found["extended"] = extended
    # full fine-tuning: '<end>' added as one special token, the checkpoint saved with tokenizer.model
    with_end = str(root / "extended_end")
    tokenizer = model_loader.load_tokenizer(extended)
    tokenizer.add_special_tokens({"additional_special_tokens": [config.END_MARKER]})
    tokenizer.save_pretrained(with_end)
    for name in ("tokenizer.model", "vocab_tests.json"):
        shutil.copy(os.path.join(extended, name), with_end)
    found["extended+<end>"] = with_end
    return found


def test_reference_vectors(llama_tokenizer_dir):
    """llama.cpp's reference ids, through SentencePiece and through the project's loader."""
    with open(os.path.join(llama_tokenizer_dir, "vocab_tests.json"), encoding="utf-8") as f:
        tests = json.load(f)
    assert len(tests) >= 40
    sp, tokenizer = sp_of(llama_tokenizer_dir), model_loader.load_tokenizer(llama_tokenizer_dir)
    assert len(tokenizer) == sp.get_piece_size() == 32000
    for test in tests:
        assert sp.encode(test["text"]) == test["ids"], test["text"]
        ids = tokenizer(test["text"], add_special_tokens=False)["input_ids"]
        assert ids == test["ids"], test["text"]
        assert tokenizer.decode(ids) == test["text"]


@pytest.mark.parametrize("name", ["llama", "llama+tokenizer.json", "extended", "extended+<end>"])
def test_loader_gives_sentencepiece_ids_and_decodes_back(variants, name):
    directory = variants[name]
    sp, tokenizer = sp_of(directory), model_loader.load_tokenizer(directory)
    texts = texts_for(directory)
    assert len(texts) > 2000 and sum(t.startswith(" ") for t in texts) > 1000
    wrong = sp_convert.disagreements(lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"],
                                     tokenizer.decode, sp, texts)
    assert not wrong, sp_convert.describe(wrong, len(texts))
    # the project's batched encoder agrees too, and with '<end>' added the marker from the template is one id
    assert prompt.tokenize_segment_texts(tokenizer, texts) == sp.encode(texts)
    if name == "extended+<end>":
        end = tokenizer.convert_tokens_to_ids(config.END_MARKER)
        assert end == sp.get_piece_size()
        assert prompt.tokenize_segment_texts(tokenizer, [prompt.answer_text("好")]) == [sp.encode("好") + [end]]


def test_a_directory_that_cannot_agree_is_refused(variants, tmp_path, capsys):
    colliding = tmp_path / "colliding"
    shutil.copytree(variants["llama"], colliding)
    settings = json.loads((colliding / "tokenizer_config.json").read_text())
    settings["added_tokens_decoder"] = {"5": {"content": config.END_MARKER, "special": True}}
    (colliding / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(model_loader.LoaderError, match=r"--tokenizer .*colliding.*added token '<end>' has id 5"):
        model_loader.load_tokenizer(str(colliding))
    unigram = tmp_path / "unigram"
    unigram.mkdir()
    proto = sp_convert.read_proto(os.path.join(variants["llama"], "tokenizer.model"))
    proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM
    (unigram / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(model_loader.LoaderError, match="not BPE"):
        model_loader.load_tokenizer(str(unigram))
    with pytest.raises(SystemExit) as stop:   # convert_data.py's own exit: one message, no traceback
        convert_data.main(["--tokenizer", str(colliding), "--out_data_path", str(tmp_path), "--data_file", SAMPLE_PKL])
    err = capsys.readouterr().err
    assert stop.value.code != 0 and "--tokenizer" in err and "added token" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "llama_ift_data_ids.pkl").exists()


def test_extend_vocab_on_the_real_vocabulary(variants, llama_tokenizer_dir):
    """Exact, strictly decreasing float32 scores below LLaMA's lowest ordinary piece ('▁▁' at -1e9), and a
    tokenizer.json that agrees with tokenizer.model, as the report states."""
    from transformers import PreTrainedTokenizerFast

    directory = variants["extended"]
    with open(os.path.join(directory, "extend_vocab_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    base = sp_convert.read_proto(os.path.join(llama_tokenizer_dir, "tokenizer.model"))
    merged = sp_convert.read_proto(os.path.join(directory, "tokenizer.model"))
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    lowest = min(p.score for p in base.pieces if p.type == normal)
    assert lowest == -1e9 and report["new_piece_scores"]["lowest_base_score"] == lowest
    assert [(p.piece, p.score) for p in merged.pieces[:32000]] == [(p.piece, p.score) for p in base.pieces]
    new = [p.score for p in merged.pieces[32000:]]
    assert len(new) == report["added_pieces"] > 1000
    assert new[0] < lowest and all(a > b for a, b in zip(new, new[1:])) and len(set(new)) == len(new)
    assert report["new_piece_scores"]["last_new_score"] == new[-1]
    for name in ("loader", "auto_tokenizer"):
        agreement = report["agreement_with_tokenizer_model"][name]
        assert agreement["agreeing"] == agreement["probe_texts"] > 100 and agreement["first_difference"] is None
    # what other programs read: tokenizer.json alone
    plain = PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"), split_special_tokens=True)
    sp, texts = sp_of(directory), texts_for(directory)
    assert plain(texts, add_special_tokens=False)["input_ids"] == sp.encode(texts)
    assert report["tokens_per_char_after"] < report["tokens_per_char_before"]


def sp_sample_ids(sp, dialogue, end_id):
    """The ids SentencePiece gives a dialogue's segments one by one (the seed's method), eos at the end."""
    ids = []
    for text, learned in prompt.conversation_segments(dialogue, template=config.INFERENCE_TEMPLATE):
        if learned and end_id is not None:
            ids += sp.encode(text[:-len(config.END_MARKER)]) + [end_id]
        else:
            ids += sp.encode(text)
    return ids + [sp.eos_id()]


def converted_samples(directory, tmp_path, dialogues, special_end_token):
    data_file = tmp_path / "dialogues.json"
    data_file.write_text(json.dumps(dialogues, ensure_ascii=False), encoding="utf-8")
    argv = ["--tokenizer", directory, "--data_file", str(data_file), "--out_data_path", str(tmp_path),
            "--max_length", "16384", "--template", config.INFERENCE_TEMPLATE, "--max_dialogues_per_sample", "1"]
    result = convert_data.convert(convert_data.parse_args(argv + (["--special_end_token"] if special_end_token else [])),
                                  show_progress=False)
    samples = []
    for row, mask, starts in zip(result["input_ids"], result["attention_mask"], result["sample_starts"]):
        bounds = starts + [mask.count(1)]
        samples += [tuple(row[a:b]) for a, b in zip(bounds, bounds[1:])]
    return samples


@pytest.mark.parametrize("name", ["llama", "extended", "extended+<end>"])
def test_same_ids_on_every_path(variants, name, tmp_path):
    """convert_data.py, chat (inference.py, the web demo) and the API server's chat messages give the ids
    SentencePiece gives each segment, for every sample dialogue without an input field."""
    directory = variants[name]
    special = name.endswith("<end>")
    tokenizer = model_loader.load_tokenizer(directory)
    if special:   # what finetune.py does for full fine-tuning (the saved directory has it already)
        assert tokenizer.convert_tokens_to_ids(config.END_MARKER) == len(tokenizer) - 1
    dialogues = [d for d in SAMPLE + COMPAT if not any(t.get("input") for t in d)]
    sp = sp_of(directory)
    end_id = tokenizer.convert_tokens_to_ids(config.END_MARKER) if special else None
    expected = [tuple(sp_sample_ids(sp, d, end_id)) for d in dialogues]
    assert sorted(converted_samples(directory, tmp_path, dialogues, special)) == sorted(expected)
    for dialogue, ids in zip(dialogues, expected):
        history = [(t["instruction"], t["output"]) for t in dialogue[:-1]]
        query = dialogue[-1]["instruction"]
        prefix = list(chat.encode_prompt(tokenizer, history, query))
        assert list(ids[:len(prefix)]) == prefix
        messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        meta_prompt, api_history, api_query = prompt.split_messages(messages + [{"role": "user", "content": query}])
        built = chat.build_prompt(tokenizer, api_history, api_query, None, 100000, 16, meta_prompt=meta_prompt)
        assert built.input_ids == prefix and built.history_used == len(history)


def test_control_tokens_only_from_the_template(variants):
    """'<s>', '</s>', '<end>' typed by a user are characters in training and inference alike; only the end
    marker that closes an answer (the template's) is the '<end>' id."""
    directory = variants["extended+<end>"]
    tokenizer, sp = model_loader.load_tokenizer(directory), sp_of(directory)
    end = tokenizer.convert_tokens_to_ids(config.END_MARKER)
    user = " <s> 和 </s> 字面 <end> 结束"
    turns = [{"instruction": user, "input": "", "output": "回答 <end> 与 </s>"}, {"instruction": user, "input": ""}]
    turns[1]["output"] = None
    ids, labels = prompt.encode_segments(tokenizer, prompt.conversation_segments(turns))
    assert ids.count(end) == 1 and {1, 2}.isdisjoint(ids)
    assert labels[ids.index(end)] == end
    history = [(user, "回答 <end> 与 </s>")]
    assert chat.encode_prompt(tokenizer, history, user) == ids
    assert tokenizer(user, add_special_tokens=False)["input_ids"] == sp.encode(user)   # the tokenizer's own call
    assert prompt.tokenize_segment_texts(tokenizer, [user]) == [sp.encode(user)]       # /v1/completions' prompt
    assert prompt.tokenize_segment_texts(tokenizer, [user + config.END_MARKER]) == [sp.encode(user + config.END_MARKER)]


def test_fingerprint_changes_with_the_encoding(variants, tmp_path):
    """Same encoding, same fingerprint (with or without tokenizer.json); one score changed (same vocabulary
    size, other ids for some texts): another fingerprint, and the ids file is refused."""
    llama = model_loader.load_tokenizer(variants["llama"])
    same = model_loader.load_tokenizer(variants["llama+tokenizer.json"])
    assert dataset.tokenizer_fingerprint(llama) == dataset.tokenizer_fingerprint(same)
    changed_dir = tmp_path / "changed"
    shutil.copytree(variants["llama"], changed_dir)
    proto = sp_convert.read_proto(str(changed_dir / "tokenizer.model"))
    piece = next(p for p in proto.pieces if p.piece == "\u2581the")
    piece.score = -1e9 + 64   # '▁the' now merges after almost everything
    (changed_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    changed = model_loader.load_tokenizer(str(changed_dir))
    assert len(changed) == len(llama)
    mine, theirs = dataset.tokenizer_fingerprint(llama), dataset.tokenizer_fingerprint(changed)
    assert mine["vocab_size"] == theirs["vocab_size"] and mine["encoding_sha256"] != theirs["encoding_sha256"]
    datas = {"format": dataset.IDS_FORMAT, "input_ids": [], "labels": [], "attention_mask": [], "sample_starts": [],
             "meta": {"max_length": 64, "tokenizer": dict(name="changed", **theirs)}}
    with pytest.raises(data_io.DataError, match="encodes differently .*convert_data.py"):
        dataset.check_ids_file(datas, llama, 64, "data.pkl")
    datas["meta"]["tokenizer"] = dict(name="llama", **dataset.tokenizer_fingerprint(same))
    dataset.check_ids_file(datas, llama, 64, "data.pkl")


@pytest.mark.slow
def test_finetune_refuses_data_of_a_tokenizer_that_encodes_differently(tiny_model_dir, tmp_path):
    """Same vocabulary size, one piece's score changed: the ids file converted with it is refused by
    finetune.py with one message, before any training."""
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_model_dir, name), other)
    proto = sp_convert.read_proto(str(other / "tokenizer.model"))
    normal = [p for p in proto.pieces if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL]
    normal[0].score, normal[-1].score = normal[-1].score, normal[0].score   # the first merge now comes last
    (other / "tokenizer.model").write_bytes(proto.SerializeToString())
    run_script(["code/convert_data.py", "--tokenizer", str(other), "--data_file", SAMPLE_PKL, "--max_length", "256",
                "--out_data_path", str(tmp_path), "--template", "zh"], check=True)
    proc = run_script(["code/finetune.py", "--use_lora", "--model_path", tiny_model_dir, "--data_path",
                       str(tmp_path / "llama_ift_data_ids.pkl"), "--max_length", "256", "--save_dir", str(tmp_path / "ckp")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "encodes differently" in proc.stderr and "convert_data.py" in proc.stderr
    assert not (tmp_path / "ckp").exists() or not any((tmp_path / "ckp").rglob("*.safetensors"))


def test_the_rebuilt_file_is_checked(llama_tokenizer_dir):
    """The builder accepts only Meta's bytes, and only if SentencePiece reproduces llama.cpp's vectors."""
    import hashlib

    import build_llama_tokenizer

    data = open(os.path.join(llama_tokenizer_dir, "tokenizer.model"), "rb").read()
    assert hashlib.md5(data).hexdigest() == config.LLAMA_TOKENIZER["md5"]
    with open(os.path.join(llama_tokenizer_dir, "vocab_tests.json"), encoding="utf-8") as f:
        tests = json.load(f)
    build_llama_tokenizer.check_model(data, tests)
    with pytest.raises(data_io.DataError, match="md5"):
        build_llama_tokenizer.check_model(data[:100] + bytes([data[100] ^ 1]) + data[101:], tests)
    wrong = [dict(tests[0], ids=tests[0]["ids"][::-1] + [5])] + tests[1:]
    with pytest.raises(data_io.DataError, match="1 of 46"):
        build_llama_tokenizer.check_model(data, wrong)
