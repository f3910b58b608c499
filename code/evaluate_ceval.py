"""Evaluate CuteGPT on C-Eval (Chinese multiple-choice exams): the last step of the recipe.

    # the published base + LoRA (int8 on a GPU), zero-shot and five-shot on the validation split
    python code/evaluate_ceval.py --data_dir ceval-exam --output_file ceval_results.json

    # your own merged or full model, five-shot only, on the test split (no answers there: the
    # predictions are written for C-Eval's submission, accuracies are not computed)
    python code/evaluate_ceval.py --model_path merged_model --lora_path none --quant bf16 \
        --data_dir ceval-exam --split test --shots 5

    # a few subjects, bigger batches
    python code/evaluate_ceval.py --data_dir ceval-exam --subjects high_school_physics law --batch_size 16

--data_dir is a local copy of the C-Eval release (nothing is downloaded):
DATA_DIR/dev/{subject}_dev.csv (the five solved examples of the few-shot setting) and
DATA_DIR/{val,test}/{subject}_{split}.csv, columns id, question, A, B, C, D, answer (none in test).
Every subject found in DATA_DIR/SPLIT is evaluated; its Chinese name and category come from
CEVAL_SUBJECTS below (the 52 C-Eval subjects).

A prompt is the subject header, the solved dev examples (five-shot) and the question, ending at the
answer prompt '答案：' (templates in config.CEVAL, rendered by prompt.py).  The prediction is the
option letter whose token gets the highest next-token logit there (no generation).  Prompts are
scored in batches, left-padded with an attention mask; a prompt longer than the model's context
loses its earliest examples first.  Accuracy per subject; a category average is the plain mean of
its subjects' accuracies and the overall average the plain mean over every evaluated subject.
Results are printed as tables (per subject, and STEM / Social Science / Humanities / Other /
Average as in CuteGPT's README) and written to --output_file (JSON, with every prediction).
The model flags are those of inference.py (int8/nf4/bf16/fp32, LoRA, merged models, --demo).
"""
import argparse
import csv
import os
import sys
import time

import torch
from tqdm import tqdm

import chat
import config
import data_io
import dataset
import model_loader
import prompt
from data_io import DataError

COLUMNS = ("id", "question", "A", "B", "C", "D")

# The benchmark's reference data (not settings): the four C-Eval categories, in the order of CuteGPT's tables.
CEVAL_CATEGORIES = ["STEM", "Social Science", "Humanities", "Other"]

# The 52 C-Eval subjects: name -> (Chinese name used in the prompt, category).  A category average is
# the plain mean of the accuracies of its subjects; the overall average the plain mean over all
# evaluated subjects (every subject weighs the same, however many questions it has).
CEVAL_SUBJECTS = {
    # STEM (20)
    "computer_network": ("计算机网络", "STEM"),
    "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"),
    "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"),
    "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"),
    "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"),
    "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"),
    "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"),
    "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"),
    "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"),
    "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"),
    "veterinary_medicine": ("兽医学", "STEM"),
    # Social Science (10)
    "college_economics": ("大学经济学", "Social Science"),
    "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"),
    "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"),
    "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    # Humanities (11)
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"),
    "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"),
    "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"),
    # Other (11)
    "civil_servant": ("公务员", "Other"),
    "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"),
    "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"),
    "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"),
    "physician": ("医师资格", "Other"),
}


def parse_args(argv=None):
    c = config.CEVAL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_loader.add_model_arguments(parser)
    parser.add_argument("--data_dir", required=True,
                        help="local C-Eval directory holding dev/, val/ and/or test/ with {subject}_{split}.csv")
    parser.add_argument("--split", choices=["val", "test"], default=c["split"],
                        help="questions to evaluate: val has answers, test only gets predictions (default: %(default)s)")
    parser.add_argument("--shots", type=int, nargs="+", default=list(c["shots"]),
                        help="few-shot settings to run, each the number of dev examples in the prompt "
                             "(default: %(default)s)")
    parser.add_argument("--subjects", nargs="+", default=None,
                        help="evaluate only these subjects (default: every subject found in DATA_DIR/SPLIT)")
    parser.add_argument("--batch_size", type=int, default=c["batch_size"],
                        help="prompts per forward pass (default: %(default)s)")
    parser.add_argument("--output_file", default=c["output_file"], help="results as JSON (default: %(default)s)")
    parser.add_argument("--model_name", default=None, help="name in the tables (default: from the model flags)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    model_loader.check_model_arguments(parser, args)
    if args.batch_size < 1:
        parser.error("--batch_size must be 1 or more")
    if any(k < 0 for k in args.shots):
        parser.error("--shots takes numbers of examples, 0 or more (e.g. --shots 0 5)")
    args.shots = sorted(set(args.shots))
    return args


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def read_csv(path, need_answer):
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text")
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})")
    missing = [c for c in COLUMNS + (("answer",) if need_answer else ()) if c not in fields]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; C-Eval files have {list(COLUMNS) + ['answer']}")
    choices = config.CEVAL["choices"]
    for index, row in enumerate(rows, 2):
        answer = (row.get("answer") or "").strip()
        if answer and answer not in choices:
            raise DataError(f"{path}: line {index}: answer {answer!r} is not one of {choices}")
        if need_answer and not answer:
            raise DataError(f"{path}: line {index}: no answer; the few-shot examples need one")
        row["answer"] = answer or None
        for key in COLUMNS:
            row[key] = row[key] or ""
    return rows


def load_subjects(data_dir, split, subjects, max_shots):
    """[(subject, rows, dev_rows)] of every subject found in DATA_DIR/SPLIT (or the ones named)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir}: no such directory (a local copy of the C-Eval data)")
    split_dir = os.path.join(data_dir, split)
    suffix = f"_{split}.csv"
    found = sorted(name[:-len(suffix)] for name in os.listdir(split_dir) if name.endswith(suffix)) \
        if os.path.isdir(split_dir) else []
    if not found:
        raise DataError(f"--data_dir {data_dir}: no {split}/{{subject}}{suffix} files; give the C-Eval directory "
                        f"that holds dev/, val/ and test/")
    unknown = [name for name in found if name not in CEVAL_SUBJECTS]
    if unknown:
        raise DataError(f"{os.path.join(split_dir, unknown[0] + suffix)}: {unknown[0]!r} is not a C-Eval subject "
                        f"(CEVAL_SUBJECTS in evaluate_ceval.py names the 52); rename the file or add the subject there")
    if subjects:
        absent = [s for s in subjects if s not in found]
        if absent:
            raise DataError(f"--subjects: {absent} not found in {split_dir} (found: {', '.join(found)})")
        found = [s for s in found if s in subjects]
    result = []
    for subject in found:
        rows = read_csv(os.path.join(split_dir, subject + suffix), need_answer=False)
        dev = []
        if max_shots > 0:
            dev_path = os.path.join(data_dir, "dev", f"{subject}_dev.csv")
            if not os.path.isfile(dev_path):
                raise DataError(f"{dev_path}: not found; the few-shot examples come from it (or use --shots 0)")
            dev = read_csv(dev_path, need_answer=True)
        result.append((subject, rows, dev))
    return result


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def answer_token_ids(tokenizer):
    """The token id of each option letter as it follows the answer prompt (not the letter alone:
    with SentencePiece's dummy prefix 'A' alone is '▁A', after '答案：' it is 'A')."""
    stem = prompt.ceval_question({"question": "问题", "A": "甲", "B": "乙", "C": "丙", "D": "丁"})
    choices = config.CEVAL["choices"]
    encoded = prompt.tokenize_segment_texts(tokenizer, [stem] + [stem + letter for letter in choices])
    ids = []
    for letter, full in zip(choices, encoded[1:]):
        if full[:len(encoded[0])] != encoded[0] or len(full) != len(encoded[0]) + 1:
            raise DataError(f"this tokenizer does not write the option letter {letter!r} as one token after the "
                            f"answer prompt {config.CEVAL['question'][-3:]!r}; it cannot be scored by its logit")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise DataError(f"the option letters share token ids {ids}: they cannot be told apart")
    return ids


def build_prompts(tokenizer, subject, rows, dev, shots, limit):
    """Token ids of every question's prompt, at most ``limit`` tokens; and how many were cut."""
    name = CEVAL_SUBJECTS[subject][0]
    examples = dev[:shots]
    texts = [prompt.ceval_prompt(name, row, examples) for row in rows]
    encoded = prompt.tokenize_segment_texts(tokenizer, texts)
    cut = 0
    for index, ids in enumerate(encoded):
        if len(ids) <= limit:
            continue
        cut += 1
        for kept in range(len(examples) - 1, -1, -1):   # drop the earliest examples first
            text = prompt.ceval_prompt(name, rows[index], examples[len(examples) - kept:])
            ids = prompt.tokenize_segment_texts(tokenizer, [text])[0]
            if len(ids) <= limit:
                break
        encoded[index] = ids[-limit:]
    return encoded, cut


def score_prompts(model, prompts, letter_ids, batch_size, pad_id, progress=None):
    """The four option-letter logits at the last position of each prompt (batched, left-padded)."""
    device = model_loader.input_device(model)
    letters = torch.tensor(letter_ids, device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in members)
        ids = torch.full((len(members), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False, logits_to_keep=1).logits
        picked = logits[:, -1, :].float().index_select(-1, letters).cpu().tolist()
        for row, i in enumerate(members):
            scores[i] = picked[row]
        if progress is not None:
            progress.update(len(members))
    return scores


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(per_subject):
    """Category averages (plain mean over the category's subjects) and the overall average."""
    categories = {}
    for category in CEVAL_CATEGORIES:
        categories[category] = mean([r["accuracy"] for r in per_subject.values() if r["category"] == category])
    return categories, mean([r["accuracy"] for r in per_subject.values()])


def evaluate(model, tokenizer, subjects, shots, batch_size, show_progress=True):
    """One few-shot setting over ``subjects``: per-subject results, category and overall averages."""
    letter_ids = answer_token_ids(tokenizer)
    choices = config.CEVAL["choices"]
    limit = chat.context_length_of(model, tokenizer)
    all_prompts, owners, truncated = [], [], 0
    for subject, rows, dev in subjects:
        encoded, cut = build_prompts(tokenizer, subject, rows, dev, shots, limit)
        truncated += cut
        all_prompts += encoded
        owners += [(subject, row) for row in rows]
    with tqdm(total=len(all_prompts), desc=f"C-Eval {shots}-shot", unit="q", disable=not show_progress,
              file=sys.stderr) as bar:
        scores = score_prompts(model, all_prompts, letter_ids, batch_size, dataset.pad_token_id_of(tokenizer), bar)
    per_subject, predictions = {}, {}
    for (subject, row), score in zip(owners, scores):
        name, category = CEVAL_SUBJECTS[subject]
        record = per_subject.setdefault(subject, {"name": name, "category": category, "questions": 0,
                                                  "answered": 0, "correct": 0})
        predicted = choices[max(range(len(choices)), key=lambda j: score[j])]
        predictions.setdefault(subject, {})[row["id"]] = predicted
        record["questions"] += 1
        if row["answer"] is not None:
            record["answered"] += 1
            record["correct"] += predicted == row["answer"]
    for record in per_subject.values():
        record["accuracy"] = record["correct"] / record["answered"] if record["answered"] else None
    categories, average = summarise(per_subject)
    return {"shots": shots, "subjects": per_subject, "categories": categories, "average": average,
            "questions": len(all_prompts), "truncated_prompts": truncated, "predictions": predictions}


def percent(value):
    return "-" if value is None else f"{100 * value:.1f}"


def format_tables(model_name, split, results):
    """Markdown tables: per subject (one column per setting), then the category summary."""
    lines = [f"C-Eval {split}: {model_name}", ""]
    header = "| Subject | Category | Questions | " + " | ".join(f"{r['shots']}-shot" for r in results) + " |"
    lines += [header, "|" + " --- |" * (3 + len(results))]
    for subject, record in results[0]["subjects"].items():
        accuracies = " | ".join(percent(r["subjects"][subject]["accuracy"]) for r in results)
        lines.append(f"| {subject} ({record['name']}) | {record['category']} | {record['questions']} | {accuracies} |")
    lines += ["", "| Model | " + " | ".join(CEVAL_CATEGORIES) + " | Average |",
              "|" + " --- |" * (2 + len(CEVAL_CATEGORIES))]
    for r in results:
        cells = " | ".join(percent(r["categories"][c]) for c in CEVAL_CATEGORIES)
        lines.append(f"| {model_name} ({r['shots']}-shot) | {cells} | {percent(r['average'])} |")
    return "\n".join(lines)


def model_label(args):
    if getattr(args, "demo", False):
        return "demo"
    model_path, lora_path = model_loader.model_choice(args)
    label = os.path.basename(os.path.normpath(model_path))
    return label + (f" + {os.path.basename(os.path.normpath(lora_path))}" if lora_path else "")


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    try:
        data_io.check_writable_dir(os.path.dirname(os.path.abspath(args.output_file)), "output folder (--output_file)")
        subjects = load_subjects(args.data_dir, args.split, args.subjects, max(args.shots))
        model, tokenizer = model_loader.load_from_args(args)
        results = [evaluate(model, tokenizer, subjects, k, args.batch_size, not args.no_progress) for k in args.shots]
    except DataError as e:
        data_io.fail(str(e))
    name = args.model_name or model_label(args)
    print(format_tables(name, args.split, results))
    for r in results:
        if r["truncated_prompts"]:
            print(f"note: {r['truncated_prompts']} {r['shots']}-shot prompts were longer than the model's context "
                  f"and lost their earliest examples", file=sys.stderr)
    data_io.atomic_write_json(args.output_file, {
        "model": name, "split": args.split, "data_dir": args.data_dir,
        "averaging": "category: plain mean of its subjects' accuracies; average: plain mean over all subjects",
        "results": {f"{r['shots']}-shot": r for r in results},
    })
    print(f"wrote {args.output_file} ({sum(len(rows) for _, rows, _ in subjects)} questions x {len(results)} "
          f"setting(s), {time.time() - started:.1f}s)")


if __name__ == "__main__":
    main()
