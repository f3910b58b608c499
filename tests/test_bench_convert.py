"""bench/bench_convert.py: runs end to end on a few hundred dialogues and finds the ids identical.

Speed ratios are not asserted: they depend on the machine and its load.
"""
import json

from conftest import load_script, run_script



def load_bench():
    return load_script("bench/bench_convert.py")


def test_synthetic_dialogues_are_seeded_and_mixed():
    bench = load_bench()
    first, again, other = (bench.synthetic_dialogues(200, seed) for seed in (0, 0, 1))
    assert first == again and first != other
    assert {len(d) for d in first} == {1, 2, 3, 4, 5}
    turns = [t for d in first for t in d]
    assert any(t["input"] for t in turns) and any(not t["input"] for t in turns)
    has_cjk = lambda text: any("\u4e00" <= c <= "\u9fff" for c in text)  # noqa: E731
    assert any(has_cjk(t["output"]) for t in turns) and any(not has_cjk(t["output"]) for t in turns)
    for t in turns:
        assert t["instruction"].strip() and t["output"].strip()
        assert not any(t[key].startswith(" ") for key in ("instruction", "input", "output"))


def test_bench_runs_and_ids_are_identical(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(["bench/bench_convert.py", "--dialogues", "300", "--tokenizer", tiny_model_dir,
                       "--max_length", "512", "--json", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ids identical: yes" in proc.stdout
    assert "speed-up over the seed's method" in proc.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["ids_identical"] is True
    assert report["segments_differing"] == 0
    assert report["packed_fields_differing"] == {"seed_slow": [], "sentencepiece": []}
    assert report["dialogues"] == 300 and report["max_length"] == 512
    assert report["truncated_samples"] > 0 and 0 < report["segments_within_max_length"] < report["segments"]
    assert [row["method"] for row in report["results"]] == ["this project", "seed", "reference"]
    assert all(row["seconds"] > 0 and row["tokens_per_s"] > 0 for row in report["results"])
    assert report["command"].startswith("python bench/bench_convert.py --dialogues 300")
