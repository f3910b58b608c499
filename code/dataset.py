"""Datasets for finetune.py, and the sample building that convert_data.py shares.

Flow: dialogues -> samples (1..N dialogues joined into one multi-round conversation, rendered by
prompt.py) -> token ids + labels (question tokens -100, answers + end marker learned, eos at the
end) -> rows of max_length holding whole samples, with the start of every sample recorded
(packing.py).

Every dataset yields dicts of 1-D tensors: input_ids, labels, attention_mask (1 real, 0 pad) and
position_ids, which restart at 0 at the start of every sample.  finetune.py turns position_ids
into a block-diagonal causal mask (packing.block_causal_mask, or block_causal_block_mask for
FlexAttention) so no token attends across samples.

The --dataset_type names map to classes through DATASET_TYPES (never eval).
"""
import gc
import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from sentencepiece import sentencepiece_model_pb2
from torch.utils.data import Dataset

import config
import prompt
from data_io import DataError
from packing import IGNORE_INDEX, pack_samples, row_item
from segment_prefixes import SegmentPrefixes

IDS_FORMAT = "cutegpt-ids/1"
# a fixed text whose ids fingerprint a tokenizer (recorded by convert_data, checked by training), and
# texts whose encoding differs between tokenizers that differ (leading and repeated spaces, digits, a
# written '<end>', an answer closed by the template's END_MARKER)
TOKENIZER_PROBE = config.META_PROMPT + "问：Hello, 世界 123!\n答：" + config.END_MARKER
FINGERPRINT_TEXTS = (" Hello  world\t\n", "def f():\n    return 1", "0.15 × 80 = 12.", "表情😀 \u3000全角",
                     "<s> </s> <end> 字面", "今天天气很好，我们去复旦大学散步吧。")


# ----------------------------------------------------------------------------------------------
# dialogues -> samples -> ids
# ----------------------------------------------------------------------------------------------
def group_dialogues(dialogues, max_dialogues_per_sample, rng):
    """Shuffle dialogues and join 1..max_dialogues_per_sample of them into one multi-round sample."""
    order = list(range(len(dialogues)))
    rng.shuffle(order)
    samples, begin = [], 0
    while begin < len(order):
        num = rng.randint(1, max_dialogues_per_sample)
        samples.append([turn for i in order[begin:begin + num] for turn in dialogues[i]])
        begin += num
    return samples


def segment_count(turns):
    """Segments of a sample: the meta prompt, then a question and an answer per turn."""
    return 1 + 2 * len(turns)


def chunk_bounds(samples, batch_size):
    """Contiguous chunks [(begin, end, segments)] of samples holding about ``batch_size`` segments
    each (at least one sample): one tokenizer batch."""
    chunks, begin, segments = [], 0, 0
    for index, turns in enumerate(samples):
        segments += segment_count(turns)
        if segments >= batch_size:
            chunks.append((begin, index + 1, segments))
            begin, segments = index + 1, 0
    if begin < len(samples):
        chunks.append((begin, len(samples), segments))
    return chunks


@contextmanager
def paused_gc():
    """Pause the cyclic garbage collector: building millions of small lists triggers full collections
    that each walk every list in memory (removing the pause slows the conversion by well over 10%, see
    BENCHMARKS.md); the objects built here hold no reference cycles.  At the end the objects built meanwhile
    join the oldest generation (``_tenure_young_objects``) instead of being walked once more by the
    collection that re-enabling would start at the next allocation."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            _tenure_young_objects()
            gc.enable()


def _tenure_young_objects():
    """Move every tracked object into the oldest generation without a collection (freeze, then unfreeze:
    two list splices).  Re-enabling the collector after a long pause would otherwise walk everything the
    pause built (every element of every row list) at the next allocation, to find no cycle; the next full
    collection still examines them.  Skipped where someone else has frozen objects (the unfreeze would
    release theirs too)."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def usable_cores():
    """CPU cores this process may run on (its affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_threads(threads):
    """The tokenizer threads for --threads N: N itself, or with 0 one per usable core, at most
    config.CONVERT_THREADS_MAX."""
    if threads <= 0:
        threads = min(usable_cores(), config.CONVERT_THREADS_MAX)
    return max(1, threads)


def tokenized_chunks(tokenizer, samples, template, rng, batch_size=config.TOKENIZE_BATCH, threads=None,
                     max_length=None):
    """Render each sample (a list of turns) with prompt.py and tokenize it: yields, chunk after chunk in
    order, (the chunk's samples [(input_ids, labels)], its segment count).  Labels are -100 on the meta
    prompt and on every question; answers (end marker included) are learned; eos closes every sample and
    is learned.  The template draws are taken from ``rng`` turn after turn, sample after sample.

    The segments of many samples are tokenized together, in chunks of about ``batch_size`` texts, as a
    pipeline: while one chunk is encoded in a background thread (SentencePiece's C++ batch encode on
    ``threads`` threads, which releases the GIL; see prompt.tokenize_segment_texts), this thread renders
    the next chunk, assembles the one before and runs the caller's work on it, so the Python work runs
    beside the tokenizer's instead of after it.

    With ``max_length``, a sample's segments are tokenized only up to the first that takes it to
    ``max_length`` tokens (``SegmentPrefixes``): what follows would be cut off by ``truncate_samples``
    anyway.  Such a sample comes out longer than ``max_length`` (its eos included), so truncating it gives
    exactly what truncating the whole sample gives.
    """
    eos = tokenizer.eos_token_id
    picker = prompt.template_picker(template, rng)
    prefixes = SegmentPrefixes(tokenizer, max_length, threads)

    def assembled(rendered, token_lists):
        tokenized = []
        for segments, sample_lists in zip(rendered, token_lists):
            input_ids, labels = [], []
            for (_, learned), ids in zip(segments, sample_lists):   # a sample cut short has fewer lists
                input_ids += ids
                labels += ids if learned else [IGNORE_INDEX] * len(ids)
            input_ids.append(eos)
            labels.append(eos)
            tokenized.append((input_ids, labels))
        return tokenized

    def finished(rendered, count, encoding):   # waits for the chunk's tokenization to end
        return assembled(rendered, encoding.result()), count

    with paused_gc(), ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as tokenizer_thread:
        in_flight = None    # (a rendered chunk, its segment count, its tokenization running in the thread)
        for begin, end, count in chunk_bounds(samples, batch_size):
            rendered = [prompt.render_segments(turns, [picker(turn) for turn in turns])
                        for turns in samples[begin:end]]
            encoding = tokenizer_thread.submit(prefixes.tokenize, rendered)
            if in_flight is not None:
                yield finished(*in_flight)
            in_flight = (rendered, count, encoding)
        if in_flight is not None:
            yield finished(*in_flight)


def tokenize_samples(tokenizer, samples, template, rng, batch_size=config.TOKENIZE_BATCH, threads=None):
    """All samples of ``tokenized_chunks``: [(input_ids, labels)], in order."""
    return [sample for chunk, _ in tokenized_chunks(tokenizer, samples, template, rng, batch_size, threads)
            for sample in chunk]


def tokenize_and_truncate(tokenizer, samples, template, rng, max_length, batch_size=config.TOKENIZE_BATCH,
                          threads=None, progress=None):
    """``tokenize_samples`` then ``truncate_samples``, chunk by chunk (so the truncation too runs while
    the next chunk is tokenized): (kept samples [(input_ids, labels)], truncated, dropped, learned tokens
    kept).  ``progress``: an object with ``update(n)`` (a tqdm bar), told the segments of each chunk."""
    kept, truncated, dropped, learned = [], 0, 0, 0
    for chunk, segments in tokenized_chunks(tokenizer, samples, template, rng, batch_size, threads, max_length):
        chunk_kept, chunk_truncated, chunk_dropped, chunk_learned = truncate_samples(chunk, max_length)
        kept += chunk_kept
        truncated, dropped, learned = truncated + chunk_truncated, dropped + chunk_dropped, learned + chunk_learned
        if progress is not None:
            progress.update(segments)
    return kept, truncated, dropped, learned


def truncate_samples(tokenized, max_length):
    """Cut samples longer than max_length; drop those left with nothing to learn.

    The lists of a long sample are cut in place (no copy of them is made: fresh memory costs a page
    fault every 4 KiB, a large share of the conversion's time), so pass lists nothing else holds.
    Returns (kept samples, number truncated, number dropped, learned tokens kept).
    """
    kept, truncated, dropped, learned_tokens = [], 0, 0, 0
    for input_ids, labels in tokenized:
        if len(input_ids) > max_length:
            truncated += 1
            del input_ids[max_length:], labels[max_length:]
        learned = len(labels) - labels.count(IGNORE_INDEX)
        if not learned:
            dropped += 1
            continue
        learned_tokens += learned
        kept.append((input_ids, labels))
    return kept, truncated, dropped, learned_tokens


def chunk_document(ids, max_length):
    """Pre-training samples of one document's ids: chunks of at most max_length tokens that overlap by
    one token, each labelled with its own ids except the first (nothing before it in the row predicts
    it; the previous chunk already learned it), so every token after the document's first is learned
    exactly once and no text is dropped."""
    chunks, start = [], 0
    while True:
        piece = ids[start:start + max_length]
        if len(piece) >= 2:
            chunks.append((piece, [IGNORE_INDEX] + piece[1:]))
        if start + max_length >= len(ids):
            return chunks
        start += max_length - 1


def tokenize_documents(tokenizer, documents, max_length, batch_size=config.TOKENIZE_BATCH, threads=None,
                       progress=None):
    """Pre-training samples [(input_ids, labels)] (each document's ids and eos, cut by chunk_document),
    and the number of documents that were cut."""
    eos = tokenizer.eos_token_id
    samples, cut = [], 0
    for start in range(0, len(documents), batch_size):
        batch = documents[start:start + batch_size]
        for ids in prompt.tokenize_segment_texts(tokenizer, batch, threads):
            cut += len(ids) + 1 > max_length
            samples.extend(chunk_document(list(ids) + [eos], max_length))
        if progress is not None:
            progress.update(len(batch))
    return samples, cut


def pad_token_id_of(tokenizer):
    """The id used for padding: the tokenizer's pad token, else eos (LLaMA has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encoding_digest(tokenizer):
    """sha256 of what decides how ``tokenizer`` encodes: its SentencePiece model's pieces, scores, types
    and normalizer where the project encodes with SentencePiece (prompt.segment_encoder), else its
    backend's pipeline; then its added tokens and the ids of FINGERPRINT_TEXTS and an answer segment."""
    digest = hashlib.sha256()
    encoder = prompt.segment_encoder(tokenizer)
    if encoder is not None:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(encoder.processor.serialized_model_proto())
        trainer = proto.trainer_spec   # of the training settings, only those that change the encoding stay
        kept = (trainer.model_type, trainer.byte_fallback, trainer.treat_whitespace_as_suffix)
        proto.ClearField("trainer_spec")
        proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback, proto.trainer_spec.treat_whitespace_as_suffix = kept
        digest.update(proto.SerializeToString(deterministic=True))
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        digest.update(backend.to_str().encode() if backend is not None else type(tokenizer).__name__.encode())
    texts = list(FINGERPRINT_TEXTS) + [prompt.answer_text("答案 <end>")]
    digest.update(json.dumps([sorted(tokenizer.get_added_vocab().items()),
                              prompt.tokenize_segment_texts(tokenizer, texts)]).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer):
    """What convert_data.py records of its tokenizer and check_ids_file compares: the vocabulary size, the
    ids of TOKENIZER_PROBE (as the project encodes it: the END_MARKER closing it from the template) and the
    encoding digest, which changes whenever the encoding would."""
    return {
        "vocab_size": len(tokenizer),
        "probe_ids": prompt.tokenize_segment_texts(tokenizer, [prompt.AnswerText(TOKENIZER_PROBE)])[0],
        "encoding_sha256": encoding_digest(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------
class PackedRows(Dataset):
    """Rows of max_length with the start of every sample in them (the packed layout)."""

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        return row_item(self.input_ids[index], self.labels[index], self.attention_mask[index],
                        self.sample_starts[index], self.max_length)


class DatasetIds(PackedRows):
    """Pre-tokenized rows from convert_data.py's llama_ift_data_ids.pkl (the fast path)."""

    def __init__(self, tokenizer, datas, max_length, source="the ids file", max_rows=-1, **kwargs):
        super().__init__()
        check_ids_file(datas, tokenizer, max_length, source)
        self.max_length = max_length
        count = len(datas["input_ids"]) if max_rows is None or max_rows < 0 else min(max_rows, len(datas["input_ids"]))
        self.input_ids = datas["input_ids"][:count]
        self.labels = datas["labels"][:count]
        self.attention_mask = datas["attention_mask"][:count]
        self.sample_starts = datas["sample_starts"][:count]
        self.meta = datas["meta"]


class GPT2Dataset_onlyres(PackedRows):
    """Dialogues tokenized at start-up and packed (whole samples per row), loss on answers only."""

    def __init__(self, tokenizer, datas, max_length, template="random", seed=config.CONVERT_SEED,
                 max_dialogues_per_sample=config.MAX_DIALOGUES_PER_SAMPLE, **kwargs):
        super().__init__()
        rng = random.Random(seed)
        samples = group_dialogues(datas, max_dialogues_per_sample, rng)
        tokenized, self.truncated, self.dropped, _ = tokenize_and_truncate(tokenizer, samples, template, rng,
                                                                            max_length)
        packed = pack_samples(tokenized, max_length, pad_token_id_of(tokenizer))
        self.max_length = max_length
        self.input_ids = packed["input_ids"]
        self.labels = packed["labels"]
        self.attention_mask = packed["attention_mask"]
        self.sample_starts = packed["sample_starts"]


class BertDataset_onlyres(Dataset):
    """One dialogue per row, padded to max_length (truncated if longer), loss on answers only."""

    def __init__(self, tokenizer, datas, max_length, template="random", seed=config.CONVERT_SEED, **kwargs):
        super().__init__()
        rng = random.Random(seed)
        tokenized, self.truncated, self.dropped, _ = tokenize_and_truncate(tokenizer, list(datas), template, rng,
                                                                            max_length)
        self.samples = tokenized
        self.max_length = max_length
        self.pad_token_id = pad_token_id_of(tokenizer)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        input_ids, labels = self.samples[index]
        pad = self.max_length - len(input_ids)
        return row_item(input_ids + [self.pad_token_id] * pad, labels + [IGNORE_INDEX] * pad,
                        [1] * len(input_ids) + [0] * pad, [0], self.max_length)


DATASET_TYPES = {
    "DatasetIds": DatasetIds,
    "GPT2Dataset_onlyres": GPT2Dataset_onlyres,
    "BertDataset_onlyres": BertDataset_onlyres,
}


# ----------------------------------------------------------------------------------------------
# ids-file checks
# ----------------------------------------------------------------------------------------------
def check_ids_file(datas, tokenizer, max_length, source):
    """Refuse, with a clear DataError, an ids file made for another tokenizer or max_length."""
    redo = "re-run code/convert_data.py with this model's tokenizer and --max_length"
    if not isinstance(datas, dict) or datas.get("format") != IDS_FORMAT or "meta" not in datas:
        raise DataError(f"{source}: not an ids file written by this project's code/convert_data.py "
                        f"(format {IDS_FORMAT}); {redo}")
    for key in ("input_ids", "labels", "attention_mask", "sample_starts"):
        if not isinstance(datas.get(key), list):
            raise DataError(f"{source}: field '{key}' is missing or not a list; {redo}")
    meta = datas["meta"]
    if meta.get("max_length") != max_length:
        raise DataError(f"{source}: made for max_length {meta.get('max_length')}, training asks for "
                        f"--max_length {max_length}; pass --max_length {meta.get('max_length')} or {redo} {max_length}")
    if tokenizer is not None:
        mine = tokenizer_fingerprint(tokenizer)
        theirs = meta.get("tokenizer", {})
        if any(theirs.get(key) != mine[key] for key in ("vocab_size", "probe_ids", "encoding_sha256")):
            hint = ""
            if theirs.get("vocab_size") == mine["vocab_size"] - 1 and meta.get("special_end_token") is False:
                hint = (" (full fine-tuning adds '<end>' as a special token: convert with "
                        "--special_end_token for it)")
            elif theirs.get("vocab_size") == mine["vocab_size"] + 1 and meta.get("special_end_token"):
                hint = " (this file has '<end>' as a special token, for full fine-tuning; drop --special_end_token for LoRA)"
            raise DataError(f"{source}: made with tokenizer {theirs.get('name')!r} "
                            f"(vocabulary {theirs.get('vocab_size')}), which encodes differently from this model's "
                            f"(vocabulary {mine['vocab_size']}){hint}; {redo}")
