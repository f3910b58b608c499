"""extend_vocab.py on the tiny model: old ids kept, Chinese text shorter, exact round trips, the project's
segment encoder still applies, embeddings resized with mean-initialised rows, bad input refused."""
import json
import os
import shutil

import pytest
import torch

from conftest import REPO, run_script

import prompt

MIXED = ["今天天气很好，我们去复旦大学散步吧。", "Hello, 世界! 123 + 4.56 = 127.56", "表情😀🎉不在词表里也行✨",
         "CuteGPT是一个中英双语模型，第2版在2023年发布。", "tab\tand\nnewline 混合 text", "ÀÉÎ ß 中文 русский"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The sample dialogues' texts: half as .txt lines, half as .jsonl records (both formats read)."""
    with open(os.path.join(REPO, "data", "test", "ift_data.json"), encoding="utf-8") as f:
        dialogues = json.load(f)
    texts = [turn[key] for d in dialogues for turn in d for key in ("instruction", "input", "output") if turn[key]]
    out = tmp_path_factory.mktemp("corpus")
    half = len(texts) // 2
    (out / "a.txt").write_text("\n".join(texts[:half]) + "\n", encoding="utf-8")
    with open(out / "b.jsonl", "w", encoding="utf-8") as f:
        for text in texts[half:]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return [str(out / "a.txt"), str(out / "b.jsonl")]


@pytest.fixture(scope="module")
def extended(tiny_model_dir, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ext") / "model")
    proc = run_script(["code/extend_vocab.py", "--base_tokenizer", tiny_model_dir, "--corpus", *corpus,
                       "--vocab_size", "3000", "--model_path", tiny_model_dir, "--out", out, "--num_threads", "1"],
                      check=True)
    return out, proc.stdout


def sp_of(directory):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))


def test_old_ids_kept_and_pieces_appended(tiny_model_dir, extended):
    from transformers import AutoTokenizer

    old, new = sp_of(tiny_model_dir), sp_of(extended[0])
    assert new.get_piece_size() > old.get_piece_size() + 500
    assert [new.id_to_piece(i) for i in range(old.get_piece_size())] == \
           [old.id_to_piece(i) for i in range(old.get_piece_size())]
    old_vocab = AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    new_tok = AutoTokenizer.from_pretrained(extended[0])
    new_vocab = new_tok.get_vocab()
    assert all(new_vocab[piece] == i for piece, i in old_vocab.items())
    assert len(new_tok) == new.get_piece_size()
    assert (new_tok.unk_token_id, new_tok.bos_token_id, new_tok.eos_token_id) == (0, 1, 2)
    # the end marker never became one piece
    assert len(new_tok("<end>", add_special_tokens=False)["input_ids"]) > 1


def test_chinese_takes_fewer_tokens_and_the_ratio_is_reported(tiny_model_dir, extended):
    with open(os.path.join(extended[0], "extend_vocab_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["heldout_lines"] > 10 and report["model_resized"]
    before, after = report["tokens_per_char_before"], report["tokens_per_char_after"]
    assert after < 0.9 * before
    assert f"{before:.3f} before, {after:.3f} after" in extended[1]
    old, new = sp_of(tiny_model_dir), sp_of(extended[0])
    text = "".join(MIXED[:1] + MIXED[3:4])
    assert len(new.encode(text)) < len(old.encode(text))


def test_round_trip_with_every_tokenizer_class(extended):
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    sp = sp_of(extended[0])
    for text in MIXED:
        assert sp.decode(sp.encode(text)) == text
    for cls in (AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast):
        tokenizer = cls.from_pretrained(extended[0])
        for text in MIXED:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert 0 not in ids  # byte fallback, never <unk>
            assert tokenizer.decode(ids) == text, (cls.__name__, text)
            if cls is PreTrainedTokenizerFast:
                assert ids == sp.encode(text)


def test_project_segment_encoder_still_applies(extended):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(extended[0])
    assert prompt.segment_encoder(tokenizer) is not None  # tokenizer.model ids == the tokenizer's ids
    texts = MIXED + ["问：请推荐五本名著\n答：", "答案：A"]
    fast = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert prompt.tokenize_segment_texts(tokenizer, texts) == fast


def test_embeddings_resized_with_mean_rows(tiny_model_dir, extended):
    from transformers import AutoModelForCausalLM

    old_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    new_model = AutoModelForCausalLM.from_pretrained(extended[0])
    old_sp, new_sp = sp_of(tiny_model_dir), sp_of(extended[0])
    old_size, new_size = old_sp.get_piece_size(), new_sp.get_piece_size()
    assert new_model.config.vocab_size == new_size
    for get in ("get_input_embeddings", "get_output_embeddings"):
        old_w, new_w = getattr(old_model, get)().weight, getattr(new_model, get)().weight
        assert new_w.shape[0] == new_size
        assert torch.equal(new_w[:old_size], old_w)
        # a new single-character piece the old tokenizer wrote as its UTF-8 bytes (<0xNN> = id 3 + NN)
        checked = 0
        for i in range(old_size, new_size):
            piece = new_sp.id_to_piece(i)
            if len(piece) == 1 and old_sp.piece_to_id(piece) == 0:
                byte_ids = [3 + b for b in piece.encode("utf-8")]
                assert torch.allclose(new_w[i], old_w[byte_ids].mean(dim=0), atol=1e-6)
                checked += 1
        assert checked >= 10
    # old tokens keep their logits on old-token input
    ids = torch.tensor([old_sp.encode("Hello, 世界")])
    with torch.no_grad():
        a = old_model(ids).logits
        b = new_model(ids).logits[..., :old_size]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_refuses_existing_out_added_tokens_and_bad_corpus(tiny_model_dir, corpus, extended, tmp_path):
    from transformers import AutoTokenizer

    import extend_vocab
    from data_io import DataError

    proc = run_script(["code/extend_vocab.py", "--base_tokenizer", tiny_model_dir, "--corpus", corpus[0],
                       "--out", extended[0]])
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    with_end = tmp_path / "with_end"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end>"]})
    tokenizer.save_pretrained(with_end)
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.model"), with_end / "tokenizer.model")
    args = extend_vocab.parse_args(["--base_tokenizer", str(with_end), "--corpus", corpus[0],
                                    "--out", str(tmp_path / "out")])
    with pytest.raises(DataError, match="tokens were added"):
        extend_vocab.extend(args)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "你好"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="--text_field"):
        list(extend_vocab.read_lines(str(bad), "text"))
