"""Extend a LLaMA tokenizer with Chinese pieces: step 0 of the CuteGPT recipe.

    # train a 20,000-piece SentencePiece model on a Chinese corpus, append its new pieces to LLaMA's
    # tokenizer, and resize the model's embeddings (new rows: the mean of the rows of each new
    # piece's text under the old tokenizer)
    python code/extend_vocab.py --base_tokenizer huggyllama/llama-13b --corpus zh_wiki.txt zh_news.jsonl \
        --vocab_size 20000 --model_path huggyllama/llama-13b --out models/llama-13b-zh

    # the tokenizer only (no model), a held-out file of your own to measure the gain on
    python code/extend_vocab.py --base_tokenizer BASE_DIR --corpus corpus.txt --out tokenizer_zh \
        --heldout_file heldout.txt

Corpus files: .txt (every non-empty line is a training sentence) or .jsonl (one JSON object per line;
the text is in --text_field, split at newlines).  Unless --heldout_file is given, every N-th
non-empty line (config.EXTEND_VOCAB["heldout_every"]) is held out of training and used to measure
tokens per character before and after.

The merge: the base tokenizer.model keeps every piece at its id; each piece of the new model that
the base lacks (byte, control and unknown pieces aside) is appended in the new model's order, with
exact float32 scores, each the next float32 below the one before, starting below the lowest ordinary
base piece (LLaMA's '▁▁' at -1e9), so every base merge keeps its priority and no two new pieces tie.
The result is a Hugging Face tokenizer directory: tokenizer.model, tokenizer_config.json, and a
tokenizer.json built from tokenizer.model by sp_convert (SentencePiece's merge order and dummy prefix),
checked to give SentencePiece's ids and to decode back to the text, both through the project's loader
and through AutoTokenizer (tokenizer_config.json names the plain fast class, which reads tokenizer.json
as it is), on probe texts and the held-out lines; the report states both checks.
The base must not have tokens added on top of its SentencePiece model (e.g. '<end>' after full
fine-tuning): their ids would collide with the appended pieces; extend before adding them.

With --model_path the model is loaded (in the dtype it was saved in), its input and output
embeddings are resized to the new vocabulary and saved with the tokenizer in --out (safetensors).
--out is written under a temporary name and renamed into place; an existing non-empty --out is
refused unless --overwrite.  A short report (extend_vocab_report.json) is saved beside.
"""
import argparse
import io
import json
import os
import sys
import time

import numpy
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

import build_tiny_model
import config
import data_io
import model_files
import model_loader
import sp_convert
from data_io import DataError

# the strings that must never become one piece (the end marker and LLaMA's special tokens)
NEVER_IN_PIECES = (config.END_MARKER, "<unk>", "<s>", "</s>")


def parse_args(argv=None):
    e = config.EXTEND_VOCAB
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_tokenizer", required=True,
                        help="the LLaMA tokenizer to extend: a local directory or Hugging Face id holding tokenizer.model")
    parser.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                        help="Chinese text to learn pieces from: .txt (one sentence per line) or .jsonl (--text_field)")
    parser.add_argument("--out", required=True, help="directory to write (tokenizer, and the model with --model_path)")
    parser.add_argument("--vocab_size", type=int, default=e["vocab_size"],
                        help="pieces of the SentencePiece model trained on the corpus, before those the base "
                             "already has are dropped (default: %(default)s)")
    parser.add_argument("--model_path", default=None,
                        help="also resize this model's embeddings to the new vocabulary and save it in --out")
    parser.add_argument("--heldout_file", default=None,
                        help="text (.txt or .jsonl) to measure tokens per character on (default: every "
                             f"{e['heldout_every']}th corpus line, held out of training)")
    parser.add_argument("--text_field", default=e["text_field"], help="JSONL field holding the text (default: %(default)s)")
    parser.add_argument("--character_coverage", type=float, default=e["character_coverage"],
                        help="share of the corpus characters the new model covers (default: %(default)s)")
    parser.add_argument("--num_threads", type=int, default=max(1, os.cpu_count() or 1),
                        help="SentencePiece training threads (default: all cores, %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = parser.parse_args(argv)
    if args.vocab_size < 100:
        parser.error("--vocab_size must be at least 100")
    if not 0.9 <= args.character_coverage <= 1.0:
        parser.error("--character_coverage must be between 0.9 and 1.0")
    if args.num_threads < 1:
        parser.error("--num_threads must be 1 or more")
    return args


def check_out(out, overwrite):
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DataError(f"--out {out}: exists and is not a directory; pick another --out")
        if os.listdir(out) and not overwrite:
            raise DataError(f"--out {out}: exists and is not empty; pick another --out or add --overwrite")


# ----------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------
def read_lines(path, text_field):
    """Yield the non-empty lines of a .txt file, or of the text fields of a .jsonl file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (give .txt or .jsonl corpus files)")
    if not path.endswith((".txt", ".jsonl")):
        raise DataError(f"{path}: unknown file type; use .txt (plain text) or .jsonl (one object per line)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if path.endswith(".jsonl"):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {line_no} is not valid JSON ({e.msg}); fix or remove that line")
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise DataError(f"{path}: line {line_no} has no string field '{text_field}'; "
                                        f"name the field with --text_field")
                    for part in text.split("\n"):
                        if part.strip():
                            yield part
                else:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text")


class Corpus:
    """The corpus lines, streamed; every N-th one is kept aside as held-out text (when asked)."""

    def __init__(self, paths, text_field, hold_out):
        self.paths, self.text_field, self.hold_out = paths, text_field, hold_out
        self.heldout = []
        self.lines = 0

    def training_lines(self):
        every, most = config.EXTEND_VOCAB["heldout_every"], config.EXTEND_VOCAB["heldout_max_lines"]
        index = 0
        for path in self.paths:
            for line in read_lines(path, self.text_field):
                index += 1
                if self.hold_out and index % every == 0 and len(self.heldout) < most:
                    self.heldout.append(line)
                    continue
                self.lines += 1
                yield line


# ----------------------------------------------------------------------------------------------
# SentencePiece: train on the corpus, merge into the base
# ----------------------------------------------------------------------------------------------
def load_base_proto(directory):
    path = os.path.join(directory, "tokenizer.model")
    if not os.path.isfile(path):
        raise DataError(f"--base_tokenizer {directory}: holds no tokenizer.model (a LLaMA SentencePiece "
                        f"tokenizer is needed)")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise DataError(f"--base_tokenizer {directory}: tokenizer.model is not a BPE model (LLaMA's is)")
    return proto


def train_new_model(lines, base_proto, args):
    """A SentencePiece BPE model trained on ``lines`` with the base's text conventions; its proto."""
    base_norm, base_trainer = base_proto.normalizer_spec, base_proto.trainer_spec
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=args.vocab_size,
            hard_vocab_limit=False,            # a small corpus gives fewer pieces instead of an error
            character_coverage=args.character_coverage,
            split_digits=base_trainer.split_digits,
            normalization_rule_name="identity",
            remove_extra_whitespaces=base_norm.remove_extra_whitespaces,
            add_dummy_prefix=base_norm.add_dummy_prefix,
            byte_fallback=False,               # the base has the byte pieces already
            input_sentence_size=config.EXTEND_VOCAB["input_sentence_size"],
            shuffle_input_sentence=True,
            max_sentence_length=16384,
            num_threads=args.num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"--corpus: SentencePiece could not train a {args.vocab_size}-piece model ({message}); "
                        f"try a smaller --vocab_size or more text")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto


def scores_below(score, count):
    """``count`` float32 scores, each the next float32 below the one before, the first below ``score``:
    exact in tokenizer.model (a float32 field) and strictly decreasing even at LLaMA's -1e9, where
    float32 steps are 64 apart (``score - k`` would give many pieces one score)."""
    scores, current = [], numpy.float32(score)
    for _ in range(count):
        current = numpy.nextafter(current, numpy.float32(-numpy.inf))
        scores.append(float(current))
    return scores


def lowest_normal_score(proto):
    normal = proto.SentencePiece.NORMAL
    return min((p.score for p in proto.pieces if p.type == normal), default=0.0)


def merge_pieces(base_proto, new_proto):
    """Append the normal pieces of ``new_proto`` that ``base_proto`` lacks; return them (in order)."""
    normal = new_proto.SentencePiece.NORMAL
    have = {p.piece for p in base_proto.pieces}
    added = []
    for p in new_proto.pieces:
        if p.type != normal or p.piece in have or any(s in p.piece for s in NEVER_IN_PIECES):
            continue
        have.add(p.piece)
        added.append(p.piece)
    # below every ordinary base piece, in the new model's order: base merges keep their priority
    for piece_text, score in zip(added, scores_below(lowest_normal_score(base_proto), len(added))):
        piece = base_proto.pieces.add()
        piece.piece = piece_text
        piece.type = normal
        piece.score = score
    return added


def check_new_scores(proto, old_size):
    """{'lowest_base_score', 'first_new_score', 'last_new_score', 'strictly_decreasing'} of the pieces after
    ``old_size``, read back from the model; DataError unless each is below the one before and the first
    below every ordinary base piece."""
    base = sentencepiece_model_pb2.ModelProto()
    base.pieces.extend(proto.pieces[:old_size])
    lowest = lowest_normal_score(base)
    scores = [lowest] + [p.score for p in proto.pieces[old_size:]]
    ok = all(a > b for a, b in zip(scores, scores[1:]))
    if not ok:
        raise DataError("the new pieces' scores are not strictly decreasing below the base's lowest "
                        "(a bug: report it)")
    return {"lowest_base_score": lowest, "first_new_score": scores[1] if len(scores) > 1 else None,
            "last_new_score": scores[-1] if len(scores) > 1 else None, "strictly_decreasing": ok}


def write_tokenizer_json(directory, check_texts):
    """Write DIR/tokenizer.json (and tokenizer_config.json) built from DIR/tokenizer.model by sp_convert, and
    check that they agree with tokenizer.model under SentencePiece, loaded both ways: by the project's loader
    and through AutoTokenizer, as other programs read them.  Returns the agreement for the report."""
    tokenizer = model_loader.load_tokenizer(directory, "--out")   # refuses a disagreeing conversion
    tokenizer.save_pretrained(directory)
    model_file = os.path.join(directory, "tokenizer.model")
    plain = AutoTokenizer.from_pretrained(directory)
    agreement = {"loader": sp_convert.agreement_report(tokenizer, model_file, check_texts),
                 "auto_tokenizer": sp_convert.agreement_report(plain, model_file, check_texts)}
    for name, result in agreement.items():
        if result["first_difference"]:
            raise DataError(f"--out {directory}: the written tokenizer ({name}) differs from its tokenizer.model: "
                            f"{result['first_difference']} (a bug: report it)")
    return agreement


def copy_proto(proto):
    copy = sentencepiece_model_pb2.ModelProto()
    copy.CopyFrom(proto)
    return copy


def processor(proto, dummy_prefix=None):
    """A SentencePiece processor for ``proto`` (with its dummy prefix switched as asked)."""
    if dummy_prefix is not None and proto.normalizer_spec.add_dummy_prefix != dummy_prefix:
        proto = copy_proto(proto)
        proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def tokens_per_char(sp, lines):
    chars = sum(len(line) for line in lines)
    tokens = sum(len(ids) for ids in sp.encode(lines)) if lines else 0
    return tokens / chars if chars else float("nan")


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def piece_text(piece):
    return piece.replace("\u2581", " ")


def resize_model(model_dir, old_proto, added, old_size):
    """Load the model, append one embedding row per new piece (input and output), each the mean of the
    rows of the piece's text under the old tokenizer; return the model."""
    build_tiny_model.quiet_cpu_tool()
    try:
        with model_loader.quiet_torchao_import():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    except Exception as e:
        raise DataError(f"--model_path {model_dir}: the model cannot be loaded ({type(e).__name__}: {e})")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != old_size:
        raise DataError(f"--model_path {model_dir}: {rows} embedding rows, but the base tokenizer has {old_size} "
                        f"pieces; give the model the base tokenizer belongs to")
    # the old tokenizer without its dummy prefix: a piece's text is encoded exactly as it reads
    old_sp = processor(old_proto, dummy_prefix=False)
    sources = [old_sp.encode(piece_text(piece)) for piece in added]
    model.resize_token_embeddings(old_size + len(added), mean_resizing=False)
    tables = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for table in {id(t): t for t in tables if t is not None}.values():
            weight = table.weight
            for offset, ids in enumerate(sources):
                weight[old_size + offset] = weight[ids].float().mean(dim=0).to(weight.dtype)
    return model


# ----------------------------------------------------------------------------------------------
def extend(args):
    started = time.time()
    check_out(args.out, args.overwrite)
    base_dir = model_loader.resolve_path(args.base_tokenizer, "--base_tokenizer")
    base_tokenizer = model_loader.load_tokenizer(base_dir, "--base_tokenizer")
    base_proto = load_base_proto(base_dir)
    old_size = len(base_proto.pieces)
    if len(base_tokenizer) != old_size:
        raise DataError(f"--base_tokenizer {args.base_tokenizer}: {len(base_tokenizer)} tokens but {old_size} "
                        f"SentencePiece pieces: tokens were added on top (e.g. {config.END_MARKER!r}); their ids "
                        f"would collide with the appended pieces.  Extend the tokenizer before adding them")
    model_dir = model_loader.resolve_path(args.model_path, "--model_path") if args.model_path else None
    heldout = list(read_lines(args.heldout_file, args.text_field)) if args.heldout_file else None

    corpus = Corpus(args.corpus, args.text_field, hold_out=heldout is None)
    print(f"training a {args.vocab_size}-piece SentencePiece model on {', '.join(args.corpus)}", flush=True)
    new_proto = train_new_model(corpus.training_lines(), base_proto, args)
    if heldout is None:
        heldout = corpus.heldout
    old_proto = copy_proto(base_proto)
    before = tokens_per_char(processor(old_proto), heldout)
    merged = base_proto
    added = merge_pieces(merged, new_proto)
    new_sp = processor(merged)
    after = tokens_per_char(new_sp, heldout)

    with data_io.atomic_directory(args.out) as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(merged.SerializeToString())
        build_tiny_model.save_tokenizer(tmp, merged.normalizer_spec.add_dummy_prefix)
        agreement = write_tokenizer_json(tmp, heldout)
        tokenizer = model_loader.load_tokenizer(tmp, "--out")
        vocab = tokenizer.get_vocab()
        if len(tokenizer) != len(merged.pieces) or any(vocab.get(new_sp.id_to_piece(i)) != i
                                                           for i in range(new_sp.get_piece_size())):
            raise RuntimeError("the saved tokenizer's ids differ from its SentencePiece model's")
        scores = check_new_scores(merged, old_size)
        if model_dir:
            model = resize_model(model_dir, old_proto, added, old_size)
            model.save_pretrained(tmp, safe_serialization=True)
        model_files.write_model_files(tmp)   # chat template and generation config beside tokenizer.model
        report = {
            "base_tokenizer": args.base_tokenizer,
            "corpus": [os.path.basename(p) for p in args.corpus],
            "corpus_lines": corpus.lines,
            "trained_pieces": len(new_proto.pieces),
            "base_vocab_size": old_size,
            "added_pieces": len(added),
            "vocab_size": len(tokenizer),
            "heldout": os.path.basename(args.heldout_file) if args.heldout_file else
            f"every {config.EXTEND_VOCAB['heldout_every']}th corpus line",
            "heldout_lines": len(heldout),
            "heldout_chars": sum(len(line) for line in heldout),
            "tokens_per_char_before": before,
            "tokens_per_char_after": after,
            "model_resized": bool(model_dir),
            "new_piece_scores": scores,
            "agreement_with_tokenizer_model": agreement,
        }
        with open(os.path.join(tmp, "extend_vocab_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
            f.write("\n")
        build_tiny_model.make_readable(tmp)
    return report, time.time() - started


def main(argv=None):
    args = parse_args(argv)
    try:
        report, seconds = extend(args)
    except DataError as e:
        data_io.fail(str(e))
    except OSError as e:
        data_io.fail(f"{e.filename or args.out}: {e.strerror or e}")
    r = report
    if r["heldout_chars"]:
        gain = (f"tokens per character on the held-out text ({r['heldout_lines']} lines, {r['heldout_chars']} "
                f"characters): {r['tokens_per_char_before']:.3f} before, {r['tokens_per_char_after']:.3f} after "
                f"({r['tokens_per_char_after'] / r['tokens_per_char_before']:.1%} of the tokens)")
    else:
        gain = "no held-out text: tokens per character not measured (give --heldout_file or more corpus lines)"
    resized = "; embeddings resized" if r["model_resized"] else ""
    a, sc = r["agreement_with_tokenizer_model"], r["new_piece_scores"]
    checked = (f"checked: the project's loader and AutoTokenizer give tokenizer.model's ids and decode back on "
               f"{a['loader']['agreeing']}/{a['loader']['probe_texts']} and {a['auto_tokenizer']['agreeing']}/"
               f"{a['auto_tokenizer']['probe_texts']} probe texts (held-out lines included, each with and without "
               f"a leading space); new pieces' scores strictly decreasing from {sc['first_new_score']!r} to "
               f"{sc['last_new_score']!r}, below the lowest base score {sc['lowest_base_score']!r}")
    print(f"wrote {args.out} in {seconds:.1f}s: vocabulary {r['base_vocab_size']} + {r['added_pieces']} new pieces = "
          f"{r['vocab_size']} (of {r['trained_pieces']} trained on {r['corpus_lines']} lines){resized}; {gain}")
    print(checked)


if __name__ == "__main__":
    sys.exit(main())
