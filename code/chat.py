"""A CuteGPT conversation: history, memory limit, token budget, stop at the end marker, streaming,
cancellation.  No terminal and no HTTP here: inference.py, the API server and the web demo all
drive the same ``Chat`` (or, stateless, ``build_prompt`` + ``Reply``).

    chat = Chat(model, tokenizer)                      # settings from config.GENERATION / MEMORY_LIMIT
    result = chat.ask("请推荐五本名著，依次列出作品名、作者")   # TurnResult: response, history_used, ...
    reply = chat.stream("再来三本呢？")                 # a Reply: iterate for text pieces as they come
    for piece in reply:
        print(piece, end="", flush=True)               # reply.cancel() (any thread) stops it early
    result = reply.result()

The prompt ids come only from prompt.conversation_segments(prompt.chat_turns(...)) and
prompt.encode_segments, the functions convert_data.py builds the training ids with, so what the
model reads at inference equals what it was trained on up to where the answer starts.

History beyond ``memory_limit`` turns is not fed back (the seed's memory_limit = 3); when the prompt
plus max_new_tokens would pass the model's context, the oldest turns are dropped, and if the query
alone is still too long it is cut (its beginning is kept) with a notice.
"""
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import config
import generation_worker
import prompt
from data_io import DataError
from model_loader import input_device

# Texts removed from every answer (the seed removed these three).  The end marker closes an
# answer: generation stops there and nothing after it is kept.
STRIPPED_TEXTS = ("<s>", "</s>")


class ChatError(DataError):
    """A setting makes a turn impossible (e.g. max_new_tokens fills the whole context); the message
    names the setting to change.  A DataError, so front ends report it like any user mistake."""


class ContextError(ChatError):
    """The prompt cannot fit the model's context: max_new_tokens leaves no room, or (with
    build_prompt(cut_query=False)) the query alone is too long."""


def generation_settings(**overrides):
    """config.GENERATION with the given values replaced (None values are ignored)."""
    settings = dict(config.GENERATION)
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ChatError(f"unknown generation setting(s) {sorted(unknown)}; known: {sorted(settings)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def default_settings(demo=False):
    """The settings a front end starts from: config.GENERATION, with config.DEMO['generation'] for --demo."""
    return generation_settings(**(config.DEMO["generation"] if demo else {}))


def user_settings(defaults=None, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                  max_new_tokens=None):
    """Generation settings from what a user set (flags, page controls, request fields): ``defaults``
    (None: config.GENERATION) with each value given replaced.  temperature 0 means greedy decoding,
    above 0 sampling at that temperature."""
    settings = dict(defaults or generation_settings())
    if temperature is not None:
        settings["do_sample"] = temperature > 0
        if temperature > 0:
            settings["temperature"] = float(temperature)
    for name, value, kind in (("top_p", top_p, float), ("top_k", top_k, int),
                              ("repetition_penalty", repetition_penalty, float), ("max_new_tokens", max_new_tokens, int)):
        if value is not None:
            settings[name] = kind(value)
    return settings


def context_length_of(model, tokenizer=None):
    """Tokens the model can attend to: config.max_position_embeddings (2048 for LLaMA)."""
    length = getattr(model.config, "max_position_embeddings", None)
    if not length and tokenizer is not None and tokenizer.model_max_length < 10 ** 8:
        length = tokenizer.model_max_length
    return int(length or 2048)


def clean_response(text):
    """The answer as shown and stored: cut at the end marker, '<s>' / '</s>' removed, stripped."""
    cut = text.find(config.END_MARKER)
    if cut >= 0:
        text = text[:cut]
    for marker in STRIPPED_TEXTS:
        text = text.replace(marker, "")
    return text.strip()


# ----------------------------------------------------------------------------------------------
# prompt and token budget
# ----------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    input_ids: list            # token ids fed to the model
    history_used: int          # (query, response) turns of history inside it
    query: str                 # the query as fed (cut when it alone passed the budget)
    query_truncated: bool
    notices: list = field(default_factory=list)


def encode_prompt(tokenizer, history, query, meta_prompt=None):
    """Prompt ids for ``history`` (list of (query, response)) followed by the open ``query``;
    ``meta_prompt`` replaces config.META_PROMPT when given."""
    segments = prompt.conversation_segments(prompt.chat_turns(history, query), meta_prompt=meta_prompt)
    return prompt.encode_segments(tokenizer, segments)[0]


def _turns_that_fit(tokenizer, candidates, query, budget, meta_prompt=None):
    """How many of the most recent ``candidates`` fit with ``query`` in ``budget`` tokens, and the
    ids.  One batched tokenization estimates it from per-segment lengths, a few exact encodes
    confirm it (the first kept turn loses its separator, so lengths shift by a token or two)."""
    segments = prompt.conversation_segments(prompt.chat_turns(candidates, query), meta_prompt=meta_prompt)
    lengths = [len(ids) for ids in prompt.tokenize_segment_texts(tokenizer, [text for text, _ in segments])]
    total, kept = lengths[0] + lengths[-1], 0
    for index in range(len(candidates) - 1, -1, -1):
        turn = lengths[1 + 2 * index] + lengths[2 + 2 * index]
        if total + turn > budget:
            break
        total, kept = total + turn, kept + 1
    n = len(candidates)
    ids = encode_prompt(tokenizer, candidates[n - kept:], query, meta_prompt)
    while kept > 0 and len(ids) > budget:
        kept -= 1
        ids = encode_prompt(tokenizer, candidates[n - kept:], query, meta_prompt)
    while kept < n:
        more = encode_prompt(tokenizer, candidates[n - kept - 1:], query, meta_prompt)
        if len(more) > budget:
            break
        kept, ids = kept + 1, more
    return kept, ids


def build_prompt(tokenizer, history, query, memory_limit=config.MEMORY_LIMIT, context_length=2048,
                 max_new_tokens=config.GENERATION["max_new_tokens"], meta_prompt=None, cut_query=True):
    """The Prompt for ``query`` after ``history``: at most ``memory_limit`` recent turns (None: no
    limit, 0: none), and no more than fit ``context_length - max_new_tokens`` tokens.
    ``meta_prompt`` replaces config.META_PROMPT when given.  A query too long even without history
    is cut (its beginning kept, with a notice), or with ``cut_query=False`` refused (ContextError)."""
    budget = context_length - max_new_tokens
    if budget <= 0:
        raise ContextError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                           f"of {context_length} tokens; lower --max_new_tokens")
    history = list(history)
    if memory_limit is not None:
        history = history[-memory_limit:] if memory_limit > 0 else []
    # every turn takes at least two tokens (question template, end marker): older ones cannot fit
    history = history[max(0, len(history) - budget // 2):]
    ids = encode_prompt(tokenizer, history, query, meta_prompt)
    if len(ids) <= budget:
        return Prompt(ids, len(history), query, False)

    notices = []
    kept, ids = _turns_that_fit(tokenizer, history, query, budget, meta_prompt) if history else (0, ids)
    if kept < len(history):
        notices.append(f"dropped the {len(history) - kept} oldest turn(s) of history to fit the context "
                       f"({context_length} tokens, {max_new_tokens} kept for the answer)")
    if len(ids) <= budget:
        return Prompt(ids, kept, query, False, notices)

    if not cut_query:
        raise ContextError(f"the prompt takes {len(ids)} tokens even without history; with {max_new_tokens} "
                           f"kept for the answer the model's context of {context_length} tokens holds at most "
                           f"{budget}: shorten the query (or the system prompt) or lower max_new_tokens")
    # the query alone is too long: keep its longest beginning that fits
    if len(encode_prompt(tokenizer, [], "", meta_prompt)) > budget:
        raise ContextError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                           f"of {context_length} tokens; lower --max_new_tokens")
    low, high = 0, len(query)   # encode(query[:low]) fits, encode(query[:high + 1]) does not
    while low < high:
        mid = (low + high + 1) // 2
        if len(encode_prompt(tokenizer, [], query[:mid], meta_prompt)) <= budget:
            low = mid
        else:
            high = mid - 1
    cut = query[:low]
    notices.append(f"the query is too long for the context ({context_length} tokens, {max_new_tokens} kept for "
                   f"the answer): only its first {low} of {len(query)} characters are used")
    return Prompt(encode_prompt(tokenizer, [], cut, meta_prompt), 0, cut, True, notices)


# ----------------------------------------------------------------------------------------------
# generation: stop criteria, streaming, one reply
# ----------------------------------------------------------------------------------------------
class StopAtMarkerOrCancel(StoppingCriteria):
    """True once the generated text holds the end marker (one special token after full fine-tuning,
    several pieces with LoRA on the base vocabulary) or ``cancel`` (a threading.Event) is set."""

    def __init__(self, tokenizer, prompt_length, cancel, window=16):
        self.tokenizer, self.prompt_length, self.cancel, self.window = tokenizer, prompt_length, cancel, window

    def __call__(self, input_ids, scores, **kwargs):
        if self.cancel.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tail = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        return torch.tensor([config.END_MARKER in t for t in texts], dtype=torch.bool, device=input_ids.device)


def _held_back(text):
    """Length of the end of ``text`` that may still grow into a marker, a whole character or
    trailing space: it is not streamed yet."""
    if text.endswith("\ufffd"):  # an incomplete UTF-8 character (byte-fallback pieces)
        return len(text)
    hold = 0
    for marker in (config.END_MARKER,) + STRIPPED_TEXTS:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-size:]):
                hold = max(hold, size)
                break
    rest = text[:len(text) - hold]
    return hold + (len(rest) - len(rest.rstrip()))


def next_piece(text, streamed):
    """The text to stream next, given the whole decoded ``text`` generated so far and what was
    ``streamed`` already: nothing once the end marker shows (the rest is sent at the end), nor an end
    that may still grow into a marker, a whole character or trailing space; '<s>' / '</s>' removed."""
    if config.END_MARKER in text:
        return ""
    safe = text[:len(text) - _held_back(text)]
    for marker in STRIPPED_TEXTS:
        safe = safe.replace(marker, "")
    safe = safe.lstrip()
    if safe.startswith(streamed) and len(safe) > len(streamed):
        return safe[len(streamed):]
    return ""


def finish_reason(text, generated, eos_ids, max_new_tokens, cancelled):
    """Why an answer ended: "stop" (end marker or an eos id), "length" (max_new_tokens) or "cancelled"."""
    if cancelled and config.END_MARKER not in text:
        return "cancelled"
    if config.END_MARKER in text or (generated and generated[-1] in eos_ids):
        return "stop"
    return "length" if len(generated) >= max_new_tokens else "stop"


def stop_token_ids(tokenizer):
    """Token ids that end an answer: eos, '<s>' (the seed's stop token) and the end marker when
    it is one token."""
    ids = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    marker = tokenizer.convert_tokens_to_ids(config.END_MARKER)
    if marker is not None and marker != tokenizer.unk_token_id:
        ids.append(marker)
    return sorted({i for i in ids if i is not None})


def generate_kwargs(settings, tokenizer):
    """model.generate arguments for ``settings`` (see generation_settings)."""
    kwargs = {
        "max_new_tokens": int(settings["max_new_tokens"]),
        "min_new_tokens": 1,   # the seed's min_length = prompt + 1
        "repetition_penalty": float(settings["repetition_penalty"]),
        "do_sample": bool(settings["do_sample"]),
        "eos_token_id": stop_token_ids(tokenizer),
        "stop_strings": None,   # a directory's stop_strings are for engines: StopAtMarkerOrCancel stops here
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
                      top_k=int(settings["top_k"]))
    return kwargs


@dataclass
class TurnResult:
    query: str                # the query as asked
    response: str             # the answer, markers stripped
    history_used: int         # history turns fed with the query
    prompt_tokens: int
    new_tokens: int
    finish_reason: str        # "stop" (end marker / eos), "length" (max_new_tokens), "cancelled"
    query_truncated: bool = False
    notices: list = field(default_factory=list)


class _ReplyStreamer(BaseStreamer):
    """Hands the tokens generate() produces to a Reply (in the generation thread)."""

    def __init__(self, reply):
        self.reply, self.first = reply, True

    def put(self, value):
        if self.first:  # generate() first hands over the prompt
            self.first = False
            return
        self.reply._on_tokens(value.reshape(-1).tolist())

    def end(self):
        pass


class Reply:
    """One answer being generated.  Iterate for text pieces as they are produced (their
    concatenation is the final response); ``cancel()`` from any thread stops the generation at
    the next token; ``result()`` waits for the end and returns the TurnResult.  A Chat records the
    turn in its history when the iteration ends or ``result()`` is called.  ``generate_overrides``
    replaces generate() arguments (bench_infer.py forces the answer length with min_new_tokens)."""

    def __init__(self, model, tokenizer, prepared, settings, query, on_done=None, generate_overrides=None):
        self.tokenizer, self.prepared, self.query, self.on_done = tokenizer, prepared, query, on_done
        self.cancelled = threading.Event()
        self._pieces = queue.Queue()
        self._generated = []
        self._streamed = ""
        self._result = None
        self._error = None
        self._done = threading.Event()
        kwargs = dict(generate_kwargs(settings, tokenizer), **(generate_overrides or {}))
        self._max_new_tokens = kwargs["max_new_tokens"]
        self._eos = set(kwargs["eos_token_id"])
        input_ids = torch.tensor([prepared.input_ids], dtype=torch.long, device=input_device(model))
        criteria = StopAtMarkerOrCancel(tokenizer, input_ids.shape[1], self.cancelled)
        generate_args = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             streamer=_ReplyStreamer(self), stopping_criteria=StoppingCriteriaList([criteria]), **kwargs)
        generation_worker.submit(lambda: self._run(model, generate_args))

    # -- generation (on the worker thread) -----------------------------------------------------
    def _run(self, model, kwargs):
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # handed to the consumer
            self._error = e
        finally:
            self._pieces.put(None)
            self._done.set()

    def _on_tokens(self, ids):
        self._generated.extend(ids)
        piece = next_piece(self.tokenizer.decode(self._generated, skip_special_tokens=False), self._streamed)
        if piece:
            self._pieces.put(piece)
            self._streamed += piece

    # -- consumer side -------------------------------------------------------------------------
    def __iter__(self):
        while True:
            piece = self._pieces.get()
            if piece is None:
                break
            yield piece
        result = self.result()
        if result.response.startswith(self._streamed) and len(result.response) > len(self._streamed):
            tail = result.response[len(self._streamed):]
            self._streamed = result.response
            yield tail

    def cancel(self):
        self.cancelled.set()

    def result(self):
        """Wait for the generation to end; the TurnResult (raises what the generation raised)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        if self._result is None:
            text = self.tokenizer.decode(self._generated, skip_special_tokens=False)
            reason = finish_reason(text, self._generated, self._eos, self._max_new_tokens, self.cancelled.is_set())
            p = self.prepared
            self._result = TurnResult(self.query, clean_response(text), p.history_used, len(p.input_ids),
                                      len(self._generated), reason, p.query_truncated, list(p.notices))
            if self.on_done is not None:
                self.on_done(self._result)
        return self._result


def start_reply(model, tokenizer, history, query, settings=None, memory_limit=config.MEMORY_LIMIT,
                context_length=None, on_done=None, meta_prompt=None):
    """Stateless: a Reply to ``query`` after ``history`` (list of (query, response)).  What an
    HTTP front end that receives the whole conversation with each request calls; ``meta_prompt``
    replaces config.META_PROMPT when given."""
    settings = settings or generation_settings()
    prepared = build_prompt(tokenizer, history, query, memory_limit,
                            context_length or context_length_of(model, tokenizer), int(settings["max_new_tokens"]),
                            meta_prompt=meta_prompt)
    return Reply(model, tokenizer, prepared, settings, query, on_done)


class Chat:
    """A conversation with a loaded model: keeps (query, response) history across turns."""

    def __init__(self, model, tokenizer, settings=None, memory_limit=config.MEMORY_LIMIT, context_length=None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or generation_settings()
        self.memory_limit = memory_limit
        self.context_length = context_length or context_length_of(model, tokenizer)
        if int(self.settings["max_new_tokens"]) >= self.context_length:
            raise ChatError(f"max_new_tokens {self.settings['max_new_tokens']} fills the model's whole context of "
                            f"{self.context_length} tokens; lower --max_new_tokens")
        if memory_limit is not None and memory_limit < 0:
            raise ChatError(f"memory_limit {memory_limit}: must be 0 or more (None: no limit)")
        self.history = []
        self.current = None

    def clear(self):
        self.history = []

    def prepare(self, query):
        """The Prompt the next turn would feed (nothing is generated)."""
        return build_prompt(self.tokenizer, self.history, query, self.memory_limit, self.context_length,
                            int(self.settings["max_new_tokens"]))

    def stream(self, query):
        """Start answering ``query``; returns a Reply.  When it ends (also when cancelled) the turn
        (as fed: the query cut if it had to be) joins the history."""
        def remember(result):
            self.history.append((prepared.query, result.response))
            if self.memory_limit is not None:   # older turns are never fed back: don't keep them
                self.history = self.history[-self.memory_limit:] if self.memory_limit else []

        prepared = self.prepare(query)
        self.current = Reply(self.model, self.tokenizer, prepared, self.settings, query, on_done=remember)
        return self.current

    def ask(self, query):
        """Answer ``query`` (blocking); the TurnResult."""
        return self.stream(query).result()

    def cancel(self):
        """Stop the answer being generated, if any (safe from any thread)."""
        if self.current is not None:
            self.current.cancel()
