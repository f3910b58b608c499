"""Continued pre-training (convert_data.py --mode pretrain + finetune.py) and C-Eval evaluation
(evaluate_ceval.py) on a synthetic C-Eval-format set written here from the sample dialogues.

One training run serves both: the tiny model is pre-trained on the set's questions rendered with the
evaluation prompt plus their answer letter; its loss falls, and it then scores far above chance where
the untrained model scores near chance (every answer letter is equally frequent, so any constant
guess scores exactly 25%)."""
import csv
import json
import os

import pytest
import torch

from conftest import REPO, run_script

import data_io
import dataset
import evaluate_ceval
import prompt

SUBJECTS = ["high_school_physics", "marxism", "law", "physician"]   # one per category
PER_SUBJECT = 8
MAX_LENGTH = 512


def write_ceval(root):
    """dev (5 solved) and val (PER_SUBJECT) CSVs per subject: questions are sample-data instructions,
    the right option is the start of their answer, the wrong ones starts of other answers."""
    with open(os.path.join(REPO, "data", "test", "ift_data.json"), encoding="utf-8") as f:
        dialogues = json.load(f)
    turns = [t for d in dialogues for t in d if not t["input"] and 4 <= len(t["instruction"]) <= 14]
    turns = sorted({t["instruction"]: t for t in turns}.values(), key=lambda t: t["instruction"])
    options = [t["output"].replace("\n", " ")[:4] for t in turns]
    assert len(turns) >= len(SUBJECTS) * (PER_SUBJECT + 5)
    k, documents = 0, []
    for subject in SUBJECTS:
        for split, count in (("dev", 5), ("val", PER_SUBJECT)):
            rows = []
            for i in range(count):
                letter = "ABCD"[i % 4]
                choices = [options[(k + j) % len(options)] for j in (11, 23, 37)]
                choices.insert("ABCD".index(letter), options[k])
                rows.append(dict(id=str(i), question=turns[k]["instruction"], A=choices[0], B=choices[1],
                                 C=choices[2], D=choices[3], answer=letter))
                k += 1
            os.makedirs(os.path.join(root, split), exist_ok=True)
            with open(os.path.join(root, split, f"{subject}_{split}.csv"), "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["id", "question", "A", "B", "C", "D", "answer"])
                writer.writeheader()
                writer.writerows(rows)
            if split == "val":
                name = evaluate_ceval.CEVAL_SUBJECTS[subject][0]
                documents += [prompt.ceval_prompt(name, row) + row["answer"] for row in rows]
    with open(os.path.join(root, "train.jsonl"), "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return os.path.join(root, "train.jsonl")


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ceval"))
    write_ceval(root)
    return root


@pytest.fixture(scope="module")
def pretrained(tiny_model_dir, ceval_dir, tmp_path_factory):
    """convert_data.py --mode pretrain, then full-parameter finetune.py on it (no --special_end_token)."""
    work = tmp_path_factory.mktemp("pretrain")
    proc = run_script(["code/convert_data.py", "--mode", "pretrain", "--tokenizer", tiny_model_dir,
                       "--data_file", os.path.join(ceval_dir, "train.jsonl"), "--max_length", str(MAX_LENGTH),
                       "--out_data_path", str(work / "data")], check=True)
    assert "32 documents" in proc.stdout
    data = str(work / "data" / "llama_pretrain_data_ids.pkl")
    proc = run_script(["code/finetune.py", "--model_path", tiny_model_dir, "--dataset_type", "DatasetIds",
                       "--data_path", data, "--max_length", str(MAX_LENGTH), "--max_epoches", "30",
                       "--save_dir", str(work / "ckp"), "--save_name", "pt", "--micro_batch_size", "4",
                       "--grad_accum", "1", "--lr", "1e-2", "--warmup_steps", "5", "--save_steps", "100000",
                       "--no_progress", "--seed", "1"], check=True)
    assert "added '<end>'" not in proc.stdout   # plain text: the tokenizer stays as it is
    return data, str(work / "ckp" / "pt")


# ----------------------------------------------------------------------------------------------
# pre-training mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_ids_learn_every_token(tiny_model_dir, pretrained):
    from transformers import AutoTokenizer

    datas = data_io.safe_load_pickle(pretrained[0])
    assert datas["format"] == dataset.IDS_FORMAT and datas["meta"]["mode"] == "pretrain"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = dataset.DatasetIds(tokenizer, datas, MAX_LENGTH)   # the check finetune.py makes passes
    for ids, labels, mask, starts in zip(datas["input_ids"], datas["labels"], datas["attention_mask"],
                                         datas["sample_starts"]):
        real = sum(mask)
        learned = [i for i in range(real) if labels[i] != -100]
        # every real token is learned but the first of each sample (nothing before it predicts it)
        assert learned == [i for i in range(real) if i not in starts]
        assert all(labels[i] == ids[i] for i in learned)
    assert len(rows) == len(datas["input_ids"])


@pytest.mark.slow
def test_long_documents_are_chunked_not_dropped(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_doc = "复旦大学知识工场实验室训练语言模型。" * 60
    (tmp_path / "corpus.txt").write_text(f"第一篇短文。\n第二行。\n\n{long_doc}\n\n\n  \n最后一篇。", encoding="utf-8")
    docs = data_io.load_documents(str(tmp_path / "corpus.txt"))
    assert docs == ["第一篇短文。\n第二行。", long_doc, "最后一篇。"]
    ids = prompt.tokenize_segment_texts(tokenizer, [long_doc])[0] + [tokenizer.eos_token_id]
    chunks = dataset.chunk_document(ids, 64)
    assert len(chunks) >= 3 and all(len(chunk_ids) <= 64 for chunk_ids, _ in chunks)
    # the chunks overlap by one token and together learn every token after the first exactly once
    learned = [t for chunk_ids, labels in chunks for t, label in zip(chunk_ids, labels) if label != -100]
    assert learned == ids[1:]
    run_script(["code/convert_data.py", "--mode", "pretrain", "--tokenizer", tiny_model_dir, "--data_file",
                str(tmp_path / "corpus.txt"), "--max_length", "64", "--out_data_path", str(tmp_path)], check=True)
    counts = data_io.safe_load_pickle(str(tmp_path / "llama_pretrain_data_ids.pkl"))["meta"]["counts"]
    assert counts["documents"] == 3 and counts["cut_documents"] == 1 and counts["samples"] == len(chunks) + 2


@pytest.mark.slow
def test_pretraining_lowers_the_loss(pretrained):
    with open(os.path.join(pretrained[1], "train_log.jsonl"), encoding="utf-8") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 60
    assert sum(losses[-3:]) / 3 < 0.1 * sum(losses[:3]) / 3


# ----------------------------------------------------------------------------------------------
# C-Eval evaluation
# ----------------------------------------------------------------------------------------------
def evaluate(model_dir, ceval_dir, out_file, *extra):
    proc = run_script(["code/evaluate_ceval.py", "--model_path", model_dir, "--lora_path", "none",
                       "--data_dir", ceval_dir, "--output_file", out_file, "--no_progress", *extra], check=True)
    with open(out_file, encoding="utf-8") as f:
        return json.load(f), proc.stdout


@pytest.mark.slow
def test_trained_model_scores_far_above_chance_untrained_near_it(tiny_model_dir, ceval_dir, pretrained, tmp_path):
    trained, stdout = evaluate(os.path.join(pretrained[1], "pt_epoch29"), ceval_dir, str(tmp_path / "t.json"),
                               "--shots", "0", "--model_name", "tiny-pt")
    untrained, _ = evaluate(tiny_model_dir, ceval_dir, str(tmp_path / "u.json"), "--batch_size", "5")
    zero = trained["results"]["0-shot"]
    assert zero["questions"] == len(SUBJECTS) * PER_SUBJECT
    assert zero["average"] >= 0.8, zero["average"]
    for setting in ("0-shot", "5-shot"):
        assert untrained["results"][setting]["average"] <= 0.4
    # the README layout: the category summary row of the trained model
    cells = " | ".join(f"{100 * zero['categories'][c]:.1f}" for c in evaluate_ceval.CEVAL_CATEGORIES)
    assert f"| tiny-pt (0-shot) | {cells} | {100 * zero['average']:.1f} |" in stdout
    assert "| Model | STEM | Social Science | Humanities | Other | Average |" in stdout


def test_category_averages_as_documented():
    per_subject = {
        "high_school_physics": {"category": "STEM", "accuracy": 1.0},
        "college_physics": {"category": "STEM", "accuracy": 0.5},
        "marxism": {"category": "Social Science", "accuracy": 0.25},
        "law": {"category": "Humanities", "accuracy": 0.75},
    }
    categories, average = evaluate_ceval.summarise(per_subject)
    # a category: the plain mean of its subjects; overall: the plain mean of all subjects
    assert categories == {"STEM": 0.75, "Social Science": 0.25, "Humanities": 0.75, "Other": None}
    assert average == pytest.approx((1.0 + 0.5 + 0.25 + 0.75) / 4)
    assert len(evaluate_ceval.CEVAL_SUBJECTS) == 52
    counts = {c: sum(1 for _, cat in evaluate_ceval.CEVAL_SUBJECTS.values() if cat == c)
              for c in evaluate_ceval.CEVAL_CATEGORIES}
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}


def test_batched_scores_equal_unbatched_and_letter_ids(tiny_model_dir, tiny_tokenizer, ceval_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    letters = evaluate_ceval.answer_token_ids(tiny_tokenizer)
    # the letter as it follows '答案：', not the letter alone (which carries the dummy-prefix '▁')
    assert [tiny_tokenizer.decode([i]) for i in letters] == ["A", "B", "C", "D"]
    subjects = evaluate_ceval.load_subjects(ceval_dir, "val", None, 5)
    prompts = []
    for subject, rows, dev in subjects:
        prompts += evaluate_ceval.build_prompts(tiny_tokenizer, subject, rows, dev, 5, 2048)[0][:2]
        prompts += evaluate_ceval.build_prompts(tiny_tokenizer, subject, rows, dev, 0, 2048)[0][:2]
    pad = dataset.pad_token_id_of(tiny_tokenizer)
    batched = evaluate_ceval.score_prompts(model, prompts, letters, 16, pad)
    single = evaluate_ceval.score_prompts(model, prompts, letters, 1, pad)
    assert len({len(p) for p in prompts}) > 2   # really padded
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-4)
    # and equal to the plain forward pass of one prompt
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1, letters]
    assert torch.allclose(torch.tensor(single[0]), logits, atol=1e-4)
    # a prompt longer than the context loses its earliest examples first
    subject, rows, dev = subjects[0]
    full = evaluate_ceval.build_prompts(tiny_tokenizer, subject, rows[:1], dev, 5, 2048)[0][0]
    short, cut = evaluate_ceval.build_prompts(tiny_tokenizer, subject, rows[:1], dev, 5, len(full) - 1)
    assert cut == 1 and len(short[0]) < len(full) and short[0][-20:] == full[-20:]


@pytest.mark.slow
def test_bad_data_dir_and_test_split(tiny_model_dir, ceval_dir, tmp_path):
    proc = run_script(["code/evaluate_ceval.py", "--model_path", tiny_model_dir, "--lora_path", "none",
                       "--data_dir", str(tmp_path / "nowhere")])
    assert proc.returncode != 0 and "--data_dir" in proc.stderr and "Traceback" not in proc.stderr
    from data_io import DataError

    bad = tmp_path / "bad"
    (bad / "val").mkdir(parents=True)
    (bad / "val" / "underwater_basket_weaving_val.csv").write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    with pytest.raises(DataError, match="not a C-Eval subject"):
        evaluate_ceval.load_subjects(str(bad), "val", None, 0)
    # the test split has no answers: predictions only
    test_dir = tmp_path / "withtest"
    (test_dir / "test").mkdir(parents=True)
    with open(os.path.join(ceval_dir, "val", "law_val.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(test_dir / "test" / "law_test.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "question", "A", "B", "C", "D"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("id", "question", "A", "B", "C", "D")} for r in rows)
    result, _ = evaluate(tiny_model_dir, str(test_dir), str(tmp_path / "test.json"), "--split", "test", "--shots", "0")
    law = result["results"]["0-shot"]
    assert law["subjects"]["law"]["accuracy"] is None and len(law["predictions"]["law"]) == len(rows)
