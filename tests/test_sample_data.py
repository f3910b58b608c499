"""Checks on the sample instruction-tuning data written by data/make_sample_data.py.

Run:  python -m pytest tests/test_sample_data.py -q
"""
import io
import json
import os
import pickle
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "data", "test")
PKL = os.path.join(DATA_DIR, "ift_data.pkl")
JSON = os.path.join(DATA_DIR, "ift_data.json")
GENERATOR = os.path.join(ROOT, "data", "make_sample_data.py")
KEYS = {"instruction", "input", "output"}
CJK = re.compile(r"[\u4e00-\u9fff]")


class NoClassUnpickler(pickle.Unpickler):
    """Allows only what pickle builds without find_class: lists, dicts, str and other plain values."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_pkl(path):
    with open(path, "rb") as f:
        return NoClassUnpickler(f).load()


@pytest.fixture(scope="module")
def data():
    return load_pkl(PKL)


def test_restricted_unpickler_refuses_classes():
    evil = pickle.dumps(object(), protocol=4)
    with pytest.raises(pickle.UnpicklingError):
        NoClassUnpickler(io.BytesIO(evil)).load()


def test_enough_dialogues(data):
    assert isinstance(data, list)
    assert len(data) >= 200


def test_turn_format(data):
    for d_i, dialogue in enumerate(data):
        assert isinstance(dialogue, list) and 1 <= len(dialogue) <= 5, d_i
        for t_i, turn in enumerate(dialogue):
            assert isinstance(turn, dict), (d_i, t_i)
            assert set(turn) == KEYS, (d_i, t_i)
            assert all(type(v) is str for v in turn.values()), (d_i, t_i)
            assert turn["instruction"].strip(), (d_i, t_i)
            assert turn["output"].strip(), (d_i, t_i)
            assert len(turn["instruction"]) < 200, (d_i, t_i)
            assert len(turn["output"]) <= 600, (d_i, t_i)


def test_instructions_unique(data):
    instructions = [t["instruction"] for d in data for t in d]
    repeated = sorted({i for i in instructions if instructions.count(i) > 1})
    assert not repeated, repeated


def test_mix(data):
    n = len(data)
    multi = sum(len(d) > 1 for d in data)
    with_input = sum(any(t["input"] for t in d) for d in data)
    chinese = sum(any(CJK.search(t["instruction"] + t["input"] + t["output"]) for t in d) for d in data)
    assert multi / n >= 0.30, multi
    assert with_input / n >= 0.20, with_input
    assert chinese / n >= 0.25, chinese
    assert (n - chinese) / n >= 0.25, n - chinese


def test_canned_dialogue(data):
    first = data[0]
    assert len(first) == 2
    assert first[0]["instruction"] == "请推荐五本名著，依次列出作品名、作者"
    assert first[1]["instruction"] == "再来三本呢？"
    assert first[0]["input"] == "" and first[1]["input"] == ""
    books0 = [line for line in first[0]["output"].splitlines() if "《" in line]
    books1 = [line for line in first[1]["output"].splitlines() if "《" in line]
    assert len(books0) == 5
    assert len(books1) == 3
    titles0 = {re.search(r"《(.+?)》", line).group(1) for line in books0}
    titles1 = {re.search(r"《(.+?)》", line).group(1) for line in books1}
    assert len(titles0) == 5 and len(titles1) == 3 and not titles0 & titles1


def test_json_matches_pickle(data):
    with open(JSON, "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\n")
    assert json.loads(raw.decode("utf-8")) == data


def test_generator_is_deterministic(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, GENERATOR, "--out_dir", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("ift_data.pkl", "ift_data.json"):
        with open(os.path.join(DATA_DIR, name), "rb") as f:
            committed = f.read()
        with open(out / name, "rb") as f:
            fresh = f.read()
        assert fresh == committed, f"{name} differs from a fresh run of the generator"
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
