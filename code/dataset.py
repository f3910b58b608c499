"""Datasets for finetune.py, and the sample building / packing that convert_data.py shares.

Flow: dialogues -> samples (1..N dialogues joined into one multi-round conversation, rendered by
prompt.py) -> token ids + labels (question tokens -100, answers + end marker learned, eos at the
end) -> rows of max_length holding whole samples, with the start of every sample recorded.

Every dataset yields dicts of 1-D tensors: input_ids, labels, attention_mask (1 real, 0 pad) and
position_ids, which restart at 0 at the start of every sample.  finetune.py turns position_ids
into a block-diagonal causal mask (``block_causal_mask``, or ``block_causal_block_mask`` for
FlexAttention) so no token attends across samples.

The --dataset_type names map to classes through DATASET_TYPES (never eval).
"""
import bisect
import gc
import heapq
import math
import os
import random
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset

import config
import prompt
from data_io import DataError

IDS_FORMAT = "cutegpt-ids/1"
IGNORE_INDEX = -100
# a fixed text whose ids fingerprint a tokenizer (recorded by convert_data, checked by training)
TOKENIZER_PROBE = config.META_PROMPT + "问：Hello, 世界 123!\n答：" + config.END_MARKER


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
    that each walk every list item in memory (about a tenth of the conversion time); the objects built
    here hold no reference cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
    from concurrent.futures import ThreadPoolExecutor

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


class SegmentPrefixes:
    """Tokenizes the rendered segments of many samples, each sample only as far as ``max_length`` needs.

    ``tokenize(rendered)`` returns, per sample, the ids of its segments from the first on: all of them
    without a max_length; with one, those up to and including the first that takes the sample to
    ``max_length`` tokens (the rest would be truncated away).  Token counts are only known after
    encoding, so it works in rounds: each round sends every open sample's next segments, as many as an
    estimate of their tokens (characters x the sample's own tokens per character so far, or before its
    first round the conversion's, x config.TRUNCATION_ESTIMATE_MARGIN) says are still needed, to one
    batched encode, then counts.  The
    estimate only decides how much is encoded per round, never the ids: a low one costs another round, a
    high one some segments encoded for nothing.  Chunks go through one instance in order, so the
    estimate carries over from chunk to chunk.
    """

    def __init__(self, tokenizer, max_length=None, threads=None):
        self.tokenizer, self.threads = tokenizer, threads
        self.limit = math.inf if max_length is None else max_length
        # one int object per vocabulary id, shared by every token list: the tokenizer makes a new int object
        # for each token (32 bytes of fresh memory each, millions of them), and every later copy of a list
        # (assembling, truncating, packing) touches each one; shared ones stay in the CPU cache
        self.interned = list(range(len(tokenizer)))
        self.tokens, self.characters = 0, 0      # of all segments encoded so far: the estimate's base
        self.rounds = self.encoded = 0           # counts, for the benchmark and the tests

    def tokenize(self, rendered):
        per_sample = [[] for _ in rendered]
        length = [0] * len(rendered)
        characters = [0] * len(rendered)
        open_samples = range(len(rendered))
        while open_samples:
            # the first round of a conversion has no estimate: it encodes its samples whole
            per_character = (self.tokens / self.characters * config.TRUNCATION_ESTIMATE_MARGIN
                             if self.characters else 0.0)
            texts, owners = [], []
            for s in open_samples:
                segments, guess = rendered[s], length[s]
                ratio = guess / characters[s] * config.TRUNCATION_ESTIMATE_MARGIN if characters[s] else per_character
                for k in range(len(per_sample[s]), len(segments)):
                    text = segments[k][0]
                    texts.append(text)
                    owners.append(s)
                    characters[s] += len(text)
                    guess += len(text) * ratio
                    if guess >= self.limit:
                        break
            token_lists = self.intern(prompt.tokenize_segment_texts(self.tokenizer, texts, self.threads))
            for s, ids in zip(owners, token_lists):
                if length[s] < self.limit:     # (a segment after the limit was encoded on a low estimate)
                    per_sample[s].append(ids)
                    length[s] += len(ids)
            self.tokens += sum(map(len, token_lists))
            self.characters += sum(map(len, texts))
            self.rounds, self.encoded = self.rounds + 1, self.encoded + len(texts)
            open_samples = [s for s in open_samples
                            if length[s] < self.limit and len(per_sample[s]) < len(rendered[s])]
        return per_sample

    def intern(self, token_lists):
        try:
            return [list(map(self.interned.__getitem__, ids)) for ids in token_lists]
        except IndexError:       # an id past len(tokenizer) (a vocabulary with gaps): widen the table
            self.interned = list(range(1 + max(max(ids) for ids in token_lists if ids)))
            return self.intern(token_lists)


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


def _best_fit_rows(lengths, max_length):
    """Best-fit decreasing: each sample (longest first) into the fullest row it still fits, else a new
    row.  Few rows, most of them nearly full; the last ones opened can be nearly empty."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows = []            # list of lists of sample indices
    free = []            # sorted list of (free space, row index)
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos < len(free):
            space, row = free.pop(pos)
            rows[row].append(i)
            bisect.insort(free, (space - lengths[i], row))
        else:
            rows.append([i])
            bisect.insort(free, (max_length - lengths[i], len(rows) - 1))
    return rows


def _balanced_rows(lengths, row_count, max_length):
    """The same samples spread over ``row_count`` rows as evenly as possible, or None if they do not fit.

    Longest first into the emptiest row; then, while it lowers the longest row, one sample of the
    longest row moves to (or swaps with one of) a shorter row.  Training cuts each micro-batch to its
    longest row (``collate_rows``), so even rows mean little padding is ever computed, even where the
    data fills the last of a few rows only partly (the sample data: 18 rows, 17 of them full would
    leave one nearly empty).
    """
    rows, load = [[] for _ in range(row_count)], [0] * row_count
    heap = [(0, r) for r in range(row_count)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        _, r = heapq.heappop(heap)
        if load[r] + lengths[i] > max_length:
            return None
        rows[r].append(i)
        load[r] += lengths[i]
        heapq.heappush(heap, (load[r], r))
    for _ in range(min(BALANCE_ROUNDS, 4 * row_count)):
        top = max(range(row_count), key=lambda r: (load[r], -r))
        best = None      # (the longer of the two rows after the change, other row, sample out, sample in)
        for other in heapq.nsmallest(BALANCE_CANDIDATES, range(row_count), key=lambda r: (load[r], r)):
            gap = load[top] - load[other]
            for out in rows[top]:
                for into in [None] + rows[other]:
                    delta = lengths[out] - (0 if into is None else lengths[into])
                    if 0 < delta < gap:
                        longer = max(load[top] - delta, load[other] + delta)
                        if best is None or longer < best[0]:
                            best = (longer, other, out, into)
            if best is not None:
                break
        if best is None:
            break
        _, other, out, into = best
        rows[top].remove(out)
        rows[other].append(out)
        load[top] -= lengths[out]
        load[other] += lengths[out]
        if into is not None:
            rows[other].remove(into)
            rows[top].append(into)
            load[other] -= lengths[into]
            load[top] += lengths[into]
    return [sorted(members, key=lambda i: (-lengths[i], i)) for members in rows]


# the balancing's search is bounded so that it stays a fraction of a second on any data size
BALANCE_ROUNDS = 2000        # at most this many moves/swaps (and 4 per row)
BALANCE_CANDIDATES = 8       # shorter rows tried per move, shortest first


def pack_samples(samples, max_length, pad_token_id):
    """Pack whole samples into rows of max_length, as few rows as best-fit decreasing needs, with the
    samples spread evenly over them (``_balanced_rows``; best fit as it is where spreading cannot
    fit them), and pad the rest.

    Returns a dict of row lists: input_ids, labels, attention_mask, sample_starts.  Real tokens come
    first in every row, padding after them; rows are shuffled by the DataLoader anyway.
    """
    lengths = [len(input_ids) for input_ids, _ in samples]
    rows = _best_fit_rows(lengths, max_length)
    rows = _balanced_rows(lengths, len(rows), max_length) or rows
    packed = {"input_ids": [], "labels": [], "attention_mask": [], "sample_starts": []}
    # each row list is built once and padded in place (a concatenation would copy every row once more)
    padding, ignored, unmasked = [pad_token_id] * max_length, [IGNORE_INDEX] * max_length, [0] * max_length
    for members in rows:
        input_ids, labels, starts = [], [], []
        for i in members:
            starts.append(len(input_ids))
            input_ids += samples[i][0]
            labels += samples[i][1]
        real = len(input_ids)
        input_ids += padding[real:]
        labels += ignored[real:]
        attention_mask = [1] * real
        attention_mask += unmasked[real:]
        packed["input_ids"].append(input_ids)
        packed["labels"].append(labels)
        packed["attention_mask"].append(attention_mask)
        packed["sample_starts"].append(starts)
    return packed


def fed_length(real_length, max_length, multiple=config.ROW_LENGTH_MULTIPLE):
    """Positions a row of ``real_length`` real tokens is cut to in training: rounded up to ``multiple``."""
    return min(max_length, -(-real_length // multiple) * multiple)


def pad_token_id_of(tokenizer):
    """The id used for padding: the tokenizer's pad token, else eos (LLaMA has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenizer_fingerprint(tokenizer):
    return {
        "vocab_size": len(tokenizer),
        "probe_ids": tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"],
        "eos_token_id": tokenizer.eos_token_id,
    }


# ----------------------------------------------------------------------------------------------
# rows -> position ids -> attention mask
# ----------------------------------------------------------------------------------------------
def position_ids_for_row(sample_starts, max_length):
    """Positions restart at 0 at each sample start.  The padding tail continues the last sample: its
    outputs are never learned, and causal attention keeps every real token from seeing it."""
    positions = torch.empty(max_length, dtype=torch.long)
    bounds = list(sample_starts) + [max_length]
    for begin, end in zip(bounds[:-1], bounds[1:]):
        positions[begin:end] = torch.arange(end - begin)
    return positions


def block_causal_mask(position_ids, dtype):
    """Additive 4-D mask (batch, 1, L, L): token i sees token j iff j <= i in the same sample.

    A sample starts wherever position_ids is 0.  0 where attention is allowed, the dtype's
    minimum elsewhere, which SDPA and eager attention both accept as a custom mask.
    """
    starts = (position_ids == 0).long()
    segment = torch.cumsum(starts, dim=-1)                           # (B, L) sample number
    same = segment.unsqueeze(-1) == segment.unsqueeze(-2)             # (B, L, L)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def block_causal_block_mask(position_ids, attention_mask=None):
    """The pattern of ``block_causal_mask`` as a FlexAttention BlockMask (batch, 1, L, L), for
    attn_implementation="flex_attention".

    A sample (document) starts wherever position_ids is 0; token i sees token j iff j <= i in the same
    document.  With ``attention_mask`` (1 real, 0 pad) the padding is a document of its own, so no pad
    position looks back at a sample (real tokens see the same positions as with ``block_causal_mask``;
    padding is never learned).  Only a (batch, L) tensor of document numbers is kept: the mask function
    reads it, and the BlockMask records which 128 x 128 tiles are empty (skipped), full (no masking) or
    partial.  Build it once per micro-batch, on the device of the model.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    document = torch.cumsum((position_ids == 0).long(), dim=-1)      # (B, L) sample number, from 1
    if attention_mask is not None:
        document = document.masked_fill(attention_mask == 0, 0)      # the padding: document 0

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document[b, q_idx] == document[b, kv_idx]) & (kv_idx <= q_idx)

    batch, length = position_ids.shape
    return create_block_mask(same_document_causal, B=batch, H=None, Q_LEN=length, KV_LEN=length,
                             device=position_ids.device)


def row_item(input_ids, labels, attention_mask, sample_starts, max_length):
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        "position_ids": position_ids_for_row(sample_starts, max_length),
    }


def collate_rows(items):
    """A micro-batch of dataset items, cut to its longest row (``fed_length``): the columns after it
    are padding in every row, whose positions the model would compute and the loss ignore."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    width = batch["input_ids"].shape[1]
    mask = batch["attention_mask"]
    # real tokens come first in every row: a row's real length is its mask's sum
    longest = int(mask.sum(dim=1).max()) if mask.numel() else 0
    keep = fed_length(max(longest, 1), width)
    if keep < width:
        batch = {key: value[:, :keep] for key, value in batch.items()}
    return batch


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
        if theirs.get("vocab_size") != mine["vocab_size"] or theirs.get("probe_ids") != mine["probe_ids"]:
            hint = ""
            if theirs.get("vocab_size") == mine["vocab_size"] - 1 and meta.get("special_end_token") is False:
                hint = (" (full fine-tuning adds '<end>' as a special token: convert with "
                        "--special_end_token for it)")
            elif theirs.get("vocab_size") == mine["vocab_size"] + 1 and meta.get("special_end_token"):
                hint = " (this file has '<end>' as a special token, for full fine-tuning; drop --special_end_token for LoRA)"
            raise DataError(f"{source}: made with tokenizer {theirs.get('name')!r} "
                            f"(vocabulary {theirs.get('vocab_size')}), which differs from this model's "
                            f"(vocabulary {mine['vocab_size']}){hint}; {redo}")
