"""The OpenAI wire format of the API server: errors, request fields checked and turned into generation
settings (through chat.user_settings, as inference.py and the web demo), the prompts of
/v1/completions, OpenAI's context-length error, stop strings, and the shapes of answers and streamed
chunks.  No HTTP framework here: api_server.py wires these into FastAPI.

What is and is not supported is decided here, field by field: a field OpenAI does not know, or one this
server cannot honour (logprobs, tools, penalties other than repetition_penalty ...), is a 400 naming it
(error.param), never silently ignored.
"""
import json
import time
from dataclasses import dataclass, replace

import chat
import config

CHAT, COMPLETION = "chat.completion", "text_completion"   # the two kinds of answer (their "object")

# ----------------------------------------------------------------------------------------------
# errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}
# ----------------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, retry_after=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after   # seconds: a Retry-After header (429)

    def headers(self):
        return {"Retry-After": str(int(self.retry_after))} if self.retry_after is not None else None

    def body(self):
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message, param=None, code=None):
    return ApiError(400, message, param, code)


# ----------------------------------------------------------------------------------------------
# request fields -> generation settings
# ----------------------------------------------------------------------------------------------
def _number(body, name, low, high=None, low_open=False, integer=False):
    """body[name] checked against [low, high] ((low, high] with low_open); None when absent."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad_request(f"{name} must be {kind}", name)
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bound = f"above {low}" if low_open else f"at least {low}"
        raise bad_request(f"{name} {value} is out of range: it must be {bound}"
                          + (f" and at most {high}" if high else ""), name)
    return value


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise bad_request("stop must be a string or a list of at most 4 strings", "stop")
    return [s for s in stops if s]


# Fields each endpoint accepts.  Any other is refused as OpenAI refuses it ("Unrecognized request
# argument supplied"); a known field this server cannot honour is refused unless it has its "off" value.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "n",
           "stream", "stream_options", "user", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
KNOWN_FIELDS = {
    CHAT: _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                     "function_call", "parallel_tool_calls", "response_format", "modalities", "audio", "prediction",
                     "reasoning_effort", "verbosity", "web_search_options", "store", "metadata", "service_tier",
                     "safety_identifier", "prompt_cache_key"},
    COMPLETION: _COMMON | {"prompt", "echo", "suffix", "best_of"},
}
# accepted and ignored: they label the request for the caller's bookkeeping and never change the answer
# (user, metadata, service_tier, safety_identifier, prompt_cache_key, parallel_tool_calls without tools)


def _off(*values):
    """A test that a field's value is None or one of ``values`` (same type: 0 is not False)."""
    return lambda value: value is None or any(type(value) is type(v) and value == v for v in values)


_NO_TOOLS = "CuteGPT was not trained for tool calls"
UNSUPPORTED = {   # field: (its values that are accepted, why any other is refused)
    "logprobs": (_off(False), "this server does not return token log probabilities"),
    "top_logprobs": (_off(0), "this server does not return token log probabilities"),
    "presence_penalty": (_off(0, 0.0), "use repetition_penalty (accepted, as vLLM does) instead"),
    "frequency_penalty": (_off(0, 0.0), "use repetition_penalty (accepted, as vLLM does) instead"),
    "logit_bias": (_off({}), "token biases cannot be set on this server"),
    "tools": (_off([]), _NO_TOOLS), "functions": (_off([]), _NO_TOOLS),
    "tool_choice": (_off("none"), _NO_TOOLS), "function_call": (_off("none"), _NO_TOOLS),
    "response_format": (_off({"type": "text"}), "only {'type': 'text'}: nothing holds the model to a JSON format"),
    "modalities": (_off(["text"]), "the model reads and writes text only"),
    "audio": (_off(), "the model reads and writes text only"),
    "prediction": (_off(), "predicted outputs are not used by this server"),
    "reasoning_effort": (_off(), "CuteGPT is not a reasoning model"),
    "verbosity": (_off(), "the answer's length is set with max_tokens"),
    "web_search_options": (_off(), "the server has no web search"),
    "store": (_off(False), "this server stores no completions"),
    "suffix": (_off(""), "the model cannot insert text before a suffix"),
}


def check_fields(body, kind):
    """Refuse the fields ``kind``'s endpoint does not know and those set to what it cannot do."""
    for name in body:
        if name not in KNOWN_FIELDS[kind]:
            raise bad_request(f"Unrecognized request argument supplied: {name} (this server's fields are listed in "
                              f"docs/serving.md)", name)
    for name, (accepted, why) in UNSUPPORTED.items():
        if name in body and not accepted(body[name]):
            raise bad_request(f"{name}={json.dumps(body[name], ensure_ascii=False)[:60]} is not supported by this "
                              f"server: {why}", name)


@dataclass
class GenerationRequest:
    settings: dict         # chat.generation_settings
    stops: list            # stop strings (not included in the answer)
    seed: object           # int or None
    stream: bool
    include_usage: bool
    n: int = 1             # answers per prompt
    echo: bool = False     # /v1/completions: the prompt is sent before its completion

    def for_choice(self, index):
        """The request of choice ``index``: a seed gives each choice its own (seed + index), so that n
        samples differ yet repeat with the same seed.  Folded into numpy's seed range, 0 to 2**32 - 1."""
        return replace(self, seed=None if self.seed is None else (self.seed + index) % 2 ** 32)


def _settings(body, defaults, max_tokens_fields):
    """The sampling fields, checked in order; an absent field keeps the server's default."""
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    top_k = _number(body, "top_k", 0, integer=True)   # top_k and repetition_penalty: not in OpenAI's API,
    penalty = _number(body, "repetition_penalty", 0, low_open=True)   # accepted as vLLM and others do
    max_new_tokens = None
    for name in max_tokens_fields:
        max_new_tokens = _number(body, name, 0, low_open=True, integer=True)
        if max_new_tokens is not None:
            break
    return chat.user_settings(defaults, temperature, top_p, top_k, penalty, max_new_tokens)


def _stream_fields(body):
    """(stream, include_usage); stream_options only with stream=true, as OpenAI requires."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad_request("stream_options is only allowed with stream=true (leave it out, or set stream to true)",
                          "stream_options")
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    for name, value in options.items():
        if name != "include_usage":
            raise bad_request(f"stream_options.{name} is not supported: only include_usage is",
                              f"stream_options.{name}")
        if value is not None and not isinstance(value, bool):
            raise bad_request("stream_options.include_usage must be true or false", "stream_options.include_usage")
    return stream, bool(options.get("include_usage"))


def generation_request(body, defaults, kind=CHAT):
    """The generation part of a request, checked.  temperature 0 means greedy; an absent field keeps
    the server's default (config.GENERATION, or config.DEMO['generation'] with --demo)."""
    check_fields(body, kind)
    settings = _settings(body, defaults, ("max_completion_tokens", "max_tokens") if kind == CHAT else ("max_tokens",))
    n = _number(body, "n", 1, config.SERVER["max_choices"], integer=True) or 1
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad_request(f"best_of {best_of!r} is not supported: this server does not rank candidates, so best_of "
                          f"must equal n ({n}) or be left out", "best_of")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request("seed must be an integer", "seed")
    echo = body.get("echo", False)
    echo = False if echo is None else echo
    if not isinstance(echo, bool):
        raise bad_request("echo must be true or false", "echo")
    stream, include_usage = _stream_fields(body)
    return GenerationRequest(settings, _stops(body), seed, stream, include_usage, n, echo)


# ----------------------------------------------------------------------------------------------
# /v1/completions prompts, and OpenAI's context-length error
# ----------------------------------------------------------------------------------------------
def _token_ids(value):
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def completion_prompts(value, vocab_size):
    """The prompts of /v1/completions, as OpenAI takes them: a string, a list of strings, a list of
    token ids or a list of token-id lists.  Returns a list whose items are strings or id lists."""
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and _token_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and (all(isinstance(p, str) for p in value)
                                                or all(_token_ids(p) for p in value)):
        prompts = value
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                          "token ids, not empty", "prompt")
    for index, one in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        if not one:
            raise bad_request(f"{where} is empty: give it some text or token ids", "prompt")
        wrong = [t for t in one if not 0 <= t < vocab_size] if isinstance(one, list) else []
        if wrong:
            raise bad_request(f"{where} holds the token id {wrong[0]}, outside the model's vocabulary (0 to "
                              f"{vocab_size - 1})", "prompt")
    limit = config.SERVER["max_choices"]
    if len(prompts) > limit:
        raise bad_request(f"{len(prompts)} prompts are more than this server answers in one request ({limit}); "
                          f"send them in several requests", "prompt")
    return prompts


def check_choices(prompt_count, n):
    limit = config.SERVER["max_choices"]
    if prompt_count * n > limit:
        raise bad_request(f"{prompt_count} prompts x n={n} ask for {prompt_count * n} answers, more than this "
                          f"server gives in one request ({limit}); lower n or send fewer prompts", "n")


def context_error(kind, context_length, prompt_tokens, completion_tokens):
    """A prompt that cannot fit the context with max_tokens after it, in OpenAI's words and code (client
    libraries recognise both): its chat wording, and its legacy completions wording."""
    total = prompt_tokens + completion_tokens
    if kind == CHAT:
        message = (f"This model's maximum context length is {context_length} tokens. However, you requested "
                   f"{total} tokens ({prompt_tokens} in the messages, {completion_tokens} in the completion). "
                   f"Please reduce the length of the messages or completion.")
        return bad_request(message, "messages", "context_length_exceeded")
    message = (f"This model's maximum context length is {context_length} tokens, however you requested {total} "
               f"tokens ({prompt_tokens} in your prompt; {completion_tokens} for the completion). Please reduce "
               f"your prompt; or completion length.")
    return bad_request(message, "prompt", "context_length_exceeded")


class StopText:
    """Cuts streamed text at the first stop string; holds back an end that may begin one."""

    def __init__(self, stops):
        self.stops, self.text, self.sent, self.hit = list(stops), "", 0, False

    def feed(self, piece):
        self.text += piece
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            self.text = self.text[:min(cuts)]
            return self.flush()
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if stop.startswith(self.text[-size:]):
                    hold = max(hold, size)
                    break
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self):
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# ----------------------------------------------------------------------------------------------
# answers: one JSON object, or server-sent events (chat.completion / text_completion)
# ----------------------------------------------------------------------------------------------
def usage(prompt_tokens, outcomes):
    """``prompt_tokens``: each prompt counted once (n answers to one prompt read it once)."""
    completion_tokens = sum(outcome.completion_tokens for outcome in outcomes)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(kind, text, finish_reason, first=False, index=0):
    """One streamed choice (a chat delta; ``text`` None: an empty delta), or a text completion's choice."""
    if kind == CHAT:
        delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text is not None else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def whole_answer(kind, ident, model_name, texts, outcomes, prompt_tokens):
    """The non-streamed answer object: one choice per text, in order (index = prompt index x n + k)."""
    if kind == CHAT:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": outcome.finish_reason} for i, (text, outcome) in enumerate(zip(texts, outcomes))]
    else:
        choices = [choice(kind, text, outcome.finish_reason, index=i)
                   for i, (text, outcome) in enumerate(zip(texts, outcomes))]
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage(prompt_tokens, outcomes)}


def sse(kind, ident, model_name, include_usage, choices, **extra):
    """One server-sent event holding a chunk (``usage: null`` on every chunk when the client asked for usage)."""
    chunk = {"id": ident, "object": kind + ".chunk" if kind == CHAT else kind,
             "created": int(time.time()), "model": model_name, "choices": choices, **extra}
    if include_usage and "usage" not in extra:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def sse_error(error):
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
