"""Packing: whole samples into rows of max_length, and what training derives from a row.

A row holds whole samples one after the other, real tokens first, padding after them.  Its
position_ids restart at 0 at the start of every sample (``position_ids_for_row``), and the attention
masks built from them (``block_causal_mask``, ``block_causal_block_mask`` for FlexAttention) keep every
token from attending across samples.  ``collate_rows`` cuts a micro-batch to its longest row.
"""
import bisect
import heapq

import torch

import config

IGNORE_INDEX = -100     # the label of a token that is not learned


# ----------------------------------------------------------------------------------------------
# samples -> rows
# ----------------------------------------------------------------------------------------------
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


def pack_samples(samples, max_length, pad_token_id, reuse_lists=False):
    """Pack whole samples into rows of max_length, as few rows as best-fit decreasing needs, with the
    samples spread evenly over them (``_balanced_rows``; best fit as it is where spreading cannot
    fit them), and pad the rest.

    Returns a dict of row lists: input_ids, labels, attention_mask, sample_starts.  Real tokens come
    first in every row, padding after them; rows are shuffled by the DataLoader anyway.  With
    ``reuse_lists`` each row is built in its first (longest) sample's own two lists, extended in place,
    so most tokens are not copied once more into fresh memory: for a caller that has no further use for
    the samples (their lists become rows).
    """
    lengths = [len(input_ids) for input_ids, _ in samples]
    rows = _best_fit_rows(lengths, max_length)
    rows = _balanced_rows(lengths, len(rows), max_length) or rows
    packed = {"input_ids": [], "labels": [], "attention_mask": [], "sample_starts": []}
    # each row list is built once and padded in place (a concatenation would copy every row once more)
    padding, ignored, unmasked = [pad_token_id] * max_length, [IGNORE_INDEX] * max_length, [0] * max_length
    for members in rows:
        if reuse_lists:
            (input_ids, labels), starts, rest = samples[members[0]], [0], members[1:]
        else:
            input_ids, labels, starts, rest = [], [], [], members
        for i in rest:
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
    # imported here: it loads torch's compiler stack, which only the flex_attention path needs
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
