"""A Hugging Face fast tokenizer that gives exactly SentencePiece's ids: the conversion the project loads
LLaMA-style tokenizers with (model_loader.load_tokenizer) and writes tokenizer.json with (extend_vocab.py).

Why not transformers' own conversion: transformers 5 rebuilds a LlamaTokenizer from tokenizer.model with a
Metaspace pre-tokenizer that adds the dummy prefix only to text that does not already start with a space
(' Hello' gives '▁Hello', SentencePiece '▁▁Hello'), and orders the merges of appended pieces by other
ranks than their scores.  The CuteGPT weights were trained on SentencePiece's ids, so this module builds
the pipeline from the ModelProto itself:

- BPE model: every piece at its id; a merge (left, right) for each split of a normal or user-defined
  piece whose two halves are pieces, ranked as SentencePiece applies them: highest piece score first
  (then lower id; for two splits of one piece, the shorter left half first); byte fallback as the proto
  says, '<unk>' for the rest.
- Normalizer: the proto's precompiled character map (if any), the removal of extra whitespace (if set),
  '▁' prepended (add_dummy_prefix: always, even before a leading space), spaces -> '▁'.  No
  pre-tokenizer: SentencePiece BPE merges across spaces when encoding.
- Decoder: '▁' -> ' ', byte pieces -> bytes, and the dummy prefix's space stripped.

SentencePiece picks the leftmost of two merges of equal score; a rank order cannot express that for
every vocabulary, so ``disagreements`` checks a converted tokenizer against SentencePiece on
``probe_texts`` (whitespace runs, digits, emoji, prompt markers ...), and the loader refuses one that
differs.

Public functions: load_llama_tokenizer (what the loader calls), read_proto, backend_from_proto, added_tokens,
probe_texts, disagreements, describe, agreement_report.
"""
import json
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

import config
from data_io import DataError

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
MERGEABLE = (Piece.NORMAL, Piece.USER_DEFINED)


class NotConvertible(DataError):
    """A tokenizer.model this module cannot turn into an agreeing fast tokenizer; the message says why."""


def read_proto(path):
    """The ModelProto of a tokenizer.model file (NotConvertible when it is none)."""
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:
        raise NotConvertible(f"{path}: not a SentencePiece model ({type(e).__name__}: {e})")
    if not proto.pieces:
        raise NotConvertible(f"{path}: a SentencePiece model without pieces")
    return proto


def _merges(pieces, vocab):
    """[(left, right)] in the order SentencePiece BPE applies them (see the module docstring); ``pieces``:
    (text, type, score) of every piece, in id order."""
    ranked = sorted((-score, index, text) for index, (text, kind, score) in enumerate(pieces)
                    if kind in MERGEABLE and len(text) >= 2)
    merges = []
    for _, _, text in ranked:     # one piece's splits: the shorter left half first
        for cut in range(1, len(text)):
            left = text[:cut]
            if left in vocab:
                right = text[cut:]
                if right in vocab:
                    merges.append((left, right))
    return merges


def _normalizer(spec):
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    return normalizers.Sequence(steps)


def backend_from_proto(proto):
    """A ``tokenizers.Tokenizer`` that encodes as SentencePiece does with ``proto`` (BPE models only);
    the unknown, control and byte pieces are its special added tokens."""
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != trainer.BPE:
        raise NotConvertible("the SentencePiece model is not BPE (LLaMA's is); only BPE models are converted")
    if trainer.treat_whitespace_as_suffix:
        raise NotConvertible("the SentencePiece model treats whitespace as a suffix; not supported")
    pieces = [(p.piece, p.type, p.score) for p in proto.pieces]   # one pass: reading a proto field is slow
    vocab = {}
    for index, (text, _, _) in enumerate(pieces):
        if vocab.setdefault(text, index) != index:
            raise NotConvertible(f"the SentencePiece model holds piece {text!r} twice")
    unk = next((text for text, kind, _ in pieces if kind == Piece.UNKNOWN), None)
    model = BPE(vocab=vocab, merges=_merges(pieces, vocab), unk_token=unk, fuse_unk=True,
                byte_fallback=trainer.byte_fallback, dropout=None)
    backend = Tokenizer(model)
    backend.normalizer = _normalizer(spec)
    backend.pre_tokenizer = None
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    specials = [text for text, kind, _ in pieces if kind in (Piece.UNKNOWN, Piece.CONTROL)]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return backend


# ----------------------------------------------------------------------------------------------
# agreement with SentencePiece
# ----------------------------------------------------------------------------------------------
PROBE_TEXTS = (
    "Hello world", " Hello world", "  Hello  world  ", "   three leading spaces", "trailing space ",
    "a\tb\t\tc", "\tleading tab", "line one\nline two\n\n", "\n\nleading newlines", " \n \n ",
    "def f():\n    return 1\n        pass", "        eight", "    four", "\u3000全角空格\u3000",
    "0.15 × 80 = 12.", "3.14159 2023年5月1日 1,234,567.89 -42 +7e10", "v1.2.3 192.168.0.1 0x1F",
    "表情😀🎉✨ and 🦙.cpp 👨‍👩‍👧", "Äpfel naïve café ß ÀÉÎ русский ελληνικά", "日本語テキスト 한국어",
    "今天天气很好，我们去复旦大学散步吧。", "请推荐五本名著，依次列出作品名、作者",
    "<s> 和 </s> 字面 <end> <unk>", "答案<end>", "<end>", "<<end>>", "</s></s>",
    "问：", "\n答：", "问：Hello, 世界 123!\n答：", "",
)


def probe_texts(extra=()):
    """Texts that exercise every part of the pipeline: the module's fixed ones, the prompt markers and
    templates of config.py, ``extra`` (e.g. sample dialogues), and each of them with a leading space."""
    texts = list(PROBE_TEXTS) + [config.META_PROMPT, config.TURN_SEPARATOR, config.END_MARKER]
    for parts in config.TURN_TEMPLATES.values():
        texts += [template for template in parts.values() if isinstance(template, str)]
    texts += [t for t in extra if isinstance(t, str)]
    texts += [" " + t for t in texts] + ["  " + t for t in texts[:len(PROBE_TEXTS)]]
    return list(dict.fromkeys(texts))


def disagreements(encode, decode, sp, texts):
    """[(text, SentencePiece ids, ids, decoded)] for the texts where ``encode`` (a batch function: texts ->
    id lists) differs from ``sp`` (a SentencePieceProcessor), or where ``decode`` (ids -> text) does not
    give the text back."""
    wrong = []
    for text, expected, ids in zip(texts, sp.encode(list(texts)), encode(list(texts))):
        ids = list(ids)
        decoded = decode(ids)
        if ids != expected or decoded != text:
            wrong.append((text, expected, ids, decoded))
    return wrong


def describe(wrong, total):
    """One line about the first disagreement of ``disagreements``' result."""
    text, expected, ids, decoded = wrong[0]
    what = (f"SentencePiece gives {expected[:12]}, the fast tokenizer {ids[:12]}" if expected != ids
            else f"decoding gives {decoded!r}")
    return f"{len(wrong)} of {total} probe texts differ (first {text!r}: {what})"


def agreement_report(tokenizer, model_file, extra=()):
    """{'probe_texts': N, 'agreeing': M, 'first_difference': ...} for a Hugging Face tokenizer against its
    SentencePiece model file, on probe_texts(extra): ids without special tokens, and decoding."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    texts = probe_texts(extra)
    wrong = disagreements(lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"],
                          lambda ids: tokenizer.decode(ids), sp, texts)
    return {"probe_texts": len(texts), "agreeing": len(texts) - len(wrong),
            "first_difference": describe(wrong, len(texts)) if wrong else None}


# ----------------------------------------------------------------------------------------------
# a tokenizer directory holding tokenizer.model
# ----------------------------------------------------------------------------------------------
# tokenizer_config.json keys passed on to the tokenizer (the rest describe what this module rebuilds)
PASSED_SETTINGS = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                   "model_max_length", "padding_side", "chat_template", "extra_special_tokens",
                   "additional_special_tokens")


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotConvertible(f"{os.path.basename(path)} cannot be read ({type(e).__name__}: {e})")
    return value if isinstance(value, dict) else {}


def _content(token):
    return token.get("content") if isinstance(token, dict) else token


def added_tokens(directory):
    """{id: (content, special)} of the tokens the directory adds on top of its pieces (tokenizer.json,
    tokenizer_config.json's added_tokens_decoder, added_tokens.json)."""
    found = {}
    for entry in _read_json(os.path.join(directory, "tokenizer.json")).get("added_tokens", []):
        found[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
    decoder = _read_json(os.path.join(directory, "tokenizer_config.json")).get("added_tokens_decoder", {})
    for index, entry in decoder.items():
        found[int(index)] = (_content(entry), bool(entry.get("special", True)) if isinstance(entry, dict) else True)
    for content, index in _read_json(os.path.join(directory, "added_tokens.json")).items():
        found.setdefault(int(index), (content, True))
    return found


def _add_tokens(backend, proto, directory):
    """Add the directory's tokens beyond the pieces to ``backend`` at their ids; refuse ids that collide."""
    size = len(proto.pieces)
    extra = []
    for index, (content, special) in sorted(added_tokens(directory).items()):
        if index < size:
            if proto.pieces[index].piece != content:
                raise NotConvertible(f"added token {content!r} has id {index}, which is piece "
                                     f"{proto.pieces[index].piece!r} of tokenizer.model")
            continue
        if index != size + len(extra):
            raise NotConvertible(f"added token {content!r} has id {index}; ids after the {size} pieces must "
                                 f"follow on from {size + len(extra)}")
        extra.append(AddedToken(content, special=special, normalized=False))
    for token in extra:   # one at a time: each takes the next id
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    return [token.content for token in extra]


def _settings(directory, proto):
    settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
    kwargs = {key: _content(settings[key]) if key.endswith("_token") else settings[key]
              for key in PASSED_SETTINGS if settings.get(key) is not None}
    template_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            kwargs["chat_template"] = f.read()
    # LLaMA's defaults: the proto's (first) unknown piece, <s>, </s>
    if "unk_token" not in kwargs:
        kwargs["unk_token"] = next((p.piece for p in proto.pieces if p.type == Piece.UNKNOWN), None)
    kwargs.setdefault("bos_token", proto.trainer_spec.bos_piece)
    kwargs.setdefault("eos_token", proto.trainer_spec.eos_piece)
    kwargs.setdefault("add_bos_token", True)
    kwargs.setdefault("add_eos_token", False)
    kwargs.setdefault("padding_side", "left")   # LlamaTokenizer's
    return kwargs


def load_llama_tokenizer(directory, check_texts=()):
    """The tokenizer of a directory holding tokenizer.model: a PreTrainedTokenizerFast whose pipeline is built
    from the SentencePiece model (``backend_from_proto``) with the directory's added tokens ('<end>' after
    full fine-tuning) and settings, checked against SentencePiece on ``probe_texts(check_texts)``.  Not a
    LlamaTokenizer: that class rebuilds its own pipeline (transformers' Metaspace) whenever it loads, so a
    directory this tokenizer saves (tokenizer.json, and tokenizer_config.json naming the plain fast class)
    loads through AutoTokenizer, in the project or in a serving engine, with exactly these ids.

    Text is encoded as text: '<s>', '</s>', '<end>' written in it are characters, never control ids
    (split_special_tokens; control tokens come from the prompt template, see prompt.py).  Raises
    NotConvertible, naming the first difference, where no agreeing tokenizer can be built."""
    model_file = os.path.join(directory, "tokenizer.model")
    proto = read_proto(model_file)
    backend = backend_from_proto(proto)
    _add_tokens(backend, proto, directory)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, vocab_file=model_file, name_or_path=directory,
                                        clean_up_tokenization_spaces=False, split_special_tokens=True,
                                        **_settings(directory, proto))
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    texts = probe_texts(check_texts)
    wrong = disagreements(lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"],
                          tokenizer.decode, sp, texts)
    if wrong:
        raise NotConvertible("no fast tokenizer agreeing with its tokenizer.model can be built: "
                             + describe(wrong, len(texts)))
    return tokenizer
