"""Data conversion speed: this project's batched fast tokenizer against the seed's one slow call per piece.

    # the recorded benchmark (BENCHMARKS.md): 20,000 synthetic dialogues, tiny tokenizer built on the fly
    python bench/bench_convert.py --dialogues 20000 --json bench_convert.json

    # another tokenizer (a local model directory or a Hugging Face id holding tokenizer.model)
    python bench/bench_convert.py --tokenizer path/to/model --dialogues 20000

    # each method three times, rounds interleaved, the best time of each kept (a shared machine's noise)
    python bench/bench_convert.py --dialogues 20000 --repeats 3 --json bench_convert.json

    # the project's tokenizer on one thread (convert_data.py --threads 1)
    python bench/bench_convert.py --dialogues 20000 --threads 1

One process converts the same synthetic dialogues (a seeded Chinese/English mix of 1-5 turns, some
turns with an input) three ways, back to back (--repeats N: N such rounds, interleaved):

1. this project: ``convert_data.convert(args)``, the real code path of ``code/convert_data.py``;
   nothing of it is re-implemented here.
2. the seed's method: the same steps (same reading, ``dataset.group_dialogues`` and
   ``prompt.conversation_segments`` with an identically seeded rng, same truncation and packing), but
   every segment is tokenized by its own call of transformers 5's slow, sentencepiece-backed class
   (``SentencePieceBackend``, ``legacy=True``: what transformers 4's slow ``LlamaTokenizer`` did).
3. a reference: the same, with a bare ``sentencepiece.SentencePieceProcessor.encode(piece)`` per piece.

The packed rows of 2 and 3 must equal the project's, and every segment's ids the fast tokenizer's;
otherwise the differing segments are counted (with how many start with a space) and the script exits 1.
It prints one table (seconds, dialogues/s, tokens/s, speed-up); --json also writes the figures with the
machine, package versions and command.  Each method's figure is its best of the N rounds (other work on
a shared machine only ever adds time).  Only the first round's outputs are checked; later rounds must
give the same rows (a digest), and no round's outputs outlive it, so every timed run starts from the
same heap.  The project tokenizes only the segments that hold a token within --max_length (the report
counts them); --max_dialogues_per_sample 1 gives a workload with few samples truncated.
"""
import argparse
import gc
import hashlib
import os
import pickle
import platform
import random
import sys
import tempfile
import time

import sentencepiece as spm
from transformers import SentencePieceBackend

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

import bench_common  # noqa: E402
import config  # noqa: E402
import convert_data  # noqa: E402
import data_io  # noqa: E402
import dataset  # noqa: E402
import model_loader  # noqa: E402
import packing  # noqa: E402
import prompt  # noqa: E402
from data_io import DataError  # noqa: E402
from synthetic_dialogues import synthetic_dialogues, write_jsonl  # noqa: E402

TARGET_SPEEDUP = 10.0


# ----------------------------------------------------------------------------------------------
# the seed's method: one tokenizer call per piece
# ----------------------------------------------------------------------------------------------
def load_slow_tokenizer(directory):
    """transformers 5's sentencepiece-backed slow tokenizer class, in legacy mode (the seed's LlamaTokenizer)."""
    tokenizer = SentencePieceBackend.from_pretrained(directory, legacy=True)
    return (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id, dataset.pad_token_id_of(tokenizer))


def load_sentencepiece(directory):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    return sp.encode, sp.eos_id(), sp.eos_id()  # LLaMA has no pad piece: eos pads, as pad_token_id_of says


def convert_per_piece(args, load):
    """convert_data.convert's steps, with one ``encode(piece)`` call per segment instead of batches.

    Returns (packed rows, segment texts, segment ids, segments of each sample)."""
    dialogues = data_io.load_dialogues(args.data_file)
    encode, eos_id, pad_id = load()
    rng = random.Random(args.seed)
    samples = dataset.group_dialogues(dialogues, args.max_dialogues_per_sample, rng)
    tokenized, texts, segment_ids, sample_segments = [], [], [], []
    for turns in samples:
        sample_segments.append(dataset.segment_count(turns))
        input_ids, labels = [], []
        # the rng is only drawn by conversation_segments, so sample by sample gives the same draws as
        # the project, which draws every turn's template in order before rendering
        for text, learned in prompt.conversation_segments(turns, template=args.template, rng=rng):
            ids = encode(text)
            texts.append(text)
            segment_ids.append(ids)
            input_ids.extend(ids)
            labels.extend(ids if learned else [packing.IGNORE_INDEX] * len(ids))
        input_ids.append(eos_id)
        labels.append(eos_id)
        tokenized.append((input_ids, labels))
    kept = dataset.truncate_samples(tokenized, args.max_length)[0]
    packed = packing.pack_samples(kept, args.max_length, pad_id)
    return packed, texts, segment_ids, sample_segments


# ----------------------------------------------------------------------------------------------
# bookkeeping
# ----------------------------------------------------------------------------------------------
def versions():
    out = {"python": platform.python_version()}
    out.update((name, bench_common.installed_version(name))
               for name in ("torch", "transformers", "tokenizers", "sentencepiece"))
    return out


def timed(function, *args, **kwargs):
    gc.collect()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


PACKED_FIELDS = ("input_ids", "labels", "attention_mask", "sample_starts")


def compare(project, other):
    """Names of the packed fields that differ."""
    return [key for key in PACKED_FIELDS if project[key] != other[key]]


def packed_digest(packed):
    return hashlib.sha256(pickle.dumps([packed[key] for key in PACKED_FIELDS], protocol=4)).hexdigest()


def check_first_round(project, slow_run, bare_run, tokenizer_dir, max_length):
    """The checks of the first round's outputs, as plain counts (so that no segment list outlives the
    round): segments, tokens (every segment's ids), segments whose ids differ and how many of them start
    with a space, the packed fields that differ, and the segments holding a token within max_length
    (those the project has to tokenize)."""
    slow, texts, slow_ids, sample_segments = slow_run
    bare, _, bare_ids, _ = bare_run
    fast = convert_data.load_tokenizer(tokenizer_dir, False)
    fast_ids = []
    for start in range(0, len(texts), config.TOKENIZE_BATCH):
        fast_ids.extend(prompt.tokenize_segment_texts(fast, texts[start:start + config.TOKENIZE_BATCH]))
    differing = [i for i in range(len(texts)) if not (fast_ids[i] == slow_ids[i] == bare_ids[i])]
    fields = {"seed_slow": compare(project, slow), "sentencepiece": compare(project, bare)}
    needed, first = 0, 0
    for count in sample_segments:
        start = 0
        for ids in fast_ids[first:first + count]:
            if start >= max_length:
                break
            needed += 1
            start += len(ids)
        first += count
    return {"segments": len(texts), "tokens": sum(map(len, fast_ids)), "differing": len(differing),
            "differing_with_leading_space": sum(texts[i][:1] == " " for i in differing), "fields": fields,
            "within_max_length": needed}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=20000,
                        help="synthetic dialogues to convert (default: %(default)s)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or Hugging Face id holding tokenizer.model (default: a tiny "
                             "SentencePiece tokenizer built into a temporary folder by code/build_tiny_model.py "
                             "from data/test/ift_data.pkl)")
    parser.add_argument("--max_length", type=int, default=config.MAX_LENGTH,
                        help="tokens per packed row, as convert_data.py --max_length (default: %(default)s)")
    parser.add_argument("--max_dialogues_per_sample", type=int, default=config.MAX_DIALOGUES_PER_SAMPLE,
                        help="dialogues joined into one sample, as convert_data.py --max_dialogues_per_sample; 1 "
                             "leaves few samples longer than --max_length (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic dialogues and of the conversion's shuffle, joining and "
                             "template draws (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=config.CONVERT_THREADS,
                        help="this project's tokenizer threads, as convert_data.py --threads (0: one per usable "
                             f"core, at most {config.CONVERT_THREADS_MAX}) (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the three methods (interleaved); each method's best time is reported "
                             "(default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="OUT.json",
                        help="also write the figures, date, machine, versions and command to this JSON file")
    args = parser.parse_args(argv)
    if args.dialogues < 1:
        parser.error("--dialogues must be at least 1")
    if args.max_length < 16:
        parser.error("--max_length must be at least 16")
    if args.threads < 0:
        parser.error("--threads must be 0 (one per usable core) or more")
    if args.max_dialogues_per_sample < 1:
        parser.error("--max_dialogues_per_sample must be 1 or more")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def tokenizer_under_test(args, workdir):
    """(directory, description) of the tokenizer to convert with: --tokenizer, or a tiny one built now."""
    if args.tokenizer is None:
        print("building the tiny tokenizer (code/build_tiny_model.py) ...", flush=True)
        tokenizer_dir = bench_common.build_tiny_model(os.path.join(workdir, "tiny"))
        tokenizer_name = "tiny SentencePiece BPE built by code/build_tiny_model.py from data/test/ift_data.pkl"
    else:
        tokenizer_dir = model_loader.resolve_path(args.tokenizer, "--tokenizer")
        tokenizer_name = args.tokenizer
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.model")):
        raise DataError(f"--tokenizer {args.tokenizer}: holds no tokenizer.model, which the seed's slow "
                        f"tokenizer needs")
    return tokenizer_dir, tokenizer_name


def timed_rounds(args, convert_args, tokenizer_dir):
    """--repeats rounds of the three methods, back to back on the same input.

    Returns (seconds of each run per method, the first round's counts and checks, the rounds whose
    output differed from the first's)."""
    threads = dataset.resolve_threads(args.threads)
    times = {"project": [], "seed": [], "reference": []}
    unstable = []
    for round_index in range(args.repeats):
        tag = f"round {round_index + 1}/{args.repeats}: " if args.repeats > 1 else ""
        print(f"{tag}1/3 this project: convert_data.convert, --threads {args.threads} -> {threads} ...", flush=True)
        project_run, seconds = timed(convert_data.convert, convert_args, show_progress=False)
        times["project"].append(seconds)
        print(f"{tag}2/3 seed's method: slow SentencePieceBackend, one call per piece ...", flush=True)
        slow_run, seconds = timed(convert_per_piece, convert_args, lambda: load_slow_tokenizer(tokenizer_dir))
        times["seed"].append(seconds)
        print(f"{tag}3/3 reference: bare sentencepiece, one call per piece ...", flush=True)
        bare_run, seconds = timed(convert_per_piece, convert_args, lambda: load_sentencepiece(tokenizer_dir))
        times["reference"].append(seconds)
        digests = [packed_digest(project_run), packed_digest(slow_run[0]), packed_digest(bare_run[0])]
        if round_index == 0:
            # checks (untimed), on the first round's outputs: whole packed rows, then segment by segment
            # against the fast tokenizer; later rounds only have to give the same rows again
            first_digests = digests
            counts = dict(project_run["meta"]["counts"], tokenizer_vocab_size=project_run["meta"]["tokenizer"]["vocab_size"])
            checks = check_first_round(project_run, slow_run, bare_run, tokenizer_dir, args.max_length)
        elif digests != first_digests:     # the same input gives the same output every round
            unstable.append(round_index + 1)
        # nothing of a round outlives it: every timed run starts from the same heap (a run beside another
        # method's millions of live objects is slower, and unequally so)
        del project_run, slow_run, bare_run
    return times, counts, checks, unstable


def results_table(times, threads, dialogues, tokens):
    """One row per method: its best round's seconds, all rounds, throughput, and the project's speed-up."""
    methods = [
        ("this project", f"convert_data.convert: SentencePiece batches on {threads} thread(s) beside the Python "
                         f"work, chunks of {config.TOKENIZE_BATCH} segments, {dataset.usable_cores()} cores",
         times["project"]),
        ("seed", "transformers SentencePieceBackend (slow, legacy), one call per piece", times["seed"]),
        ("reference", "sentencepiece.SentencePieceProcessor.encode, one call per piece", times["reference"]),
    ]
    project_s = min(times["project"])
    return [{"method": name, "how": how, "seconds": round(min(runs), 3), "all_seconds": [round(t, 3) for t in runs],
             "dialogues_per_s": round(dialogues / min(runs), 1), "tokens_per_s": round(tokens / min(runs)),
             "speedup_of_project": round(min(runs) / project_s, 2)}
            for name, how, runs in methods]


def run(args, workdir, argv=None):
    """Build the workload, time the three methods, check their outputs; return the report (a dict)."""
    tokenizer_dir, tokenizer_name = tokenizer_under_test(args, workdir)
    dialogues = synthetic_dialogues(args.dialogues, args.seed)
    data_file = os.path.join(workdir, "dialogues.jsonl")
    write_jsonl(dialogues, data_file)
    turns = sum(len(d) for d in dialogues)
    print(f"{len(dialogues)} synthetic dialogues ({turns} turns) -> {data_file}", flush=True)

    # warm-up (untimed): the first tokenizer load of a process pays transformers' lazy imports, which
    # neither method's conversion work includes; load each tokenizer class once first
    convert_data.load_tokenizer(tokenizer_dir, False)
    load_slow_tokenizer(tokenizer_dir)

    convert_args = convert_data.parse_args(["--tokenizer", tokenizer_dir, "--max_length", str(args.max_length),
                                            "--data_file", data_file, "--out_data_path", workdir,
                                            "--seed", str(args.seed), "--threads", str(args.threads),
                                            "--max_dialogues_per_sample", str(args.max_dialogues_per_sample)])
    threads = dataset.resolve_threads(args.threads)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None  # 1, 5, 15 minutes
    times, counts, checks, unstable = timed_rounds(args, convert_args, tokenizer_dir)
    identical = not checks["differing"] and not any(checks["fields"].values()) and not unstable

    tokens = checks["tokens"] + counts["samples"]  # every segment's ids + one eos per sample
    speedup = min(times["seed"]) / min(times["project"])   # each method's best round
    return {
        "benchmark": "bench/bench_convert.py",
        "date_utc": bench_common.utc_now() + " UTC",
        "machine": {"cpu": bench_common.cpu_model(), "cpus": os.cpu_count(), "usable_cores": dataset.usable_cores(),
                    "load_average": load_at_start,
                    "platform": platform.platform(),
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")},
        "versions": versions(),
        "command": bench_common.command_line("bench/bench_convert.py", argv),
        "tokenizer": tokenizer_name,
        "tokenizer_vocab_size": counts["tokenizer_vocab_size"],
        "dialogues": len(dialogues),
        "turns": turns,
        "samples": counts["samples"],
        "segments": checks["segments"],
        "tokens": tokens,
        "rows": counts["rows"],
        "truncated_samples": counts["truncated_samples"],
        # segments with a token before max_length: all the project tokenizes of them (plus what a round's
        # estimate overshoots); the seed's method and the reference tokenize every segment
        "segments_within_max_length": checks["within_max_length"],
        "max_length": args.max_length,
        "max_dialogues_per_sample": args.max_dialogues_per_sample,
        "seed": args.seed,
        "threads": threads,            # this project's tokenizer threads; the seed's method and the reference: one
        "repeats": args.repeats,       # rounds; "seconds" is each method's best of them
        "results": results_table(times, threads, len(dialogues), tokens),
        "speedup_vs_seed": round(speedup, 2),
        "speedup_vs_sentencepiece": round(min(times["reference"]) / min(times["project"]), 2),
        "target_speedup": TARGET_SPEEDUP,
        "target_met": speedup >= TARGET_SPEEDUP,
        "ids_identical": identical,
        "segments_differing": checks["differing"],
        "segments_differing_with_leading_space": checks["differing_with_leading_space"],
        "packed_fields_differing": checks["fields"],
        "rounds_differing_from_the_first": unstable,
    }


def print_report(report):
    print()
    print(f"{report['dialogues']} dialogues, {report['turns']} turns -> {report['samples']} samples, "
          f"{report['segments']} segments, {report['tokens']} tokens -> {report['rows']} rows of "
          f"{report['max_length']} ({report['truncated_samples']} samples truncated: "
          f"{report['segments_within_max_length']} segments hold a token within max_length, the others are cut "
          f"off); tokenizer: {report['tokenizer']} (vocabulary {report['tokenizer_vocab_size']})")
    machine = report["machine"]
    load = machine["load_average"]
    print(f"machine: {machine['usable_cores']} usable cores of {machine['cpus']} ({machine['cpu']})"
          + (f", load average {load[0]:.2f} at the start" if load else "")
          + f"; this project: tokenizer on {report['threads']} thread(s); the seed's method and the reference: "
            f"one thread; best of {report['repeats']} interleaved run(s) each")
    header = f"{'method':<14} {'seconds':>9} {'dialogues/s':>12} {'tokens/s':>11} {'project x':>10}  how"
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        print(f"{row['method']:<14} {row['seconds']:>9.2f} {row['dialogues_per_s']:>12,.0f} {row['tokens_per_s']:>11,} "
              f"{row['speedup_of_project']:>9.1f}x  {row['how']}")
    verdict = "met" if report["target_met"] else "NOT met"
    print(f"speed-up over the seed's method: {report['speedup_vs_seed']:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: "
          f"{verdict}); over bare sentencepiece calls: {report['speedup_vs_sentencepiece']:.1f}x")
    if report["ids_identical"]:
        print(f"ids identical: yes (all {report['segments']} segments and every packed row)")
    else:
        print(f"ids identical: NO: {report['segments_differing']} segments differ "
              f"({report['segments_differing_with_leading_space']} of them start with a space, where transformers 5's "
              f"fast LlamaTokenizer adds no dummy '▁'); packed fields differing: {report['packed_fields_differing']}; "
              f"rounds whose output differed from the first: {report['rounds_differing_from_the_first']}")


def main(argv=None):
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_convert_") as workdir:
            report = run(args, workdir, argv)
    except DataError as e:
        data_io.fail(str(e))
    print_report(report)
    if args.json:
        bench_common.write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0 if report["ids_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
