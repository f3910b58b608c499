"""The API server's batching (api_queue.Engine over transformers' continuous batching), in-process on
the toy CuteGPT of the shared demo fixture: concurrent requests share forward passes and get their solo
answers, a LoRA model is merged and batched, a client that disconnects leaves the batch, and beyond
capacity requests get 429 with Retry-After.  A forward pre-hook on the model counts (and slows) the steps.
"""
import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import json
import threading
import time

import httpx
import pytest
import torch

from conftest import CANNED_ANSWERS
from test_serving import QUERY, QUERY2, free_port, solo

import api_protocol
import api_queue
import api_server
import chat
import config


# --------------------------------------------------------------------------------------------------
# batching, and a client that goes away (in-process server; a forward hook counts and slows the steps)
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def in_process_server(loaded, delay=0.0, **kwargs):
    """create_app on the loaded demo model under uvicorn in a thread: (base url, engine, forward-pass times)."""
    import uvicorn

    model, tokenizer = loaded
    steps = []

    def step(module, args):   # every forward pass: one step of the batch, or of one generate()
        steps.append(time.time())
        time.sleep(delay)

    handle = model.register_forward_pre_hook(step)
    app = api_server.create_app(model, tokenizer, defaults=chat.default_settings(demo=True), poll_s=0.1, **kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", app.state.engine, steps
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        handle.remove()
    assert not thread.is_alive() and not app.state.engine.batcher.manager.is_running()


def wait_for_status(engine, expected, seconds=15):
    deadline = time.time() + seconds
    while {k: engine.status()[k] for k in expected} != expected:
        assert time.time() < deadline, engine.status()
        time.sleep(0.05)


def test_concurrent_requests_share_the_forward_passes(loaded):
    """8 greedy requests sent together take about as many forward passes as the longest alone (one batch
    step serves all), not the sum; a seeded one runs alone (batch paused) and still reproduces."""
    queries = [QUERY, QUERY2, "你好", "今天天气怎么样", "讲个笑话", "写一首诗", "你是谁", "1+1=?"]
    with in_process_server(loaded) as (base, engine, steps):
        assert engine.status()["batching"]

        def ask(query, **extra):
            body = dict(messages=[{"role": "user", "content": query}], max_tokens=12, **extra)
            response = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        alone = [ask(q) for q in queries]
        solo_steps = len(steps)
        tokens = [a["usage"]["completion_tokens"] for a in alone]
        assert solo_steps >= sum(tokens)          # one forward pass per token of each answer
        start = threading.Barrier(len(queries))

        def together(query):
            start.wait()
            return ask(query)

        with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
            at_once = list(pool.map(together, queries))
        batched_steps = len(steps) - solo_steps
        assert [a["choices"][0]["message"]["content"] for a in at_once] == \
            [a["choices"][0]["message"]["content"] for a in alone]
        assert batched_steps < sum(tokens) / 2, (batched_steps, tokens)
        print(f"8 requests: {solo_steps} forward passes one at a time, {batched_steps} together")
        sampled = [ask("随便说点什么", temperature=1.5, seed=7)["choices"][0]["message"]["content"] for _ in range(2)]
        assert sampled[0] == sampled[1]
        # on a CPU the batch samples with the server's settings (greedy here); others run alone
        assert not config.SERVER["batching"]["per_request_sampling"]
        request = functools.partial(api_protocol.GenerationRequest, stops=[], seed=None, stream=False,
                                    include_usage=False)
        assert engine.batcher.refusal(request(chat.default_settings(demo=True))) is None
        hot = chat.user_settings(chat.default_settings(demo=True), temperature=1.5)
        assert "per_request_sampling is off" in engine.batcher.refusal(request(hot))
        assert engine.status()["failed"] == 0


@pytest.mark.parametrize("per_request", [False, True])
def test_a_lora_model_is_merged_and_batched(loaded, per_request, monkeypatch):
    """A PeftModel over float weights is merged at start and batched; its greedy answers are the adapter's,
    whether the batch samples with the server's settings (greedy: argmax) or each request brings its own
    (greedy: top-k 1, as on a GPU)."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setitem(config.SERVER, "batching", dict(config.SERVER["batching"], per_request_sampling=per_request))
    model, tokenizer = loaded
    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False)).eval()
    settings = chat.generation_settings(**dict(config.DEMO["generation"], max_new_tokens=12))
    queries = [QUERY, "你好", "写一首诗"]
    expected = [chat.start_reply(lora, tokenizer, [], q, settings).result().response for q in queries]
    plain = [chat.start_reply(model, tokenizer, [], q, settings).result().response for q in queries]
    assert expected != plain                                  # the adapter changes the answers
    engine = api_queue.Engine(lora, tokenizer, 4, notice=lambda message: None, defaults=settings)
    try:
        assert engine.batcher is not None and not hasattr(engine.model, "peft_config")
        request = api_protocol.GenerationRequest(settings, [], None, False, False)
        assert engine.batcher.refusal(request) is None and (engine.batcher.fixed is None) == per_request

        async def answers():
            request = api_protocol.GenerationRequest(settings, [], None, False, False)
            jobs = [api_queue.Job(chat.build_prompt(tokenizer, [], q), request, asyncio.get_running_loop())
                    for q in queries]
            for job in jobs:
                engine.submit(job)
            texts = []
            for job in jobs:
                parts = []
                while (event := await job.events.get())[0] == "text":
                    parts.append(event[1])
                assert event[0] == "done", event
                texts.append("".join(parts))
            return texts

        assert asyncio.run(answers()) == expected
    finally:
        engine.close()


def test_a_sampling_server_batches_requests_with_its_own_settings(loaded):
    """A server that samples (inference.py's settings, without the penalty a batch cannot apply) builds its
    CPU batch with them: a request that leaves them out is batched and answered; others run alone."""
    model, tokenizer = loaded
    assert api_server.server_defaults()["repetition_penalty"] == 1.0 != chat.default_settings()["repetition_penalty"]
    defaults = dict(api_server.server_defaults(), max_new_tokens=8)
    engine = api_queue.Engine(model, tokenizer, 4, notice=lambda message: None, defaults=defaults)
    try:
        assert engine.batcher.fixed == {"temperature": defaults["temperature"], "top_p": defaults["top_p"],
                                        "top_k": defaults["top_k"]}
        same = api_protocol.GenerationRequest(defaults, [], None, False, False)
        assert engine.batcher.refusal(same) is None
        cooler = api_protocol.GenerationRequest(dict(defaults, temperature=0.5), [], None, False, False)
        assert "per_request_sampling is off" in engine.batcher.refusal(cooler)

        async def answer():
            job = api_queue.Job(chat.build_prompt(tokenizer, [], QUERY), same, asyncio.get_running_loop())
            engine.submit(job)
            while (event := await job.events.get())[0] == "text":
                pass
            return event

        kind, outcome = asyncio.run(answer())
        assert kind == "done" and 1 <= outcome.completion_tokens <= 8, (kind, outcome)
        assert engine.status()["finished"] == 1 and engine.status()["failed"] == 0
    finally:
        engine.close()


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_slot(loaded):
    delay = 0.3   # per step: the canned answer takes ~12 s
    with in_process_server(loaded, delay) as (base, engine, steps):
        body = {"messages": [{"role": "user", "content": QUERY}], "stream": True}   # no key: none was set
        full_tokens = solo(loaded, [], QUERY).new_tokens
        assert full_tokens * delay > 8   # (39 tokens)
        # a streaming client and a waiting one both give up long before their answers end
        with httpx.Client(timeout=60) as first:
            with first.stream("POST", base + "/v1/chat/completions", json=body) as stream:
                lines = (line for line in stream.iter_lines() if line)   # events, without the blank lines
                assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
                started = time.time()
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(base + "/v1/chat/completions", json=dict(body, stream=False), timeout=1.0)
                text = json.loads(next(lines)[6:])["choices"][0]["delta"]["content"]
                assert CANNED_ANSWERS[0].startswith(text)
            # the streaming client closed its connection: both generations leave the batch
        wait_for_status(engine, {"waiting": 0, "running": 0, "busy": False, "finished": 0, "cancelled": 2,
                                 "failed": 0})
        freed = time.time() - started
        before = len(steps)
        time.sleep(4 * delay)
        assert len(steps) == before          # no forward pass runs for the requests that left
        # the slots are free well before the long answer would have ended: a new request finishes promptly
        answer = httpx.post(base + "/v1/chat/completions", json=dict(body, stream=False, max_tokens=3), timeout=30)
        done = time.time() - started
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        assert done < full_tokens * delay / 2, (freed, done)
        print(f"slots freed {freed:.1f}s after the stream started; a new answer came {done:.1f}s after "
              f"(the whole answer takes {full_tokens * delay:.0f}s)")


def test_beyond_capacity_429_with_retry_after(loaded):
    """With 16 in the batch and max_waiting 2, a burst of 30 slow requests: 18 answered, 12 refused with 429
    and a Retry-After; none fails; then the engine is empty and serves again."""
    with in_process_server(loaded, 0.2, max_waiting=2) as (base, engine, steps):
        slots = engine.slots
        body = {"messages": [{"role": "user", "content": QUERY}], "max_tokens": 8}

        def ask(_):
            return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(ask, range(30)))
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 429} and codes.count(200) >= slots + 2, codes
        refused = [a for a in answers if a.status_code == 429]
        assert all(int(a.headers["Retry-After"]) >= 1 and a.json()["error"]["code"] == "server_busy" for a in refused)
        wait_for_status(engine, {"waiting": 0, "running": 0, "failed": 0})
        assert engine.status()["finished"] == codes.count(200)
        assert httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code == 200
