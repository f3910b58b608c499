"""Build a tiny random CuteGPT (LLaMA architecture) that stands in for the 13B weights.

    # the tiny model the tests and the demo use (a few seconds on a CPU)
    python code/build_tiny_model.py --data data/test/ift_data.pkl --out models/tiny

    # other sizes / seeds (defaults come from config.TINY_MODEL)
    python code/build_tiny_model.py --data my_dialogues.jsonl --out models/tiny \\
        --vocab_size 2000 --hidden_size 256 --num_layers 4 --seed 1

What it writes into --out (a standard Hugging Face model directory):

- tokenizer.model: a SentencePiece BPE model trained on the dialogues (every instruction, input and
  output, plus config.META_PROMPT and the template words), built like LLaMA's: identity
  normalization, a dummy-prefix '▁', split digits, byte fallback (any text encodes, emoji
  included: a character without a piece becomes its UTF-8 bytes <0x00>..<0xFF>, ids 3..258 as in
  LLaMA), <unk>=0, <s>=1, </s>=2, no pad piece.  config.END_MARKER is never one piece (as in LLaMA,
  where it is split; the full fine-tuning adds it as a special token).
- tokenizer.json + tokenizer_config.json (class LlamaTokenizer, add_bos_token, no eos): loads with
  AutoTokenizer, LlamaTokenizer and LlamaTokenizerFast.
- config.json, generation_config.json, model.safetensors: a randomly initialised LlamaForCausalLM
  (fp32, untied embeddings), the same bytes for the same --seed.
- chat_template.jinja and the generation config's stop settings (code/model_files.py), as in every
  directory the project writes.

The directory is written under a temporary name and renamed into place: a failure leaves no
partial --out behind.  Only the most frequent characters get a piece of their own (at most two
thirds of the learned vocabulary, so that merges remain); rarer ones fall back to bytes, as rare
CJK characters do in LLaMA.

Tokenizer agreement: the fast tokenizer's ids equal SentencePiece's for every text except one that
starts with a space: transformers 5 rebuilds LlamaTokenizer with a Metaspace pre-tokenizer that
adds no '▁' in front of a leading space (SentencePiece always adds one).  tokenizer.json carries the
exact SentencePiece pipeline (as LLaMA's own tokenizer.json does), so
PreTrainedTokenizerFast.from_pretrained(DIR) agrees on every text.  --no_dummy_prefix builds a
tokenizer without the dummy prefix, on which all classes agree with SentencePiece everywhere.
"""
import argparse
import collections
import io
import json
import os
import time

import sentencepiece as spm
import torch
import transformers
from tokenizers import normalizers
from transformers import AutoTokenizer, LlamaConfig, LlamaTokenizer
from transformers.utils import logging as hf_logging

import config
import data_io
import model_files
import model_loader
from data_io import DataError

# LLaMA's fixed ids: <unk>, <s>, </s>, then the 256 byte-fallback pieces <0x00>..<0xFF>
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
RESERVED_PIECES = 3 + 256
MIN_VOCAB_SIZE = RESERVED_PIECES + 41
# the share of the learned pieces (vocab_size - 259) that single characters may take
CHAR_SHARE = 2 / 3
# strings that must never be learned as (parts of) pieces: the end marker and the special tokens
NEVER_PIECES = (config.END_MARKER, UNK, BOS, EOS)
TEXT_KEYS = ("instruction", "input", "output")


def parse_args(argv=None):
    t = config.TINY_MODEL
    parser = argparse.ArgumentParser(
        description="Train a SentencePiece tokenizer on dialogues and save it with a random tiny LlamaForCausalLM "
                    "as a Hugging Face model directory.")
    parser.add_argument("--data", required=True,
                        help="dialogues to train the tokenizer on (.pkl, .json or .jsonl: a list of dialogues, "
                             "each a list of {'instruction','input','output'} turns), e.g. data/test/ift_data.pkl")
    parser.add_argument("--out", required=True,
                        help="model directory to write (replaced as a whole if it already holds a model)")
    parser.add_argument("--vocab_size", type=int, default=t["vocab_size"],
                        help=f"SentencePiece pieces, the 3 special and 256 byte pieces included "
                             f"(at least {MIN_VOCAB_SIZE}; a small corpus may give fewer; default: %(default)s)")
    parser.add_argument("--hidden_size", type=int, default=t["hidden_size"],
                        help=f"model width, a multiple of 2 x {t['num_heads']} heads (default: %(default)s)")
    parser.add_argument("--num_layers", type=int, default=t["num_layers"],
                        help="number of transformer layers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=t["seed"],
                        help="torch seed for the random weights; the same seed gives the same weights "
                             "(default: %(default)s)")
    parser.add_argument("--no_dummy_prefix", action="store_true",
                        help="do not prepend '▁' to every text (LLaMA does; default: prepend).  Without it, "
                             "transformers 5's LlamaTokenizer agrees with SentencePiece even on text that "
                             "starts with a space")
    return parser.parse_args(argv)


def check_args(args):
    heads = config.TINY_MODEL["num_heads"]
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab_size {args.vocab_size} is too small: {RESERVED_PIECES} ids are taken by "
                        f"<unk>, <s>, </s> and the 256 byte pieces; use at least {MIN_VOCAB_SIZE}")
    if args.hidden_size < 1 or args.hidden_size % (2 * heads):
        raise DataError(f"--hidden_size {args.hidden_size} must be a positive multiple of {2 * heads} "
                        f"({heads} attention heads, each of an even size for the rotary embedding)")
    if args.num_layers < 1:
        raise DataError(f"--num_layers {args.num_layers} must be at least 1")
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DataError(f"{args.out}: exists and is not a directory; pick another --out")
        entries = os.listdir(out)
        if entries and not any(name in entries for name in ("config.json", "tokenizer.model")):
            raise DataError(f"{args.out}: exists and does not hold a model (no config.json or tokenizer.model); "
                            f"refusing to replace it, pick another --out")


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def template_fragments():
    """The fixed words of the turn and input templates (问：, 答：, Instruction:, Question:, ...), one per line."""
    texts = []
    for parts in config.TURN_TEMPLATES.values():
        for template in parts.values():
            if template is not None:
                texts.append(template.format(instruction="", input=""))
    texts += [template.format("") for template in config.INPUT_TEMPLATES]
    fragments = []
    for text in texts:
        fragments += [line for line in text.split("\n") if line and line not in fragments]
    return fragments


def training_lines(dialogues, vocab_size):
    """Lines for SentencePiece and the characters kept in them.

    Texts are split at newlines (a newline then encodes as the byte <0x0A>, as in LLaMA), at the
    end marker and special-token strings (so they never become pieces), and at characters outside
    the kept set (the most frequent ones, as many as fit in CHAR_SHARE of the learned pieces).
    """
    texts = [turn[key] for dialogue in dialogues for turn in dialogue for key in TEXT_KEYS if turn[key]]
    turns = sum(len(dialogue) for dialogue in dialogues)
    # the prompt's fixed words occur about once per turn (META_PROMPT once per dialogue)
    texts += [config.META_PROMPT] * len(dialogues)
    texts += template_fragments() * max(1, turns // len(config.TURN_TEMPLATES))

    raw_lines = []
    for text in texts:
        for never in NEVER_PIECES:
            text = text.replace(never, "\n")
        raw_lines += [line for line in text.split("\n") if line]
    counts = collections.Counter()
    for line in raw_lines:
        counts.update(line)
    budget = int((vocab_size - RESERVED_PIECES) * CHAR_SHARE)
    kept = {char for char, _ in counts.most_common(budget)}
    lines = []
    for line in raw_lines:
        start = 0
        for index, char in enumerate(line):
            if char not in kept:
                if index > start:
                    lines.append(line[start:index])
                start = index + 1
        if len(line) > start:
            lines.append(line[start:])
    coverage = sum(counts[c] for c in kept) / max(1, sum(counts.values()))
    return lines, len(kept), len(counts), coverage


def train_sentencepiece(lines, model_file, vocab_size, dummy_prefix, data_path):
    if not lines:
        raise DataError(f"{data_path}: no text to train a tokenizer on")
    longest = max(len(line.encode("utf-8")) for line in lines)
    model = io.BytesIO()  # written to memory: no path (the temporary directory's) is recorded in the model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,          # a small corpus gives fewer pieces instead of an error
            character_coverage=1.0,          # rare characters were already cut out (training_lines)
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=dummy_prefix,
            allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            max_sentence_length=max(4192, longest + 16),
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,                   # deterministic: same data, same pieces
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"{data_path}: SentencePiece could not train a {vocab_size}-piece vocabulary ({message}); "
                        f"try another --vocab_size or more data")
    with open(model_file, "wb") as f:
        f.write(model.getvalue())


def save_tokenizer(directory, dummy_prefix):
    """Turn DIR/tokenizer.model into tokenizer.json + tokenizer_config.json; return the tokenizer."""
    # transformers 5 converts the SentencePiece model (vocab + merges in piece order, byte fallback)
    tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True, add_eos_token=False, legacy=True,
                                               add_prefix_space=dummy_prefix)
    backend = tokenizer.backend_tokenizer
    # tokenizer.json holds SentencePiece's exact pipeline, as LLaMA's own tokenizer.json does: prepend '▁'
    # to every text (add_dummy_prefix), then spaces -> '▁'.  LlamaTokenizer rebuilds its own
    # pipeline on loading; PreTrainedTokenizerFast / TokenizersBackend use this one as it is.
    steps = [normalizers.Prepend("▁")] if dummy_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.model.unk_token = UNK
    tokenizer.save_pretrained(directory)
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": dummy_prefix,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, piece in enumerate((UNK, BOS, EOS))
        },
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, ensure_ascii=False, indent=2)
        f.write("\n")
    for extra in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(directory, extra)):
            os.remove(os.path.join(directory, extra))


def check_tokenizer(directory, texts):
    """Reload as the project will and check the LLaMA conventions; return (tokenizer, agreeing, mismatch_count)."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    specials = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    problems = []
    if specials != (0, 1, 2):
        problems.append(f"special ids {specials} instead of (0, 1, 2)")
    if tokenizer.pad_token_id is not None:
        problems.append(f"unexpected pad token {tokenizer.pad_token!r}")
    if len(tokenizer) != sp.get_piece_size():
        problems.append(f"{len(tokenizer)} tokens but {sp.get_piece_size()} SentencePiece pieces")
    if len(tokenizer(config.END_MARKER, add_special_tokens=False)["input_ids"]) < 2:
        problems.append(f"{config.END_MARKER!r} became a single token")
    if problems:  # a bug of this script or of the installed libraries, not of the user's data
        raise RuntimeError("tokenizer check failed: " + "; ".join(problems))
    fast = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    mismatches = [text for text, ids in zip(texts, fast) if ids != sp.encode(text)]
    return tokenizer, len(texts) - len(mismatches), mismatches


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def quiet_cpu_tool():
    """For the CPU-only tools (this script, extend_vocab.py): transformers probes deepspeed while it builds
    a model, and deepspeed warns that it found no GPU unless its accelerator is named (DS_ACCELERATOR, its
    own switch; these tools never train); a tiny model's save needs no progress bar."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()


def save_model(directory, vocab_size, hidden_size, num_layers, seed):
    quiet_cpu_tool()
    t = config.TINY_MODEL
    model_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=t["num_heads"],
        num_key_value_heads=t["num_heads"],
        max_position_embeddings=t["max_position_embeddings"],
        rms_norm_eps=1e-6,
        initializer_range=t["initializer_range"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    with model_loader.quiet_torchao_import():   # the first model class built imports torchao (noise here)
        model = transformers.LlamaForCausalLM(model_config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def make_readable(directory):
    """Give the directory and its files the usual permissions (the temporary directory is created 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


# ----------------------------------------------------------------------------------------------
def build(args):
    """Write the tokenizer and the model into args.out; print a one-line summary (and a note where the
    vocabulary came out smaller than asked, or the fast tokenizer disagrees with SentencePiece)."""
    started = time.time()
    check_args(args)
    dialogues = data_io.load_dialogues(args.data)
    dummy_prefix = not args.no_dummy_prefix
    texts = [turn[key] for dialogue in dialogues for turn in dialogue for key in TEXT_KEYS if turn[key]]

    with data_io.atomic_directory(args.out) as tmp:
        lines, kept, distinct, coverage = training_lines(dialogues, args.vocab_size)
        train_sentencepiece(lines, os.path.join(tmp, "tokenizer.model"), args.vocab_size, dummy_prefix, args.data)
        save_tokenizer(tmp, dummy_prefix)
        tokenizer, agreeing, mismatches = check_tokenizer(tmp, texts)
        parameters = save_model(tmp, len(tokenizer), args.hidden_size, args.num_layers, args.seed)
        model_files.write_model_files(tmp)   # chat template and generation config (what serving engines read)
        make_readable(tmp)
    print(f"wrote {args.out} in {time.time() - started:.1f}s: a SentencePiece BPE tokenizer of {len(tokenizer)} "
          f"pieces ({kept} of {distinct} characters have one, {coverage:.2%} of the text) and a LlamaForCausalLM of "
          f"{parameters:,} parameters (hidden {args.hidden_size}, {args.num_layers} layers, seed {args.seed}), "
          f"from {len(dialogues)} dialogues of {args.data}", flush=True)
    if len(tokenizer) < args.vocab_size:
        print(f"note: fewer pieces than --vocab_size {args.vocab_size}: the data holds no more merges")
    if mismatches:
        leading = sum(text[:1] == " " for text in mismatches)
        print(f"note: fast ids == SentencePiece ids on {agreeing}/{len(texts)} data texts ({leading} of the "
              f"{len(mismatches)} others start with a space: transformers 5's LlamaTokenizer adds no dummy '▁' "
              f"there; PreTrainedTokenizerFast matches)")


def main(argv=None):
    args = parse_args(argv)
    try:
        build(args)
    except DataError as e:
        data_io.fail(str(e))
    except OSError as e:
        data_io.fail(f"{e.filename or args.out}: {e.strerror or e}")


if __name__ == "__main__":
    main()
