"""Tokenizing a sample only as far as --max_length keeps: dataset.tokenized_chunks' encoder.

A sample longer than max_length is truncated after its tokens are counted, so the segments past the
cut need never be encoded; but a segment's token count is only known once it is encoded.
``SegmentPrefixes`` encodes in rounds, each as far as an estimate of the tokens (``TokenEstimate``)
says is still needed; the estimate moves work between rounds and never changes the ids.
"""
import math
import operator

import config
import prompt


class TokenEstimate:
    """Tokens of a text estimated from its size: a x characters + b x the UTF-8 bytes beyond one per
    character, a and b fitted by least squares to every segment encoded so far.  One ratio per character
    fits no mixed data: a CJK character takes several times the tokens of a Latin letter (LLaMA's
    vocabulary spells many of them byte by byte), and samples mix both."""

    def __init__(self):
        self.sums = [0] * 5   # over the encoded segments: chars², chars x extra, extra², chars x tokens, extra x tokens

    @staticmethod
    def sizes(text):
        """(characters, UTF-8 bytes beyond one per character) of ``text``."""
        chars = len(text)
        return chars, (0 if text.isascii() else len(text.encode()) - chars)

    def add(self, chars, extra, tokens):
        """Fit in segments of these sizes (lists) and token counts."""
        for i, (x, y) in enumerate(((chars, chars), (chars, extra), (extra, extra), (chars, tokens), (extra, tokens))):
            self.sums[i] += sum(map(operator.mul, x, y))

    def coefficients(self):
        """(a, b), or None before any segment was added."""
        cc, ce, ee, ct, et = self.sums
        if not cc:
            return None
        det = cc * ee - ce * ce
        if det <= 1e-9 * cc * ee:   # all ASCII, or extra bytes in one proportion to characters: one ratio
            return ct / cc, 0.0
        return (ct * ee - et * ce) / det, (et * cc - ct * ce) / det


class SegmentPrefixes:
    """Tokenizes the rendered segments of many samples, each sample only as far as ``max_length`` needs.

    ``tokenize(rendered)`` returns, per sample, the ids of its segments from the first on: all of them
    without a max_length; with one, those up to and including the first that takes the sample to
    ``max_length`` tokens (the rest would be truncated away).  Token counts are only known after
    encoding, so it works in rounds: each round sends every open sample's next segments, as many as an
    estimate of their tokens (``TokenEstimate`` x config.TRUNCATION_ESTIMATE_MARGIN) says are still
    needed, to one batched encode, then counts.  The estimate only decides how much is encoded per
    round, never the ids: a low one costs another round, a high one some segments encoded for nothing.
    Chunks go through one instance in order, so the estimate carries over from chunk to chunk; the
    first round of a conversion has none and encodes its samples whole.
    """

    def __init__(self, tokenizer, max_length=None, threads=None):
        self.tokenizer, self.threads = tokenizer, threads
        self.limit = math.inf if max_length is None else max_length
        self.estimate = TokenEstimate()
        self.rounds = self.encoded = 0           # counts, for the benchmark and the tests

    def tokenize(self, rendered):
        per_sample = [[] for _ in rendered]
        length = [0] * len(rendered)
        open_samples = range(len(rendered))
        while open_samples:
            a, b = self.estimate.coefficients() or (0.0, 0.0)
            a, b = a * config.TRUNCATION_ESTIMATE_MARGIN, b * config.TRUNCATION_ESTIMATE_MARGIN
            texts, owners, chars, extra = [], [], [], []
            for s in open_samples:
                segments, guess = rendered[s], length[s]
                for k in range(len(per_sample[s]), len(segments)):
                    text = segments[k][0]
                    size, beyond = TokenEstimate.sizes(text)
                    texts.append(text)
                    owners.append(s)
                    chars.append(size)
                    extra.append(beyond)
                    guess += a * size + b * beyond
                    if guess >= self.limit:
                        break
            token_lists = prompt.tokenize_segment_texts(self.tokenizer, texts, self.threads)
            for s, ids in zip(owners, token_lists):
                if length[s] < self.limit:     # (a segment after the limit was encoded on a low estimate)
                    per_sample[s].append(ids)
                    length[s] += len(ids)
            self.estimate.add(chars, extra, list(map(len, token_lists)))
            self.rounds, self.encoded = self.rounds + 1, self.encoded + len(texts)
            open_samples = [s for s in open_samples
                            if length[s] < self.limit and len(per_sample[s]) < len(rendered[s])]
        return per_sample
