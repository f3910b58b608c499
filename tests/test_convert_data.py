"""convert_data.py, prompt.py, dataset.py packing and data_io: round trip, masking, determinism,
template identity with inference, the unsafe pickle and each bad input."""
import collections
import json
import os
import pickle

import pytest

from conftest import COMPAT_PKL, SAMPLE_PKL, run_script

import config
import data_io
import dataset
import packing
import prompt


def convert(tiny_model_dir, out_dir, *extra, data_file=SAMPLE_PKL, max_length=512, check=True):
    return run_script(["code/convert_data.py", "--tokenizer", tiny_model_dir, "--max_length", str(max_length),
                       "--out_data_path", str(out_dir), "--data_file", str(data_file), *extra], check=check)


def load_ids(out_dir):
    return data_io.safe_load_pickle(os.path.join(out_dir, "llama_ift_data_ids.pkl"))


def samples_of(ids):
    """Split rows back into samples: (input_ids, labels) per recorded sample start."""
    out = []
    for row_ids, row_labels, row_mask, starts in zip(ids["input_ids"], ids["labels"], ids["attention_mask"],
                                                     ids["sample_starts"]):
        real = sum(row_mask)
        bounds = list(starts) + [real]
        for begin, end in zip(bounds[:-1], bounds[1:]):
            out.append((row_ids[begin:end], row_labels[begin:end]))
    return out


@pytest.fixture(scope="module")
def zh_single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zh_single")
    convert(tiny_model_dir, out, "--template", "zh", "--max_dialogues_per_sample", "1")
    return load_ids(out)


def test_round_trip_and_masking(zh_single, tiny_tokenizer):
    dialogues = data_io.load_dialogues(SAMPLE_PKL)
    got = samples_of(zh_single)
    assert len(got) == len(dialogues)
    expected = []
    for turns in dialogues:
        input_ids, labels = prompt.encode_segments(tiny_tokenizer, prompt.conversation_segments(turns, template="zh"))
        expected.append((input_ids + [tiny_tokenizer.eos_token_id], labels + [tiny_tokenizer.eos_token_id]))
    key = lambda pair: tuple(pair[0])  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    by_ids = {tuple(i): l for i, l in expected}
    for input_ids, labels in got:
        assert labels == by_ids[tuple(input_ids)]
    # learned tokens decode to exactly the answers + end markers (+ eos); nothing of the questions
    first = dialogues[0]
    ids0, labels0 = next((i, l) for i, l in got if tiny_tokenizer.decode(i).find(first[0]["instruction"]) >= 0)
    learned = [t for t, l in zip(ids0, labels0) if l != -100]
    text = tiny_tokenizer.decode(learned, skip_special_tokens=True)
    assert text.replace(" ", "") == "".join(t["output"] + config.END_MARKER for t in first).replace(" ", "")
    assert ids0[-1] == labels0[-1] == tiny_tokenizer.eos_token_id
    masked = tiny_tokenizer.decode([t for t, l in zip(ids0, labels0) if l == -100])
    assert first[0]["instruction"] in masked and first[1]["instruction"] in masked
    assert "问：" in masked and "答：" in masked and config.META_PROMPT.strip() in masked
    assert first[0]["output"][:5] not in masked


def test_packing_whole_samples_and_metadata(zh_single, tiny_tokenizer):
    meta = zh_single["meta"]
    counts = meta["counts"]
    assert meta["max_length"] == 512 and meta["template"] == "zh"
    assert meta["tokenizer"]["vocab_size"] == len(tiny_tokenizer)
    assert meta["tokenizer"]["probe_ids"] == dataset.tokenizer_fingerprint(tiny_tokenizer)["probe_ids"]
    assert meta["turn_templates"] == config.TURN_TEMPLATES and meta["end_marker"] == "<end>"
    rows = zh_single["input_ids"]
    assert counts["rows"] == len(rows) and all(len(r) == 512 for r in rows)
    real = sum(sum(m) for m in zh_single["attention_mask"])
    assert counts["real_tokens"] == real
    assert counts["pad_tokens"] == len(rows) * 512 - real
    for row, labels, mask, starts in zip(rows, zh_single["labels"], zh_single["attention_mask"], zh_single["sample_starts"]):
        assert starts[0] == 0 and starts == sorted(starts)
        n = sum(mask)
        assert mask == [1] * n + [0] * (512 - n)
        assert all(l == -100 for l in labels[n:])
        # every sample ends with eos right before the next start (or the padding)
        for end in starts[1:] + [n]:
            assert row[end - 1] == tiny_tokenizer.eos_token_id
    # position ids restart at every sample start and the block mask isolates samples
    item = dataset.DatasetIds(tiny_tokenizer, zh_single, 512)[0]
    for s in zh_single["sample_starts"][0]:
        assert item["position_ids"][s] == 0
    assert 0.5 < counts["real_token_share"] <= 1.0


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_differs(tiny_model_dir, tmp_path):
    for name in ("a", "b"):
        convert(tiny_model_dir, tmp_path / name, "--seed", "3")
    convert(tiny_model_dir, tmp_path / "c", "--seed", "4")
    read = lambda n: open(tmp_path / n / "llama_ift_data_ids.pkl", "rb").read()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")
    # the default joins several dialogues into multi-round samples with random templates
    ids = load_ids(tmp_path / "a")
    assert ids["meta"]["counts"]["samples"] < ids["meta"]["counts"]["dialogues"]
    assert ids["meta"]["template"] == "random"


def test_inference_prompt_equals_training_ids(zh_single, tiny_tokenizer):
    """The ids a chat feeds for (history, query) are the training ids up to the answer start."""
    import chat

    dialogue = next(d for d in data_io.load_dialogues(SAMPLE_PKL) if len(d) >= 3 and not any(t["input"] for t in d))
    train = next((i, l) for i, l in samples_of(zh_single)
                 if tiny_tokenizer.decode(i).find(dialogue[-1]["instruction"]) >= 0)
    for k in range(len(dialogue)):
        history = [(t["instruction"], t["output"]) for t in dialogue[:k]]
        ids = chat.encode_prompt(tiny_tokenizer, history, dialogue[k]["instruction"])
        # the answer of turn k starts right after these ids in the training sample
        assert train[0][:len(ids)] == ids
        assert train[1][len(ids) - 1] == -100 and train[1][len(ids)] != -100


def test_compat_original_pickle_is_accepted(tiny_model_dir, tmp_path):
    if not os.path.exists(COMPAT_PKL):
        pytest.skip("shared/compat is not beside this checkout")
    proc = convert(tiny_model_dir, tmp_path, data_file=COMPAT_PKL, max_length=256)
    ids = load_ids(tmp_path)
    counts = ids["meta"]["counts"]
    assert counts["dialogues"] == 40 and counts["turns"] == 147
    assert counts["truncated_samples"] > 0
    assert f"{counts['truncated_samples']} samples truncated" in proc.stdout


@pytest.mark.slow
def test_json_jsonl_and_alpaca_records(tiny_model_dir, tmp_path):
    dialogues = [[{"instruction": "1+1=?", "input": "", "output": "2"}],
                 [{"instruction": "翻译", "input": "你好", "output": "Hello"},
                  {"instruction": "再说一遍", "input": "", "output": "Hello again"}]]
    (tmp_path / "d.json").write_text(json.dumps(dialogues, ensure_ascii=False), encoding="utf-8")
    alpaca = [{"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "Sum", "input": "2 3", "output": "5"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in alpaca) + "\n", encoding="utf-8")
    for name, n_turns in (("d.json", 3), ("a.jsonl", 2)):
        out = tmp_path / ("out_" + name)
        convert(tiny_model_dir, out, data_file=tmp_path / name, max_length=128)
        assert load_ids(out)["meta"]["counts"]["turns"] == n_turns


def test_jsonl_lines_split_at_newlines_only(tmp_path):
    """A JSON Lines record whose text holds U+2028 or U+0085 unescaped (json.dumps with ensure_ascii=False
    writes them so) is one line: only newlines separate records."""
    turns = [{"instruction": "分段\u2028第二段", "input": "a\x85b", "output": "line\u2029sep"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(turns, ensure_ascii=False) + "\n\n" + json.dumps(turns, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert data_io.load_dialogues(str(path)) == [turns, turns]


class Payload:
    """A pickle that, if loaded with plain pickle, would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.slow
def test_unsafe_pickle_is_refused_and_runs_nothing(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "ift_data.pkl"
    evil.write_bytes(pickle.dumps([[{"instruction": "q", "input": "", "output": Payload(str(marker))}]]))
    proc = convert(tiny_model_dir, tmp_path, data_file=evil, check=False)
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and "posix.system" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "llama_ift_data_ids.pkl").exists()
    with pytest.raises(data_io.DataError):
        data_io.safe_load_pickle(str(evil))
    assert not marker.exists()


BAD_INPUTS = {
    "missing_key": ([[{"instruction": "q", "input": "", "output": "a"}], [{"instruction": "q", "input": ""}]], "dialogue 1, turn 0", "missing key"),
    "non_string": ([[{"instruction": "q", "input": "", "output": "a"}, {"instruction": "q", "input": 3, "output": "a"}]], "dialogue 0, turn 1", "'input' must be a string"),
    "empty_dialogue": ([[{"instruction": "q", "input": "", "output": "a"}], []], "dialogue 1", "empty dialogue"),
    "empty_answer": ([[{"instruction": "q", "input": "", "output": "  "}]], "dialogue 0, turn 0", "empty 'output'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_dialogues_fail_clearly_and_keep_old_output(tiny_model_dir, tmp_path, case):
    data, where, what = BAD_INPUTS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    previous = tmp_path / "llama_ift_data_ids.pkl"
    previous.write_bytes(b"previous output")
    proc = convert(tiny_model_dir, tmp_path, data_file=path, check=False)
    assert proc.returncode != 0
    assert str(path) in proc.stderr and where in proc.stderr and what in proc.stderr
    assert "Traceback" not in proc.stderr
    assert previous.read_bytes() == b"previous output"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.slow
def test_unreadable_json_and_missing_tokenizer(tiny_model_dir, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[[{"instruction": "q", "input": "", "output": "a"}', encoding="utf-8")
    proc = convert(tiny_model_dir, tmp_path, data_file=path, check=False)
    assert proc.returncode != 0 and "not valid JSON" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = convert(str(tmp_path / "no_such_tokenizer"), tmp_path, check=False)
    assert proc.returncode != 0 and "no_such_tokenizer" in proc.stderr and "--tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "llama_ift_data_ids.pkl").exists()


def test_template_choice_and_unknown_template(tiny_model_dir, tmp_path):
    rng_counts = collections.Counter()
    import random
    rng = random.Random(0)
    for _ in range(300):
        name, _ = prompt.pick_templates({"instruction": "q", "input": "x", "output": "a"}, rng, "random")
        rng_counts[name] += 1
    assert set(rng_counts) == set(config.TURN_TEMPLATES)  # every with-input template is drawn
    proc = convert(tiny_model_dir, tmp_path, "--template", "klingon", check=False)
    assert proc.returncode != 0 and "--template" in proc.stderr and "zh" in proc.stderr


# ----------------------------------------------------------------------------------------------
# the pipelined tokenization (--threads) and the fast paths: the same ids, the same bytes
# ----------------------------------------------------------------------------------------------
def reference_tokenized(tokenizer, samples, template, rng):
    """The conversion's ids done the plain way: each sample rendered by conversation_segments (drawing
    its templates), encoded by one call, closed by a learned eos."""
    out = []
    for turns in samples:
        input_ids, labels = prompt.encode_segments(tokenizer, prompt.conversation_segments(turns, template, rng))
        out.append((input_ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]))
    return out


def test_threads_give_the_same_file_bytes(tiny_model_dir, tmp_path):
    import random

    import convert_data
    from conftest import load_script

    bench = load_script("bench/bench_convert.py")
    data_file = tmp_path / "dialogues.jsonl"
    bench.write_jsonl(bench.synthetic_dialogues(600, 0), data_file)
    chunks = dataset.chunk_bounds(dataset.group_dialogues(data_io.load_dialogues(str(data_file)),
                                                          config.MAX_DIALOGUES_PER_SAMPLE, random.Random(5)),
                                  config.TOKENIZE_BATCH)
    assert len(chunks) >= 3            # so chunks are tokenized while others are rendered and assembled
    for threads in ("1", "2"):
        convert_data.main(["--tokenizer", tiny_model_dir, "--max_length", "256", "--data_file", str(data_file),
                           "--out_data_path", str(tmp_path / threads), "--seed", "5", "--threads", threads])
    one, two = ((tmp_path / t / "llama_ift_data_ids.pkl").read_bytes() for t in ("1", "2"))
    assert one == two
    counts = load_ids(tmp_path / "1")["meta"]["counts"]
    assert counts["samples"] == sum(end - begin for begin, end, _ in chunks)
    assert counts["truncated_samples"] > 0 and counts["rows"] > 1   # truncation and packing both ran


@pytest.mark.parametrize("flags, named", [(["--threads", "-1"], "--threads must be 0"),
                                          (["--workers", "2"], "use --threads instead")])
def test_bad_thread_flags_name_the_fix(flags, named, capsys):
    import convert_data

    with pytest.raises(SystemExit) as stop:
        convert_data.parse_args(["--tokenizer", "t", "--out_data_path", "o", *flags])
    assert stop.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("threads", [1, 2])
def test_pipelined_chunks_equal_the_plain_path(tiny_tokenizer, threads):
    """Many small chunks, each tokenized while the next is rendered, give exactly the samples, the
    truncation and drop counts and the learned tokens of the plain per-sample path, and leave the rng
    where the plain path leaves it."""
    import random

    samples = dataset.group_dialogues(data_io.load_dialogues(SAMPLE_PKL), 4, random.Random(1))
    assert len(dataset.chunk_bounds(samples, 64)) > 10
    rng_plain, rng_piped = random.Random(2), random.Random(2)
    expected = reference_tokenized(tiny_tokenizer, samples, "random", rng_plain)
    kept = [(ids[:48], labels[:48]) for ids, labels in expected
            if labels[:48].count(packing.IGNORE_INDEX) < len(labels[:48])]
    truncated = sum(len(ids) > 48 for ids, _ in expected)
    dropped = len(expected) - len(kept)
    learned = sum(len(labels) - labels.count(packing.IGNORE_INDEX) for _, labels in kept)
    assert dropped > 0 and truncated > dropped     # a meta prompt + question longer than 48 leaves nothing
    got = dataset.tokenize_and_truncate(tiny_tokenizer, samples, "random", rng_piped, 48, batch_size=64,
                                        threads=threads)
    assert got == (kept, truncated, dropped, learned)
    assert rng_piped.random() == rng_plain.random()


def test_segments_past_max_length_are_not_tokenized(tiny_tokenizer, monkeypatch):
    """Only the segments a truncated sample keeps a token of come back, whatever the estimate's margin:
    it moves work between rounds (a low margin encodes more in fewer rounds), never the ids."""
    import random

    samples = dataset.group_dialogues(data_io.load_dialogues(SAMPLE_PKL), 6, random.Random(1))
    rng = random.Random(2)
    picker = prompt.template_picker("random", rng)
    rendered = [prompt.render_segments(turns, [picker(turn) for turn in turns]) for turns in samples]
    whole = dataset.SegmentPrefixes(tiny_tokenizer).tokenize(rendered)
    needed = []
    for all_lists in whole:
        starts = [sum(map(len, all_lists[:k])) for k in range(len(all_lists))]
        needed.append(all_lists[:sum(start < 64 for start in starts)])
    total = sum(map(len, rendered))
    assert sum(map(len, needed)) < total / 2            # most of these long samples lie past 64 tokens
    work = []
    for margin in (0.3, 1.0, 4.0):
        monkeypatch.setattr(config, "TRUNCATION_ESTIMATE_MARGIN", margin)
        prefixes = dataset.SegmentPrefixes(tiny_tokenizer, max_length=64)
        cut = prefixes.tokenize(rendered[:40]) + prefixes.tokenize(rendered[40:])   # the estimate carries over
        assert cut == needed
        assert sum(map(len, needed)) <= prefixes.encoded < total
        work.append((prefixes.encoded, prefixes.rounds))
    (low_encoded, low_rounds), _, (high_encoded, high_rounds) = work
    assert low_encoded > high_encoded and low_rounds < high_rounds


def test_truncation_cuts_the_lists_in_place():
    long = (list(range(10)), [-100, -100] + list(range(2, 10)))
    short = ([1, 2], [-100, 2])
    nothing_left = ([5] * 8, [-100] * 3 + [5] * 5)
    kept, truncated, dropped, learned = dataset.truncate_samples([long, short, nothing_left], 3)
    assert (truncated, dropped, learned) == (2, 1, 1 + 1)
    assert kept == [([0, 1, 2], [-100, -100, 2]), short]
    assert kept[0][0] is long[0] and kept[0][1] is long[1]     # the same lists, cut; no copies


def test_a_tokenizer_error_in_the_pipeline_reaches_the_caller(tiny_tokenizer, monkeypatch):
    """An error raised while a chunk is tokenized in the background thread is raised by
    tokenize_samples itself, and the thread is gone afterwards."""
    import random
    import threading

    samples = dataset.group_dialogues(data_io.load_dialogues(SAMPLE_PKL), 4, random.Random(1))
    real, calls = prompt.tokenize_segment_texts, []

    def failing_on_the_third_chunk(tokenizer, texts, threads=None):
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("tokenizer broke on chunk 3")
        return real(tokenizer, texts, threads)

    monkeypatch.setattr(prompt, "tokenize_segment_texts", failing_on_the_third_chunk)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="chunk 3"):
        dataset.tokenize_samples(tiny_tokenizer, samples, "random", random.Random(2), batch_size=64)
    assert len(calls) in (3, 4)          # the chunk after the failing one may have been submitted already
    assert threading.active_count() == before


def test_drawn_templates_render_as_conversation_segments():
    import random

    dialogues = data_io.load_dialogues(SAMPLE_PKL)[:60]
    for template in ("random", "zh", "zh_known"):   # zh_known: only with an input, zh for the others
        rng_a, rng_b = random.Random(7), random.Random(7)
        pick = prompt.template_picker(template, rng_a)
        picks = [[pick(turn) for turn in turns] for turns in dialogues]
        drawn = [prompt.render_segments(turns, p) for turns, p in zip(dialogues, picks)]
        assert drawn == [prompt.conversation_segments(turns, template, rng_b) for turns in dialogues]
        assert rng_a.getstate() == rng_b.getstate()
        names = {name for p in picks for name, _ in p}
        assert names == (set(config.TURN_TEMPLATES) if template == "random" else
                         {template} if template == "zh" else {"zh", "zh_known"})


def test_validation_fast_path_agrees_with_the_checked_path():
    class Text(str):
        pass

    data = [[{"instruction": "q", "input": "", "output": "a", "extra": 1}],
            {"instruction": "Name a colour.", "output": "Blue."},                      # Alpaca record
            [{"instruction": Text("q"), "input": "x", "output": "a"}],               # a str subclass
            [{"instruction": "q", "input": "", "output": "a"}, {"instruction": "r", "input": "", "output": "b"}]]
    got = data_io.validate_dialogues(data, "f.json")
    assert got == [[{"instruction": "q", "input": "", "output": "a"}],
                   [{"instruction": "Name a colour.", "input": "", "output": "Blue."}],
                   [{"instruction": "q", "input": "x", "output": "a"}],
                   data[3]]
    assert all(list(t) == list(data_io.TURN_KEYS) for d in got for t in d)
    assert data_io._clean_turns(data[2]) is None and type(got[2][0]["instruction"]) is Text
    with pytest.raises(data_io.DataError, match=r"f.json: dialogue 1, turn 0: empty 'instruction'"):
        data_io.validate_dialogues([data[0], [{"instruction": " ", "input": "", "output": "a"}]], "f.json")
