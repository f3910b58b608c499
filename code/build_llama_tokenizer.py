"""Rebuild LLaMA's real 32,000-piece tokenizer.model from a public artefact (no model hub needed).

    python code/build_llama_tokenizer.py --out ~/.cache/cutegpt/llama_tokenizer

The llama-cpp-python source distribution (PyPI, config.LLAMA_TOKENIZER["sdist"]) vendors llama.cpp's
vocabulary test file models/ggml-vocab-llama-spm.gguf: LLaMA's pieces, scores and piece types, with
reference test vectors (.inp texts, .out ids).  This script downloads that sdist with pip, reads the
three arrays with the ``gguf`` package and writes them into a SentencePiece ModelProto with the
trainer and normalizer settings LLaMA's file carries (BPE, byte fallback, add_dummy_prefix, identity
normalizer keeping extra whitespace; unk 0, bos 1, eos 2, no pad).  The result is byte for byte
Meta's tokenizer.model: its md5 is checked (config.LLAMA_TOKENIZER["md5"]), and SentencePiece must
reproduce every reference vector.  --out then holds:

    tokenizer.model        LLaMA's tokenizer
    tokenizer_config.json  a LlamaTokenizer config, as the published LLaMA and CuteGPT weights ship
    vocab_tests.json       the reference vectors: [{"text": ..., "ids": [...]}]

Nothing is written unless every check passes; an existing complete --out is reused as it is.  The
tests build it once per run (tests/conftest.py, fixture llama_tokenizer_dir) and the convert
benchmark measures on it.  pip needs scikit-build-core installed (requirements-dev.txt): the sdist's
metadata is then read without building an isolated environment (seconds instead of a minute).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

import build_tiny_model
import config
import data_io
from data_io import DataError

FILES = ("tokenizer.model", "tokenizer_config.json", "vocab_tests.json")
VOCAB_TEST_SEPARATOR = "\n__ggml_vocab_test__\n"

# LLaMA's trainer settings, in the proto's field order (recorded in Meta's file; part of its bytes)
TRAINER_SPEC = dict(
    input=["/large_experiments/theorem/datasets/MERGED/all.test1.merged"],
    model_prefix="spm_model_32k_200M_charcov099995_allowWSO__v2", model_type="BPE", vocab_size=32000,
    self_test_sample_size=0, input_format="text", character_coverage=0.99995, input_sentence_size=200000000,
    seed_sentencepiece_size=1000000, shrinking_factor=0.75, num_threads=80, num_sub_iterations=2,
    max_sentence_length=4192, shuffle_input_sentence=True, max_sentencepiece_length=16,
    split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
    treat_whitespace_as_suffix=False, split_digits=True, allow_whitespace_only_pieces=True,
    vocabulary_output_piece_score=True, hard_vocab_limit=True, use_all_vocab=False, byte_fallback=True,
    required_chars="", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_surface=" \u2047 ", unk_piece="<unk>",
    bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>", train_extremely_large_corpus=False,
    enable_differential_privacy=False, differential_privacy_noise_level=0.0,
    differential_privacy_clipping_threshold=0,
)
NORMALIZER_SPEC = dict(name="identity", precompiled_charsmap=b"", add_dummy_prefix=True,
                       remove_extra_whitespaces=False, normalization_rule_tsv="")
# gguf token types (llama.cpp's enum) -> SentencePiece piece types
GGUF_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
}


def download_sdist(workdir):
    """The llama-cpp-python sdist downloaded by pip into ``workdir``; its path."""
    spec = config.LLAMA_TOKENIZER["sdist"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "--disable-pip-version-check", "-q", spec, "-d", workdir]
    proc = subprocess.run(command, capture_output=True, text=True)
    archives = [name for name in os.listdir(workdir) if name.endswith(".tar.gz")]
    if proc.returncode != 0 or len(archives) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"pip could not download {spec} (a package index must be reachable, and scikit-build-core "
                        f"installed: `pip install -r requirements-dev.txt`): {' | '.join(tail)}")
    return os.path.join(workdir, archives[0])


def extract_vocab_files(archive, workdir):
    """(gguf path, .inp path, .out path) extracted from the sdist."""
    wanted = config.LLAMA_TOKENIZER["gguf_member"]
    paths = []
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        for suffix in ("", ".inp", ".out"):
            member = members.get(wanted + suffix)
            if member is None:
                raise DataError(f"{archive}: holds no {wanted + suffix}; check config.LLAMA_TOKENIZER")
            target = os.path.join(workdir, os.path.basename(wanted + suffix))
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                dst.write(src.read())
            paths.append(target)
    return paths


def read_gguf_vocab(path):
    """(pieces, scores, gguf token types) of a gguf vocabulary file."""
    from gguf import GGUFReader   # optional: only this builder needs it (requirements-dev.txt)

    fields = GGUFReader(path).fields

    def array(name, convert):
        field = fields[name]
        return [convert(field.parts[index]) for index in field.data]

    pieces = array("tokenizer.ggml.tokens", lambda part: bytes(part).decode("utf-8"))
    scores = array("tokenizer.ggml.scores", lambda part: float(part[0]))
    types = array("tokenizer.ggml.token_type", lambda part: int(part[0]))
    return pieces, scores, types


def llama_proto(pieces, scores, types):
    """LLaMA's ModelProto from its pieces, scores and gguf token types."""
    proto = sentencepiece_model_pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        if kind != 1:   # NORMAL is the default, and Meta's file leaves it unset
            entry.type = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.Value(GGUF_TYPES[kind])
    trainer = proto.trainer_spec
    for name, value in TRAINER_SPEC.items():
        if name == "input":
            trainer.input.extend(value)
        elif name == "model_type":
            trainer.model_type = trainer.ModelType.Value(value)
        else:
            setattr(trainer, name, value)
    for name, value in NORMALIZER_SPEC.items():
        setattr(proto.normalizer_spec, name, value)
    return proto


def read_vocab_tests(inp_path, out_path):
    """[{'text', 'ids'}] of llama.cpp's test vectors: each .inp text ends with the test separator, each
    .out line holds the ids of one text."""
    with open(inp_path, encoding="utf-8") as f:
        texts = f.read().split(VOCAB_TEST_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    with open(out_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if len(lines) < len(texts):
        raise DataError(f"{os.path.basename(out_path)}: {len(lines)} lines of ids for {len(texts)} test texts")
    return [{"text": text, "ids": [int(x) for x in line.split()]} for text, line in zip(texts, lines)]


def check_model(data, tests):
    """Raise DataError unless ``data`` is Meta's file and reproduces every test vector."""
    digest = hashlib.md5(data).hexdigest()
    if digest != config.LLAMA_TOKENIZER["md5"]:
        raise DataError(f"the rebuilt tokenizer.model has md5 {digest}, not LLaMA's {config.LLAMA_TOKENIZER['md5']}: "
                        f"the sdist's vocabulary changed; check config.LLAMA_TOKENIZER")
    sp = spm.SentencePieceProcessor(model_proto=data)
    wrong = [t["text"] for t in tests if sp.encode(t["text"]) != t["ids"]]
    if wrong or not tests:
        raise DataError(f"SentencePiece differs from llama.cpp's reference ids on {len(wrong)} of {len(tests)} "
                        f"test texts (first: {wrong[:1]!r})")


def is_built(out):
    return all(os.path.isfile(os.path.join(out, name)) for name in FILES)


def build(out):
    """Write LLaMA's tokenizer into ``out`` (reused when already complete); return ``out``."""
    if is_built(out):
        return out
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as workdir:
        archive = download_sdist(workdir)
        gguf_path, inp_path, out_path = extract_vocab_files(archive, workdir)
        data = llama_proto(*read_gguf_vocab(gguf_path)).SerializeToString()
        tests = read_vocab_tests(inp_path, out_path)
    check_model(data, tests)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with data_io.atomic_directory(out) as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(data)
        for name, value in (("tokenizer_config.json", TOKENIZER_CONFIG), ("vocab_tests.json", tests)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(value, f, ensure_ascii=False, indent=1)
                f.write("\n")
        build_tiny_model.make_readable(tmp)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (reused when it already holds the tokenizer)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not is_built(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        data_io.fail(f"--out {args.out}: exists and is not a complete LLaMA tokenizer directory; pick another --out")
    try:
        build(args.out)
    except DataError as e:
        data_io.fail(str(e))
    print(f"LLaMA's tokenizer (md5 {config.LLAMA_TOKENIZER['md5']}) in {args.out}")


if __name__ == "__main__":
    main()
