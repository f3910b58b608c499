"""Convert dialogues into packed training ids: step 1 of fine-tuning.

    # the seed's command: reads data/test/ift_data.pkl, writes data/test/llama_ift_data_ids.pkl
    python code/convert_data.py --tokenizer Abbey4799/kw-cutegpt-13b-ift-lora --max_length 2048 --out_data_path data/test/

    # any dialogue file (.pkl, .json, .jsonl; Alpaca-style single-turn records too), a local tokenizer,
    # the chat template for every turn, one dialogue per sample
    python code/convert_data.py --tokenizer path/to/model --data_file my.jsonl --out_data_path out/ \
        --template zh --max_dialogues_per_sample 1

    # the tokenizer on one thread (default: one per usable core); any --threads gives the same bytes
    python code/convert_data.py --tokenizer path/to/model --out_data_path data/test/ --threads 1

    # for full fine-tuning (finetune.py without --use_lora adds '<end>' as one special token)
    python code/convert_data.py --tokenizer path/to/model --out_data_path data/test/ --special_end_token

    # continued pre-training: plain text (.txt, documents separated by a blank line; or .jsonl with a
    # "text" field), every token learned; writes OUT_DATA_PATH/llama_pretrain_data_ids.pkl
    python code/convert_data.py --mode pretrain --tokenizer path/to/model --data_file zh_corpus.jsonl \
        --max_length 2048 --out_data_path data/pretrain/

Dialogues are shuffled and 1..--max_dialogues_per_sample of them joined into one multi-round
sample (the seed's habit); each turn is rendered by prompt.py with a template drawn per turn
(--template random) or pinned.  Labels are -100 on the meta prompt and every question; answers,
the end marker and the closing eos are learned.  Whole samples are packed into rows of
--max_length (longer ones are truncated and counted) and the start of every sample is recorded,
with the tokenizer's fingerprint, max_length, templates and counts.  Same seed, same bytes.

Speed: the segments are tokenized in chunks of config.TOKENIZE_BATCH by SentencePiece's batched C++
encode on --threads threads (default: one per usable core, config.CONVERT_THREADS) in a background
thread, while this thread renders the next chunk and assembles the one before (dataset.tokenized_chunks).
A sample is tokenized only up to the first segment that takes it to --max_length tokens
(segment_prefixes.SegmentPrefixes): what follows would be truncated away, so it is never encoded.
The output does not depend on the number of threads.

--mode pretrain packs plain text instead, in the same ids format (meta "mode": "pretrain"): each
document's ids and eos, every token learned (the first of a document has nothing before it to be
predicted from), a document longer than --max_length cut into chunks (dataset.chunk_document), never
dropped.  finetune.py trains on it as it is, LoRA or full (no --special_end_token needed).
"""
import argparse
import os
import random
import sys

from tqdm import tqdm

import config
import data_io
import dataset
import model_loader
import packing
import prompt
from data_io import DataError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=config.LORA_MODEL,
                        help="tokenizer: a local model directory or a Hugging Face id (default: %(default)s)")
    parser.add_argument("--max_length", type=int, default=config.MAX_LENGTH,
                        help="tokens per training row (default: %(default)s)")
    parser.add_argument("--out_data_path", default="data/test/",
                        help="folder that receives llama_ift_data_ids.pkl (and holds ift_data.pkl "
                             "unless --data_file is given) (default: %(default)s)")
    parser.add_argument("--data_file", default=None,
                        help="dialogues to convert: .pkl, .json or .jsonl (default: OUT_DATA_PATH/ift_data.pkl)")
    parser.add_argument("--seed", type=int, default=config.CONVERT_SEED,
                        help="seed of the shuffle, the joining and the template choice (default: %(default)s)")
    parser.add_argument("--max_dialogues_per_sample", type=int, default=config.MAX_DIALOGUES_PER_SAMPLE,
                        help="join 1..N shuffled dialogues into one multi-round sample; 1 turns joining off "
                             "(default: %(default)s)")
    parser.add_argument("--template", default="random",
                        help="'random' (a template drawn per turn, the seed's way) or one template for every "
                             f"turn: {', '.join(prompt.template_names())} (default: %(default)s)")
    parser.add_argument("--mode", choices=["ift", "pretrain"], default="ift",
                        help="ift: dialogues, answers learned (default); pretrain: plain text (.txt or .jsonl), "
                             "every token learned")
    parser.add_argument("--text_field", default=config.PRETRAIN["text_field"],
                        help="--mode pretrain with a .jsonl file: the field holding the text (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=config.CONVERT_THREADS,
                        help="threads of the tokenizer (SentencePiece's batched encode): 0 = one per usable "
                             f"core, at most {config.CONVERT_THREADS_MAX}; the output is the same for any "
                             "number (default: %(default)s)")
    # --workers (worker processes) was an earlier release's flag: named, so its users learn what replaced it
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--special_end_token", action="store_true",
                        help=f"add {config.END_MARKER!r} to the tokenizer as one special token first "
                             "(what full fine-tuning trains with)")
    args = parser.parse_args(argv)
    if args.max_length < 16:
        parser.error("--max_length must be at least 16")
    if args.workers is not None:
        parser.error("--workers is gone: the conversion runs in one process now, with the tokenizer on "
                     "--threads N threads (0 = one per usable core); use --threads instead")
    if args.threads < 0:
        parser.error("--threads must be 0 (one per usable core) or more")
    if args.max_dialogues_per_sample < 1:
        parser.error("--max_dialogues_per_sample must be 1 or more")
    if args.template != "random" and args.template not in prompt.template_names():
        parser.error(f"--template {args.template!r} is unknown; use 'random' or one of {prompt.template_names()}")
    if args.mode == "pretrain":
        if args.data_file is None:
            parser.error("--mode pretrain needs --data_file FILE (.txt, documents separated by a blank line, "
                         "or .jsonl with a text field)")
        if args.special_end_token:
            parser.error("--special_end_token is for dialogue data; pre-training text has no end marker: drop it")
    if args.data_file is None:
        args.data_file = os.path.join(args.out_data_path, "ift_data.pkl")
    return args


OUT_FILES = {"ift": "llama_ift_data_ids.pkl", "pretrain": "llama_pretrain_data_ids.pkl"}


def load_tokenizer(path, special_end_token):
    tokenizer = model_loader.load_tokenizer(path, "--tokenizer")  # raises LoaderError (a DataError) naming the flag
    if special_end_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [config.END_MARKER]})
    return tokenizer


def packing_counts(samples, packed, max_length, learned_tokens=None):
    """Rows and token counts of packed (input_ids, labels) samples, for the ids file's meta
    (``learned_tokens``: the samples' learned tokens where already counted; then ``samples`` is not read)."""
    rows = len(packed["input_ids"])
    if learned_tokens is None:
        learned_tokens = sum(len(labels) - labels.count(packing.IGNORE_INDEX) for _, labels in samples)
    real_per_row = [mask.count(1) for mask in packed["attention_mask"]]
    real = sum(real_per_row)
    # training cuts each micro-batch to its longest row (packing.collate_rows); one row at a time that
    # is each row's own length, and the rows are spread evenly, so pairs of them differ by a few tokens
    fed = sum(packing.fed_length(count, max_length) for count in real_per_row)
    return {"rows": rows, "real_tokens": real, "learned_tokens": learned_tokens,
            "pad_tokens": rows * max_length - real, "fed_positions": fed, "real_token_share": real / fed,
            "real_token_share_of_full_rows": real / (rows * max_length)}


def share_text(counts):
    return (f"{100 * counts['real_token_share']:.2f}% of the positions training computes are real "
            f"(rows cut to their last real token; {100 * counts['real_token_share_of_full_rows']:.2f}% of "
            f"full rows)")


def convert(args, show_progress=True):
    """Return the ids-file dict for ``args``."""
    with dataset.paused_gc():
        return _convert(args, show_progress)


def _convert(args, show_progress):
    dialogues = data_io.load_dialogues(args.data_file)
    tokenizer = load_tokenizer(args.tokenizer, args.special_end_token)

    rng = random.Random(args.seed)
    samples = dataset.group_dialogues(dialogues, args.max_dialogues_per_sample, rng)
    segments = sum(map(dataset.segment_count, samples))
    with tqdm(total=segments, desc="tokenizing", unit="seg", disable=not show_progress, file=sys.stderr) as bar:
        kept, truncated, dropped, learned = dataset.tokenize_and_truncate(
            tokenizer, samples, args.template, rng, args.max_length, threads=dataset.resolve_threads(args.threads),
            progress=bar)
    if not kept:
        raise DataError(f"{args.data_file}: no sample has an answer token within --max_length "
                        f"{args.max_length}; raise --max_length")
    # the kept samples' lists become the rows (no copy); nothing reads the samples afterwards
    packed = packing.pack_samples(kept, args.max_length, dataset.pad_token_id_of(tokenizer), reuse_lists=True)
    counts = {
        "dialogues": len(dialogues),
        "turns": sum(len(d) for d in dialogues),
        "samples": len(samples),
        "truncated_samples": truncated,
        "dropped_samples": dropped,
        **packing_counts(kept, packed, args.max_length, learned),
    }
    meta = {
        "mode": "ift",
        "tokenizer": dict(name=args.tokenizer, **dataset.tokenizer_fingerprint(tokenizer)),
        "max_length": args.max_length,
        "template": args.template,
        "seed": args.seed,
        "max_dialogues_per_sample": args.max_dialogues_per_sample,
        "special_end_token": bool(args.special_end_token),
        "data_file": os.path.basename(args.data_file),
        "meta_prompt": config.META_PROMPT,
        "end_marker": config.END_MARKER,
        "turn_separator": config.TURN_SEPARATOR,
        "turn_templates": config.TURN_TEMPLATES,
        "input_templates": config.INPUT_TEMPLATES,
        "pad_token_id": dataset.pad_token_id_of(tokenizer),
        "counts": counts,
    }
    return dict(format=dataset.IDS_FORMAT, meta=meta, **packed)


def convert_pretrain(args, show_progress=True):
    """Return the ids-file dict of plain text for continued pre-training (every token learned)."""
    documents = data_io.load_documents(args.data_file, args.text_field)
    tokenizer = load_tokenizer(args.tokenizer, False)
    with tqdm(total=len(documents), desc="tokenizing", unit="doc", disable=not show_progress, file=sys.stderr) as bar:
        samples, cut = dataset.tokenize_documents(tokenizer, documents, args.max_length,
                                                  threads=dataset.resolve_threads(args.threads), progress=bar)
    if not samples:
        raise DataError(f"{args.data_file}: no document has two tokens or more to learn from")
    packed = packing.pack_samples(samples, args.max_length, dataset.pad_token_id_of(tokenizer))
    counts = {
        "documents": len(documents),
        "samples": len(samples),
        "cut_documents": cut,          # documents longer than max_length, cut into several samples
        **packing_counts(samples, packed, args.max_length),
    }
    meta = {
        "mode": "pretrain",
        "tokenizer": dict(name=args.tokenizer, **dataset.tokenizer_fingerprint(tokenizer)),
        "max_length": args.max_length,
        "special_end_token": False,
        "data_file": os.path.basename(args.data_file),
        "text_field": args.text_field,
        "pad_token_id": dataset.pad_token_id_of(tokenizer),
        "counts": counts,
    }
    return dict(format=dataset.IDS_FORMAT, meta=meta, **packed)


def main(argv=None):
    args = parse_args(argv)
    out_file = os.path.join(args.out_data_path, OUT_FILES[args.mode])
    try:
        data_io.check_writable_dir(args.out_data_path, "output folder (--out_data_path)")
        result = convert_pretrain(args) if args.mode == "pretrain" else convert(args)
        data_io.atomic_write_pickle(out_file, result)
    except DataError as e:
        data_io.fail(str(e))
    c = result["meta"]["counts"]
    if args.mode == "pretrain":
        print(f"{c['documents']} documents ({c['cut_documents']} cut into chunks of max_length) -> {c['samples']} "
              f"samples -> {c['rows']} rows of {args.max_length} tokens; {c['learned_tokens']} learned "
              f"tokens; {share_text(c)}")
        print(f"wrote {out_file}")
        return
    print(f"{c['dialogues']} dialogues ({c['turns']} turns) -> {c['samples']} samples -> {c['rows']} rows of "
          f"{args.max_length} tokens; {c['truncated_samples']} samples truncated to max_length, "
          f"{c['dropped_samples']} dropped (no answer left); {c['learned_tokens']} learned tokens; "
          f"{share_text(c)}")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
