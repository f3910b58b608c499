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

The wire format (errors, request fields, answer shapes) is in api_protocol.py, the engine in
api_queue.py; the server runs it in a process of its own (api_process.py), create_app in this one
(the web demo, tests).  Concurrent requests are generated together (transformers' continuous batching, sized
by config.SERVER['batching']); beyond those, at most config.SERVER['max_waiting'] wait, more get 429
with Retry-After.  A client that disconnects gives up its place, or stops its generation before the
next step.  Defaults: config.SERVER and config.GENERATION.
"""
import argparse
import asyncio
import contextlib
import copy
import hmac
import ipaddress
import json
import socket
import threading
import time
import uuid
from contextlib import aclosing

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import chat
import config
import data_io
import model_loader
import prompt
from api_protocol import (CHAT, COMPLETION, ApiError, bad_request, check_choices, choice, completion_prompts,
                          context_error, generation_request, sse, sse_error, usage, whole_answer)
from api_process import ProcessEngine
from api_queue import Engine, Job, describe
from data_io import DataError, note


# ----------------------------------------------------------------------------------------------
# the endpoints
# ----------------------------------------------------------------------------------------------
class Endpoints:
    """What every endpoint shares: the served model's name and context, the API key, the engine and
    the request threads' tokenizer.  One method per route."""

    def __init__(self, engine, tokenizer, context_length, vocab_size, model_name, api_key, memory_limit, defaults,
                 poll_s):
        """``engine``: api_queue.Engine (in this process) or api_process.ProcessEngine; ``vocab_size``:
        the token ids a prompt may hold; ``defaults``: the settings for what a request leaves out."""
        self.model_name, self.api_key, self.memory_limit, self.poll_s = model_name, api_key, memory_limit, poll_s
        self.engine, self.defaults = engine, defaults
        self.context_length, self.vocab_size = context_length, vocab_size
        # prompts are tokenized in request threads while the generation thread decodes: each side has
        # its own copy of the tokenizer, and request threads take turns on theirs
        self.tokenizer, self.tokenizer_lock = copy.deepcopy(tokenizer), threading.Lock()
        self.created = int(time.time())

    # -- steps every request takes ---------------------------------------------------------------
    def check_key(self, request):
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                                "the server was started with (--api_key)", code="invalid_api_key")

    async def json_body(self, request):
        self.check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json")
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        model_asked = body.get("model")
        if model_asked is not None and model_asked != self.model_name:
            raise ApiError(404, f"the model {model_asked!r} does not exist here: this server serves "
                                f"{self.model_name!r} (see GET /v1/models)", "model", "model_not_found")
        return body

    async def tokenized(self, function, *args, **kwargs):
        def run():
            with self.tokenizer_lock:
                return function(self.tokenizer, *args, **kwargs)
        return await asyncio.to_thread(run)

    async def events(self, jobs, request):
        """(choice index, kind, payload) of every job's events as they come, the text a job sent since the
        last read in one piece (a busy server then sends fewer, longer chunks); on return, failure or
        cancellation (client gone) every job is cancelled.  The jobs share ``events``, their tags the indices."""
        events = jobs[0].events
        for job in jobs:
            self.engine.submit(job)
        running = len(jobs)
        try:
            while running:
                ready = []
                if events.empty():   # (wait_for costs a task: only when there is nothing to read)
                    try:
                        ready.append(await asyncio.wait_for(events.get(), self.poll_s))
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                while not events.empty():
                    ready.append(events.get_nowait())
                for item in coalesced(ready):
                    running -= item[1] != "text"
                    yield item
        finally:
            for job in jobs:
                job.cancel()

    # -- answers -------------------------------------------------------------------------------
    async def respond(self, request, prompts, wanted, kind, ident):
        """n jobs per prompt (choice index = prompt index x n + k), answered together.  Non-streamed:
        one JSON object; streamed: server-sent events ending with [DONE]."""
        self.engine.check_room()   # a full queue answers 429 before any streaming starts
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()   # every choice's events, tagged with its index
        jobs = [Job(prepared, wanted.for_choice(index), loop, events, index)
                for index, prepared in enumerate(p for p in prompts for _ in range(wanted.n))]
        echoes = [job.prepared.query if wanted.echo else "" for job in jobs]
        prompt_tokens = sum(len(p.input_ids) for p in prompts)
        if wanted.stream:
            return StreamingResponse(self.stream(request, jobs, kind, ident, echoes, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.whole(request, jobs, kind, ident, echoes, prompt_tokens)

    async def whole(self, request, jobs, kind, ident, echoes, prompt_tokens):
        texts, outcomes = [[echo] for echo in echoes], [None] * len(jobs)
        async with aclosing(self.events(jobs, request)) as events:
            async for index, event, payload in events:
                if event == "text":
                    texts[index].append(payload)
                elif event == "error":
                    raise ApiError(500, f"generation failed: {describe(payload)}")
                else:
                    outcomes[index] = payload
        if None in outcomes:   # the client went away
            return JSONResponse(ApiError(499, "client closed the request").body(), status_code=499)
        return JSONResponse(whole_answer(kind, ident, self.model_name, ["".join(t) for t in texts], outcomes,
                                         prompt_tokens))

    async def stream(self, request, jobs, kind, ident, echoes, prompt_tokens):
        chat_api, include_usage = kind == CHAT, jobs[0].request.include_usage
        outcomes = []

        def event(choices, **extra):
            return sse(kind, ident, self.model_name, include_usage, choices, **extra)

        for index, echo in enumerate(echoes):   # chat: the role first; completions with echo: the prompt
            if chat_api or echo:
                yield event([choice(kind, "" if chat_api else echo, None, first=True, index=index)])
        async with aclosing(self.events(jobs, request)) as events:
            async for index, name, payload in events:
                if name == "text":
                    yield event([choice(kind, payload, None, index=index)])
                elif name == "error":
                    yield sse_error(ApiError(500, f"generation failed: {describe(payload)}"))
                    break
                else:
                    outcomes.append(payload)
                    yield event([choice(kind, None if chat_api else "", payload.finish_reason, index=index)])
        if include_usage and len(outcomes) == len(jobs):
            yield event([], usage=usage(prompt_tokens, outcomes))
        yield "data: [DONE]\n\n"

    # -- routes --------------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        body = await self.json_body(request)
        wanted = generation_request(body, self.defaults, CHAT)
        try:
            meta_prompt, history, query = prompt.split_messages(body.get("messages"))
        except prompt.MessageError as e:
            raise bad_request(str(e), e.param)
        max_new_tokens = int(wanted.settings["max_new_tokens"])
        try:
            prepared = await self.tokenized(chat.build_prompt, history, query, self.memory_limit, self.context_length,
                                            max_new_tokens, meta_prompt=meta_prompt, cut_query=False)
        except chat.ContextError:   # even without history: counted as the shortest prompt it could be
            shortest = await self.tokenized(chat.encode_prompt, [], query, meta_prompt)
            raise context_error(CHAT, self.context_length, len(shortest), max_new_tokens)
        return await self.respond(request, [prepared], wanted, CHAT, f"chatcmpl-{uuid.uuid4().hex}")

    async def completions(self, request: Request):
        """prompt: a string, strings, token ids or lists of them; each is fed as raw text (no template)."""
        body = await self.json_body(request)
        wanted = generation_request(body, self.defaults, COMPLETION)
        prompts = completion_prompts(body.get("prompt"), self.vocab_size)
        check_choices(len(prompts), wanted.n)
        texts = [p for p in prompts if isinstance(p, str)]
        id_lists = [p for p in prompts if not isinstance(p, str)]
        encoded = iter(await self.tokenized(prompt.tokenize_segment_texts, texts))
        decoded = iter(await self.tokenized(decode_all, id_lists))
        max_new_tokens = int(wanted.settings["max_new_tokens"])
        prepared = []
        for one in prompts:
            ids, text = (next(encoded), one) if isinstance(one, str) else (list(one), next(decoded))
            if len(ids) + max_new_tokens > self.context_length:
                raise context_error(COMPLETION, self.context_length, len(ids), max_new_tokens)
            prepared.append(chat.Prompt(ids, 0, text, False))
        return await self.respond(request, prepared, wanted, COMPLETION, f"cmpl-{uuid.uuid4().hex}")

    def model_card(self):
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "cutegpt"}

    async def models(self, request: Request):
        self.check_key(request)
        return {"object": "list", "data": [self.model_card()]}

    async def one_model(self, name: str, request: Request):
        self.check_key(request)
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here: this server serves {self.model_name!r}",
                           "model", "model_not_found")
        return self.model_card()

    async def health(self):
        """Liveness and queue state; open without the API key (it tells nothing about the data).  503
        when the engine's process has stopped."""
        status = self.engine.status()
        if status.get("engine") == "stopped":
            return JSONResponse({"status": "error", "model": self.model_name, **status}, status_code=503)
        return {"status": "ok", "model": self.model_name, **status}


def server_defaults(demo=False):
    """The settings for what a request leaves out: inference.py's (the demo's with --demo), with
    config.SERVER's repetition penalty (none: a penalty is not batched)."""
    settings = chat.default_settings(demo)
    if not demo:
        settings["repetition_penalty"] = float(config.SERVER["repetition_penalty"])
    return settings


def coalesced(events):
    """``events`` [(index, kind, payload)] with each run of texts of one index joined into one."""
    joined = []
    for item in events:
        if joined and item[1] == "text" and joined[-1][1] == "text" and joined[-1][0] == item[0]:
            joined[-1] = (item[0], "text", joined[-1][2] + item[2])
        else:
            joined.append(item)
    return joined


def decode_all(tokenizer, id_lists):
    """The text of token-id prompts (what echo sends back), special tokens kept as written."""
    return [tokenizer.decode(ids, skip_special_tokens=False) for ids in id_lists]


# ----------------------------------------------------------------------------------------------
# the app: errors in OpenAI's shape, and the routes
# ----------------------------------------------------------------------------------------------
async def api_error(request, error):
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def http_error(request, error):
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
    return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)


async def server_error(request, error):
    return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}").body(), status_code=500)


def create_app(model, tokenizer, model_name=config.SERVER["model_name"], api_key=None,
               memory_limit=config.MEMORY_LIMIT, defaults=None, max_waiting=config.SERVER["max_waiting"],
               poll_s=config.SERVER["disconnect_poll_s"]):
    """The FastAPI app serving ``model`` from this process (the engine in a thread: the web demo, tests).
    ``defaults``: chat.generation_settings for fields a request leaves out (``server_defaults()`` when None)."""
    defaults = dict(defaults or server_defaults())
    engine = Engine(model, tokenizer, max_waiting, defaults=defaults)
    return app_over(engine, tokenizer, chat.context_length_of(model, tokenizer),
                    model.get_input_embeddings().weight.shape[0], model_name, api_key, memory_limit, defaults, poll_s)


def app_over(engine, tokenizer, context_length, vocab_size, model_name, api_key, memory_limit, defaults,
             poll_s=config.SERVER["disconnect_poll_s"]):
    """The FastAPI app over ``engine`` (see Endpoints); the engine is closed when the server ends."""
    endpoints = Endpoints(engine, tokenizer, context_length, vocab_size, model_name, api_key, memory_limit,
                          defaults, poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        endpoints.engine.close()   # the batch's generation thread ends with the server

    app = FastAPI(title="CuteGPT API", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = endpoints.engine
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.post("/v1/chat/completions")(endpoints.chat_completions)
    app.post("/v1/completions")(endpoints.completions)
    app.get("/v1/models")(endpoints.models)
    app.get("/v1/models/{name}")(endpoints.one_model)
    app.get("/health")(endpoints.health)
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


def main(argv=None):
    args = parse_args(argv)
    try:
        check_port_free(args.host, args.port)
        if not is_loopback(args.host) and args.api_key is None:
            note(f"listening on {args.host} without --api_key: anyone who reaches this address can use the model")
        defaults = server_defaults(args.demo)
        engine = ProcessEngine(args, args.max_waiting, defaults)   # loads the model in its own process
        app = app_over(engine, engine.tokenizer, engine.context_length, engine.vocab_size, args.model_name,
                       args.api_key, args.memory_limit, defaults)
    except DataError as e:
        data_io.fail(str(e))
    print(f"CuteGPT API: http://{args.host}:{args.port}/v1 (model {args.model_name!r}"
          f"{', API key required' if args.api_key else ''}); Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        app.state.engine.close()


if __name__ == "__main__":
    main()
