"""The OpenAI wire format of the API server: errors, request fields checked and turned into generation
settings (through chat.user_settings, as inference.py and the web demo), stop strings, and the shapes of
answers and streamed chunks.  No HTTP framework here: api_server.py wires these into FastAPI.
"""
import json
import time
from dataclasses import dataclass

import chat

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


@dataclass
class GenerationRequest:
    settings: dict         # chat.generation_settings
    stops: list            # stop strings (not included in the answer)
    seed: object           # int or None
    stream: bool
    include_usage: bool


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


def generation_request(body, defaults, max_tokens_fields):
    """The generation part of a request, checked.  temperature 0 means greedy; an absent field keeps
    the server's default (config.GENERATION, or config.DEMO['generation'] with --demo)."""
    settings = _settings(body, defaults, max_tokens_fields)
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported (one answer per request)", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request("seed must be an integer", "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    if body.get("logprobs") or body.get("top_logprobs") or body.get("echo"):
        name = next(n for n in ("logprobs", "top_logprobs", "echo") if body.get(n))
        raise bad_request(f"{name} is not supported by this server", name)
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools/functions are not supported: CuteGPT was not trained for tool calls", "tools")
    return GenerationRequest(settings, _stops(body), seed, stream, bool(options.get("include_usage")))


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
def usage(outcome):
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def choice(kind, text, finish_reason, first=False):
    """One streamed choice (a chat delta; ``text`` None: an empty delta), or a text completion's choice."""
    if kind == "chat.completion":
        delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text is not None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def whole_answer(kind, ident, model_name, text, outcome):
    """The non-streamed answer object."""
    if kind == "chat.completion":
        first = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": outcome.finish_reason}
    else:
        first = choice(kind, text, outcome.finish_reason)
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model_name,
            "choices": [first], "usage": usage(outcome)}


def sse(kind, ident, model_name, include_usage, choices, **extra):
    """One server-sent event holding a chunk (``usage: null`` on every chunk when the client asked for usage)."""
    chunk = {"id": ident, "object": kind + ".chunk" if kind == "chat.completion" else kind,
             "created": int(time.time()), "model": model_name, "choices": choices, **extra}
    if include_usage and "usage" not in extra:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def sse_error(error):
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
