"""An OpenAI-compatible HTTP API for CuteGPT (FastAPI on uvicorn).

    # the published model (base + LoRA, int8 on a GPU), on http://127.0.0.1:8000/v1
    python code/api_server.py

    # the offline toy model, nothing to download (built and cached the first time, as inference.py --demo)
    python code/api_server.py --demo

    # the fast path (as inference.py --fast: static KV cache, compiled decoding step, torchao int8)
    python code/api_server.py --fast --quant int8

    # your own checkpoint, another port, and a key every request must bring (Authorization: Bearer KEY)
    python code/api_server.py --model_path MODEL_DIR --lora_path ckp/llama_lora/llama_lora_epoch3 \\
        --port 8001 --api_key KEY

    # then, from any OpenAI client:
    #   from openai import OpenAI
    #   client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything without --api_key")
    #   client.chat.completions.create(model="cutegpt", messages=[{"role": "user", "content": "你好"}])

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
The model flags are inference.py's (model_loader.add_model_arguments).  Chat messages become a
CuteGPT prompt through prompt.split_messages and chat.build_prompt, the code inference.py and
training use: a system message replaces the meta prompt, user/assistant pairs are the history.

One generation runs at a time; other requests wait in a FIFO queue (at most
config.SERVER['max_waiting'], beyond that 429).  A client that disconnects gives up its place in
the queue, or stops its generation at the next token.  Defaults: config.SERVER and config.GENERATION.
"""
import argparse
import asyncio
import copy
import hmac
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

CODE = os.path.dirname(os.path.abspath(__file__))
if CODE not in sys.path:
    sys.path.insert(0, CODE)

import config  # noqa: E402
import data_io  # noqa: E402
import model_loader  # noqa: E402
from data_io import DataError  # noqa: E402


# ----------------------------------------------------------------------------------------------
# errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}
# ----------------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _bad(message, param=None, code=None):
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
        raise _bad(f"{name} must be {kind}", name)
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bound = f"above {low}" if low_open else f"at least {low}"
        raise _bad(f"{name} {value} is out of range: it must be {bound}" + (f" and at most {high}" if high else ""),
                   name)
    return value


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise _bad("stop must be a string or a list of at most 4 strings", "stop")
    return [s for s in stops if s]


@dataclass
class GenerationRequest:
    settings: dict         # chat.generation_settings
    stops: list            # stop strings (not included in the answer)
    seed: object           # int or None
    stream: bool
    include_usage: bool


def generation_request(body, defaults, max_tokens_fields):
    """The generation part of a request, checked.  temperature 0 means greedy; an absent field keeps
    the server's default (config.GENERATION, or config.DEMO['generation'] with --demo)."""
    settings = dict(defaults)
    temperature = _number(body, "temperature", 0, 2)
    if temperature is not None:
        settings["do_sample"] = temperature > 0
        if temperature > 0:
            settings["temperature"] = float(temperature)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    if top_p is not None:
        settings["top_p"] = float(top_p)
    # not in OpenAI's API, as vLLM and others accept them
    top_k = _number(body, "top_k", 0, integer=True)
    if top_k is not None:
        settings["top_k"] = top_k
    penalty = _number(body, "repetition_penalty", 0, low_open=True)
    if penalty is not None:
        settings["repetition_penalty"] = float(penalty)
    for name in max_tokens_fields:
        value = _number(body, name, 0, low_open=True, integer=True)
        if value is not None:
            settings["max_new_tokens"] = value
            break
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("only n=1 is supported (one answer per request)", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer", "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    if body.get("logprobs") or body.get("top_logprobs") or body.get("echo"):
        name = next(n for n in ("logprobs", "top_logprobs", "echo") if body.get(n))
        raise _bad(f"{name} is not supported by this server", name)
    if body.get("tools") or body.get("functions"):
        raise _bad("tools/functions are not supported: CuteGPT was not trained for tool calls", "tools")
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
# the queue and the one generation thread
# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    finish_reason: str      # stop, length, cancelled
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated (the end marker among them)


class Job:
    """One request's generation.  The worker thread sends events to the request's event loop:
    ('text', str), then ('done', Outcome) or ('error', exception)."""

    def __init__(self, prepared, request, loop):
        self.prepared, self.request, self.loop = prepared, request, loop
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reply = None
        self._lock = threading.Lock()

    def emit(self, kind, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:   # the event loop is gone (server shutting down)
            pass

    def attach(self, reply):
        with self._lock:
            self.reply = reply
            if self.cancelled.is_set():
                reply.cancel()

    def cancel(self):
        """Safe from any thread, at any time (also after the end)."""
        with self._lock:
            self.cancelled.set()
            if self.reply is not None:
                self.reply.cancel()


class Engine:
    """Runs queued Jobs one at a time in a worker thread, in arrival order."""

    def __init__(self, model, tokenizer, max_waiting):
        self.model, self.tokenizer, self.max_waiting = model, tokenizer, max_waiting
        self.jobs = queue.Queue()
        self.state = threading.Lock()
        self.waiting, self.busy = 0, False
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}
        threading.Thread(target=self._work, name="cutegpt-generation", daemon=True).start()

    def check_room(self):
        with self.state:
            if self.waiting >= self.max_waiting:
                raise ApiError(429, f"the server is busy: {self.waiting} requests are already waiting; retry later",
                               code="server_busy")

    def submit(self, job):
        with self.state:
            self.waiting += 1
        self.jobs.put(job)

    def status(self):
        with self.state:
            return {"waiting": self.waiting, "busy": self.busy, **self.counts}

    def _work(self):
        while True:
            job = self.jobs.get()
            with self.state:
                self.waiting -= 1
                self.busy = True
            try:
                outcome = self._generate(job)
                key = "failed" if outcome is None else ("cancelled" if job.cancelled.is_set() else "finished")
            except BaseException as e:   # never let the worker die
                job.emit("error", e)
                key = "failed"
            with self.state:
                self.busy = False
                self.counts[key] += 1

    def _generate(self, job):
        import chat

        if job.cancelled.is_set():   # the client left while waiting
            job.emit("done", Outcome("cancelled", len(job.prepared.input_ids), 0))
            return Outcome("cancelled", len(job.prepared.input_ids), 0)
        if job.request.seed is not None:
            from transformers import set_seed

            set_seed(job.request.seed)
        reply = chat.Reply(self.model, self.tokenizer, job.prepared, job.request.settings, job.prepared.query)
        job.attach(reply)
        stopper = StopText(job.request.stops)
        try:
            for piece in reply:
                text = stopper.feed(piece)
                if text:
                    job.emit("text", text)
                if stopper.hit:
                    reply.cancel()
                    break
            result = reply.result()
        except Exception as e:
            job.emit("error", e)
            return None
        reason = "stop" if stopper.hit else result.finish_reason
        outcome = Outcome(reason, result.prompt_tokens, result.new_tokens)
        job.emit("done", outcome)
        return outcome


# ----------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------
def create_app(model, tokenizer, model_name=config.SERVER["model_name"], api_key=None,
               memory_limit=config.MEMORY_LIMIT, defaults=None, max_waiting=config.SERVER["max_waiting"],
               poll_s=config.SERVER["disconnect_poll_s"]):
    """The FastAPI app serving ``model``.  ``defaults``: chat.generation_settings for fields a
    request leaves out (config.GENERATION when None)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import chat
    import prompt

    defaults = dict(defaults or chat.generation_settings())
    context_length = chat.context_length_of(model, tokenizer)
    engine = Engine(model, tokenizer, max_waiting)
    # prompts are tokenized in request threads while the generation thread decodes: each side has
    # its own copy of the tokenizer, and request threads take turns on theirs
    request_tokenizer, tokenizer_lock = copy.deepcopy(tokenizer), threading.Lock()
    created = int(time.time())
    app = FastAPI(title="CuteGPT API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request, error):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, error):
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}").body(), status_code=500)

    def check_key(request):
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                                "the server was started with (--api_key)", code="invalid_api_key")

    async def json_body(request):
        check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON ({e})", code="invalid_json")
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model_asked = body.get("model")
        if model_asked is not None and model_asked != model_name:
            raise ApiError(404, f"the model {model_asked!r} does not exist here: this server serves {model_name!r} "
                                f"(see GET /v1/models)", "model", "model_not_found")
        return body

    async def tokenized(function, *args, **kwargs):
        def run():
            with tokenizer_lock:
                return function(request_tokenizer, *args, **kwargs)
        return await asyncio.to_thread(run)

    async def events(job, request):
        """The job's events; on return, failure or cancellation (client gone) the job is cancelled."""
        engine.submit(job)
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), poll_s)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield kind, payload
                if kind != "text":
                    return
        finally:
            job.cancel()

    def usage(outcome):
        return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}

    async def respond(request, job, kind, ident):
        """Non-streamed: one JSON object; streamed: server-sent events ending with [DONE]."""
        chat_api = kind == "chat.completion"
        engine.check_room()   # a full queue answers 429 before any streaming starts

        def choice(text, finish_reason, first=False):
            if chat_api:
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text is not None else {}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        if not job.request.stream:
            parts, outcome = [], None
            async for event, payload in events(job, request):
                if event == "text":
                    parts.append(payload)
                elif event == "error":
                    raise ApiError(500, f"generation failed: {type(payload).__name__}: {payload}")
                else:
                    outcome = payload
            if outcome is None:   # the client went away
                return JSONResponse(ApiError(499, "client closed the request").body(), status_code=499)
            text = "".join(parts)
            if chat_api:
                first = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": outcome.finish_reason}
            else:
                first = choice(text, outcome.finish_reason)
            return JSONResponse({"id": ident, "object": kind, "created": int(time.time()), "model": model_name,
                                 "choices": [first], "usage": usage(outcome)})

        chunk_kind = kind + ".chunk" if chat_api else kind
        include_usage = job.request.include_usage

        def sse(choices, **extra):
            chunk = {"id": ident, "object": chunk_kind, "created": int(time.time()), "model": model_name,
                     "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def stream():
            if chat_api:
                yield sse([choice("", None, first=True)])
            async for event, payload in events(job, request):
                if event == "text":
                    yield sse([choice(payload, None)])
                elif event == "error":
                    error = ApiError(500, f"generation failed: {type(payload).__name__}: {payload}")
                    yield f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
                    break
                else:
                    yield sse([choice(None if chat_api else "", payload.finish_reason)])
                    if include_usage:
                        yield sse([], usage=usage(payload))
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def context_error(e):
        return _bad(str(e).replace("--max_new_tokens", "max_tokens").replace("max_new_tokens", "max_tokens"),
                    "messages", "context_length_exceeded")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        try:
            meta_prompt, history, query = prompt.split_messages(body.get("messages"))
        except prompt.MessageError as e:
            raise _bad(str(e), e.param)
        wanted = generation_request(body, defaults, ("max_completion_tokens", "max_tokens"))
        try:
            prepared = await tokenized(chat.build_prompt, history, query, memory_limit, context_length,
                                       int(wanted.settings["max_new_tokens"]), meta_prompt=meta_prompt,
                                       cut_query=False)
        except chat.ContextError as e:
            raise context_error(e)
        job = Job(prepared, wanted, asyncio.get_running_loop())
        return await respond(request, job, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
            text = text[0]
        if not isinstance(text, str) or not text:
            raise _bad("prompt must be a non-empty string (one prompt per request)", "prompt")
        wanted = generation_request(body, defaults, ("max_tokens",))
        ids = (await tokenized(prompt.tokenize_segment_texts, [text]))[0]
        budget = context_length - int(wanted.settings["max_new_tokens"])
        if len(ids) > budget:
            raise _bad(f"the prompt takes {len(ids)} tokens; with max_tokens {wanted.settings['max_new_tokens']} "
                       f"the model's context of {context_length} tokens holds at most {max(budget, 0)}: shorten "
                       f"the prompt or lower max_tokens", "prompt", "context_length_exceeded")
        job = Job(chat.Prompt(ids, 0, text, False), wanted, asyncio.get_running_loop())
        return await respond(request, job, "text_completion", f"cmpl-{uuid.uuid4().hex}")

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "cutegpt"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str, request: Request):
        check_key(request)
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist here: this server serves {model_name!r}",
                           "model", "model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        """Liveness and queue state; open without the API key (it tells nothing about the data)."""
        return {"status": "ok", "model": model_name, **engine.status()}

    return app


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_listen_arguments(p, port, host_note, memory_help):
    """--host, --port and --memory_limit: shared by this server and web_demo.py."""
    p.add_argument("--host", default=config.SERVER["host"],
                   help=f"address to listen on (default: %(default)s, this machine only; 0.0.0.0 serves the "
                        f"network{host_note})")
    p.add_argument("--port", type=int, default=port, help="port (default: %(default)s)")
    p.add_argument("--memory_limit", type=int, default=config.MEMORY_LIMIT, help=memory_help)


def check_listen_arguments(p, args):
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port}: must be 1 to 65535")
    if args.memory_limit < 0:
        p.error("--memory_limit must be 0 (no history) or more")


def parse_args(argv=None):
    s = config.SERVER
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_loader.add_model_arguments(p)
    add_listen_arguments(p, s["port"], ": give --api_key then",
                         "earlier (user, assistant) turns of a request fed to the model, 0 = none "
                         "(default: %(default)s, as inference.py)")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 request (default: no key)")
    p.add_argument("--model_name", default=s["model_name"],
                   help="model id that /v1/models lists and requests give as 'model' (default: %(default)s)")
    p.add_argument("--max_waiting", type=int, default=s["max_waiting"],
                   help="requests that may wait for the model; more get 429 (default: %(default)s)")
    args = p.parse_args(argv)
    model_loader.check_model_arguments(p, args)
    check_listen_arguments(p, args)
    if args.max_waiting < 1:
        p.error("--max_waiting must be 1 or more")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api_key must not be empty (leave it out to serve without a key)")
    if not args.model_name.strip():
        p.error("--model_name must not be empty")
    return args


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host, port):
    """Fail before minutes of model loading when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise DataError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another --port "
                            f"(or stop what uses it)")


def note(message):
    print(f"note: {message}", file=sys.stderr, flush=True)


def default_settings(demo):
    import chat

    return chat.generation_settings(**(config.DEMO["generation"] if demo else {}))


def main(argv=None):
    args = parse_args(argv)
    try:
        check_port_free(args.host, args.port)
        if not is_loopback(args.host) and args.api_key is None:
            note(f"listening on {args.host} without --api_key: anyone who reaches this address can use the model")
        model, tokenizer = model_loader.load_from_args(args)
        if args.demo:
            import demo_model

            print(demo_model.toy_notice(model), flush=True)
        app = create_app(model, tokenizer, args.model_name, args.api_key, args.memory_limit,
                         default_settings(args.demo), args.max_waiting)
    except DataError as e:
        data_io.fail(str(e))
    import uvicorn

    print(f"CuteGPT API: http://{args.host}:{args.port}/v1 (model {args.model_name!r}"
          f"{', API key required' if args.api_key else ''}); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
