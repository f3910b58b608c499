"""code/api_server.py and code/web_demo.py on the toy CuteGPT of the shared demo fixture.

The API server runs as `python code/api_server.py --demo --api_key KEY` (the README's command, on a
free port of 127.0.0.1) and is spoken to with the official openai client: chat completions (one
turn, several turns, a system message) whose answers and token counts are checked against the same
model run in this process, streaming, /v1/completions, the models list, sampling settings, stop
strings, the error cases, 16 concurrent requests that must each get their solo answer, a burst of
200 requests (answered or 429) and bench/bench_serve.py against it.  tests/test_serving_batch.py
checks the batching in-process.  The web demo runs as `python code/web_demo.py --demo` and is driven in headless Chromium
(selenium + Debian's chromium-driver); its screenshot goes to tests/artifacts/web_demo.png.
"""
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import CANNED_ANSWERS, REPO, demo_command, run_script

import api_protocol
import api_queue
import api_server
import chat
import config
import prompt
import web_demo

KEY = "test-key-123"
ARTIFACTS = os.path.join(REPO, "tests", "artifacts")
QUERY, QUERY2 = config.CANNED_QUERIES
MODEL = config.SERVER["model_name"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A server started in the background; its output goes to a file (read on failure)."""

    def __init__(self, args, log_path, ready_url, timeout=300):
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
        self.proc = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, f"the server exited:\n{self.output()[-3000:]}"
            assert time.time() < deadline, f"the server did not come up:\n{self.output()[-3000:]}"
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    def output(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------------------------------
# messages -> prompt, stop strings (no server)
# --------------------------------------------------------------------------------------------------
def test_messages_become_the_conversation_training_builds():
    user = lambda text: {"role": "user", "content": text}                 # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}             # noqa: E731
    assert prompt.split_messages([user("q")]) == (None, [], "q")
    assert prompt.split_messages([{"role": "system", "content": "S"}, {"role": "developer", "content": "T\n"},
                                  user("a"), bot([{"type": "text", "text": "b"}]), user("c")]) == \
        ("S\nT\n", [("a", "b")], "c")
    assert prompt.split_messages([{"role": "system", "content": ""}, user("q")]) == ("", [], "q")
    for messages, param, words in [
            (None, "messages", "non-empty list"), ([], "messages", "non-empty list"),
            (["hi"], "messages[0]", "object"), ([{"content": "x"}], "messages[0].role", "unknown role None"),
            ([{"role": "tool", "content": "x"}], "messages[0].role", "unknown role 'tool'"),
            ([user("a"), user("b")], "messages[1].role", "alternate"),
            ([bot("a"), user("b")], "messages[0].role", "alternate"),
            ([user("a"), bot("b")], "messages", "last message must be a user"),
            ([user("a"), {"role": "system", "content": "s"}, user("b")], "messages[1].role", "before"),
            ([user({"text": "x"})], "messages[0].content", "string"),
            ([user([{"type": "image_url", "image_url": {}}])], "messages[0].content[0]", "only text")]:
        with pytest.raises(prompt.MessageError, match=words) as info:
            prompt.split_messages(messages)
        assert info.value.param == param


def test_meta_prompt_and_refusing_to_cut(loaded):
    _, tokenizer = loaded
    segments = prompt.conversation_segments(prompt.chat_turns([], "q"), meta_prompt="M\n")
    assert segments[0] == ("M\n", False)
    assert chat.encode_prompt(tokenizer, [], "q", "M\n") == prompt.encode_segments(tokenizer, segments)[0]
    assert chat.encode_prompt(tokenizer, [], "q") == chat.encode_prompt(tokenizer, [], "q", config.META_PROMPT)
    history = [(f"问题{i}", "很长的回答" * 20) for i in range(5)]
    p = chat.build_prompt(tokenizer, history, "最后", None, 300, 64, meta_prompt="M\n", cut_query=False)
    assert 0 < p.history_used < 5 and p.notices                           # old turns still dropped
    assert p.input_ids == chat.encode_prompt(tokenizer, history[-p.history_used:], "最后", "M\n")
    long_query = "这是一段很长的文字。" * 100
    assert chat.build_prompt(tokenizer, [], long_query, None, 300, 64).query_truncated   # cut by default
    with pytest.raises(chat.ContextError, match="even without history"):
        chat.build_prompt(tokenizer, [], long_query, None, 300, 64, cut_query=False)
    with pytest.raises(chat.ContextError, match="max_new_tokens"):
        chat.build_prompt(tokenizer, [], "q", None, 300, 300)


def test_stop_strings_are_cut_and_never_streamed():
    stopper = api_protocol.StopText(["<|x|>", "END"])
    pieces = ["ab", "c<", "|x", "|>tail"]
    out = [stopper.feed(p) for p in pieces[:3]]
    assert out == ["ab", "c", ""] and not stopper.hit          # "<" and "<|x" held back: they may start a stop
    assert stopper.feed(pieces[3]) == "" and stopper.hit and stopper.text == "abc"
    stopper = api_protocol.StopText(["END"])
    assert [stopper.feed(p) for p in ["E", "x", "EN"]] == ["", "Ex", ""] and stopper.flush() == "EN"
    assert api_protocol.StopText([]).feed("END") == "END"


# --------------------------------------------------------------------------------------------------
# the API server, started as the README says
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(demo_run, demo_data, tmp_path_factory):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("api") / "server.log"
    server = Process(demo_command(demo_data, demo_run[2], "--port", str(port), "--api_key", KEY,
                                  script="code/api_server.py"), str(log), base + "/health")
    yield base, server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    from openai import OpenAI

    with OpenAI(base_url=api[0] + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def solo(loaded, history, query, meta_prompt=None, **overrides):
    """What the model answers in this process, with the demo's settings (greedy, no penalty)."""
    model, tokenizer = loaded
    settings = chat.generation_settings(**dict(config.DEMO["generation"], **overrides))
    return chat.start_reply(model, tokenizer, history, query, settings, meta_prompt=meta_prompt).result()


def test_server_starts_on_loopback_with_the_toy_model(api, client):
    base, server = api
    out = server.output()
    assert "TOY model" in out and f"http://127.0.0.1:{base.rsplit(':', 1)[1]}/v1" in out
    assert "[demo" not in out   # the fixture's cached model is reused, not rebuilt
    assert api_server.parse_args([]).host == "127.0.0.1"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def readme_api_example(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        text = f.read()
    for command in ("python code/api_server.py --demo", "python code/web_demo.py --demo"):
        assert f"```bash\n{command}\n```" in text    # the commands these tests run (plus a port)
    start = text.index("<!-- api-example: begin -->\n```python\n") + len("<!-- api-example: begin -->\n```python\n")
    return text[start:text.index("```\n<!-- api-example: end -->")]


def test_readme_client_example_runs(api):
    code = readme_api_example("docs/serving.md")
    strip = lambda block: [line.split("  #")[0] for line in block.splitlines()]   # noqa: E731
    assert strip(code) == strip(readme_api_example("docs/serving_ch.md"))
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and config.SERVER["port"] == 8000
    code = code.replace("http://127.0.0.1:8000/v1", api[0] + "/v1").replace('api_key="KEY"', f'api_key="{KEY}"')
    proc = run_script(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == CANNED_ANSWERS[0] + "\n" + CANNED_ANSWERS[1]


def test_chat_completion_answers_as_the_model_does(client, loaded):
    _, tokenizer = loaded
    # one turn: the toy recalls the sample answer; the counts are the prompt's and the answer's tokens
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}])
    expected = solo(loaded, [], QUERY)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == CANNED_ANSWERS[0] == expected.response
    assert choice.finish_reason == "stop"
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.usage.prompt_tokens == len(chat.encode_prompt(tokenizer, [], QUERY)) == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.new_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    # two turns: the earlier pair is the history, fed as training feeds it
    messages = [{"role": "user", "content": QUERY}, {"role": "assistant", "content": CANNED_ANSWERS[0]},
                {"role": "user", "content": QUERY2}]
    response = client.chat.completions.create(model=MODEL, messages=messages)
    assert response.choices[0].message.content == CANNED_ANSWERS[1]
    assert response.usage.prompt_tokens == len(chat.encode_prompt(tokenizer, [(QUERY, CANNED_ANSWERS[0])], QUERY2))

    # a system message replaces the meta prompt
    system = "你是一个乐于助人的助手。"
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                                     {"role": "user", "content": QUERY}])
    expected = solo(loaded, [], QUERY, meta_prompt=system + "\n")
    assert response.usage.prompt_tokens == len(chat.encode_prompt(tokenizer, [], QUERY, system + "\n"))
    assert response.usage.prompt_tokens != len(chat.encode_prompt(tokenizer, [], QUERY))
    assert response.choices[0].message.content == expected.response


def test_streamed_chunks_join_into_the_same_answer(client):
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}])
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3                                  # really streamed, piece by piece
    assert "".join(pieces) == plain.choices[0].message.content == CANNED_ANSWERS[0]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_raw_completions(client, api, loaded):
    model, tokenizer = loaded
    text = "".join(t for t, _ in prompt.conversation_segments(prompt.chat_turns([], QUERY)))
    response = client.completions.create(model=MODEL, prompt=text, max_tokens=30, temperature=0)
    ids = prompt.tokenize_segment_texts(tokenizer, [text])[0]
    settings = chat.generation_settings(do_sample=False, repetition_penalty=1.0, max_new_tokens=30)
    expected = chat.Reply(model, tokenizer, chat.Prompt(ids, 0, text, False), settings, text).result()
    assert response.object == "text_completion"
    assert response.choices[0].text == expected.response and expected.response
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == expected.new_tokens
    streamed = list(client.completions.create(model=MODEL, prompt=text, max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected.response
    assert streamed[-1].choices[0].finish_reason == response.choices[0].finish_reason


def test_sampling_settings_stop_and_max_tokens(client):
    def ask(query=QUERY, **kwargs):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": query}], **kwargs)

    # seed: the same seed gives the same sample, other seeds other samples
    sampled = {seed: ask("随便说点什么", temperature=1.5, top_p=1.0, seed=seed, max_tokens=20,
                         extra_body={"top_k": 0}).choices[0].message.content for seed in (1, 2, 3)}
    assert ask("随便说点什么", temperature=1.5, top_p=1.0, seed=1, max_tokens=20,
               extra_body={"top_k": 0}).choices[0].message.content == sampled[1]
    assert len(set(sampled.values())) > 1
    # max_tokens cuts the answer
    short = ask(max_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert CANNED_ANSWERS[0].startswith(short.choices[0].message.content)
    # a stop string ends the answer before it, in both modes
    stop = "《呐喊》"
    cut = CANNED_ANSWERS[0][:CANNED_ANSWERS[0].index(stop)]
    stopped = ask(stop=[stop, "never said"])
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < ask().usage.completion_tokens
    chunks = list(ask(stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut


def post(base, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(base + path, content=raw, headers=dict(headers, **{"Content-Type": "application/json"}),
                          timeout=60)
    return httpx.post(base + path, json=body, headers=headers, timeout=60)


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == ("invalid_request_error" if status < 429 else error["type"])
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(api, client):
    import openai

    base = api[0]
    user = [{"role": "user", "content": "你好"}]
    chat_path = "/v1/chat/completions"
    assert "not valid JSON" in assert_error(post(base, chat_path, None, raw=b"{not json"), 400, code="invalid_json")
    assert_error(post(base, chat_path, None, raw="[1, 2]".encode()), 400)
    assert_error(post(base, chat_path, {"model": MODEL}), 400, "messages")
    assert_error(post(base, chat_path, {"messages": []}), 400, "messages")
    assert "unknown role" in assert_error(post(base, chat_path, {"messages": [{"role": "robot", "content": "x"}]}),
                                          400, "messages[0].role")
    assert_error(post(base, chat_path, {"messages": user + [{"role": "assistant", "content": "x"}]}), 400)
    assert_error(post(base, chat_path, {"messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content")
    for value in (0, -3, "ten", 2.5):
        assert_error(post(base, chat_path, {"messages": user, "max_tokens": value}), 400, "max_tokens")
    assert_error(post(base, chat_path, {"messages": user, "temperature": 3}), 400, "temperature")
    assert_error(post(base, chat_path, {"messages": user, "n": config.SERVER["max_choices"] + 1}), 400, "n")
    assert_error(post(base, chat_path, {"messages": user, "stop": [1]}), 400, "stop")
    assert_error(post(base, "/v1/completions", {"prompt": ""}), 400, "prompt")
    # a prompt that cannot fit the context is refused (history is dropped first, the last message never cut)
    long_query = "这是一段很长的文字。" * 400
    message = assert_error(post(base, chat_path, {"messages": [{"role": "user", "content": long_query}]}), 400,
                           "messages", "context_length_exceeded")
    assert "2048" in message
    assert_error(post(base, chat_path, {"messages": user, "max_tokens": 2048}), 400, code="context_length_exceeded")
    assert_error(post(base, "/v1/completions", {"prompt": long_query}), 400, "prompt", "context_length_exceeded")
    # but old turns that do not fit are dropped, not refused
    history = [{"role": r, "content": long_query[:600]} for _ in range(3) for r in ("user", "assistant")]
    assert post(base, chat_path, {"messages": history + user, "max_tokens": 3}).status_code == 200
    # the official client sees the same errors as exceptions
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user)
    # the API key
    from openai import OpenAI

    with OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=user)
    assert_error(post(base, chat_path, {"messages": user}, key=None), 401, code="invalid_api_key")
    assert_error(httpx.get(base + "/v1/models"), 401, code="invalid_api_key")
    # unknown paths and methods
    assert_error(httpx.get(base + "/v1/nothing"), 404)
    assert_error(httpx.get(base + chat_path, headers={"Authorization": f"Bearer {KEY}"}), 405)
    # still serving, correctly
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}])
    assert answer.choices[0].message.content == CANNED_ANSWERS[0]
    assert httpx.get(base + "/health").json()["failed"] == 0


def test_16_concurrent_requests_get_their_solo_answers(api, client, demo_data):
    questions = [d[0]["instruction"] for d in json.loads(demo_data.read_text(encoding="utf-8"))]
    requests = []
    for i in range(16):
        messages = [{"role": "user", "content": questions[i % len(questions)]}]
        if i % 4 == 3:    # a second turn
            messages = [{"role": "user", "content": QUERY}, {"role": "assistant", "content": CANNED_ANSWERS[0]},
                        {"role": "user", "content": QUERY2}]
        requests.append(dict(messages=messages, max_tokens=10 + i % 8, stream=i % 2 == 1))

    def run(request):
        if request["stream"]:
            chunks = client.chat.completions.create(model=MODEL, **request)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model=MODEL, **request).choices[0].message.content

    alone = [run(r) for r in requests]
    assert all(alone) and len(set(alone)) > 4
    start = threading.Barrier(16)

    def together(request):
        start.wait()
        return run(request)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        at_once = list(pool.map(together, requests))
    assert at_once == alone
    health = httpx.get(api[0] + "/health").json()
    assert health["waiting"] == 0 and not health["busy"] and health["failed"] == 0
    assert run(requests[0]) == alone[0]    # and it keeps serving


def children(pid):
    """The process ids ``pid`` started (Linux)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def engine_pid(pid):
    """The engine process of the API server ``pid`` (api_process: generation runs there)."""
    for child in children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():   # (not multiprocessing's resource tracker)
                return child
    raise AssertionError(f"the server {pid} has no engine process")


def server_rss_mb(pid):
    """The server's memory: its own and its engine process's."""
    total = 0
    for one in [pid] + children(pid):
        with open(f"/proc/{one}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total / 1024


def test_a_burst_of_200_requests_is_answered_or_refused(api):
    """200 requests at once, twice: each is answered (200) or refused (429 + Retry-After), none fails or
    hangs, and the second burst leaves the server's memory where the first did."""
    import asyncio

    base, server = api
    body = {"messages": [{"role": "user", "content": QUERY}], "max_tokens": 16}

    async def burst():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=300,
                                     headers={"Authorization": f"Bearer {KEY}"}) as session:
            return await asyncio.gather(*[session.post(base + "/v1/chat/completions", json=body)
                                          for _ in range(200)])

    sizes = []
    for _ in range(2):
        answers = asyncio.run(burst())
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 429}, sorted(set(codes))
        capacity = config.SERVER["batching"]["max_requests_per_batch"] + config.SERVER["max_waiting"]
        assert codes.count(200) >= capacity and codes.count(429) > 0, (codes.count(200), codes.count(429))
        assert all(CANNED_ANSWERS[0].startswith(a.json()["choices"][0]["message"]["content"])
                   for a in answers if a.status_code == 200)
        assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)
        sizes.append(server_rss_mb(server.proc.pid))
        print(f"burst: {codes.count(200)} answered, {codes.count(429)} refused; server RSS {sizes[-1]:.0f} MB")
    assert sizes[1] - sizes[0] < 100, sizes
    health = httpx.get(base + "/health").json()
    assert health["waiting"] == 0 and health["running"] == 0 and health["failed"] == 0


def test_bench_serve_measures_a_running_server(api, tmp_path):
    out = tmp_path / "serve.json"
    proc = run_script(["bench/bench_serve.py", "--url", api[0], "--api_key", KEY, "--clients", "1,3",
                       "--requests_per_client", "2", "--max_tokens", "8", "--repeats", "3", "--json", str(out)],
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["clients"] for r in report["rows"]] == [1, 3] and [r["requests"] for r in report["rows"]] == [2, 6]
    for row in report["rows"]:
        assert 0 < row["tokens"] <= 8 * row["requests"] and row["tok_per_s"] > 0
        assert len(row["tok_per_s_rounds"]) == 3 and row["tok_per_s"] == sorted(row["tok_per_s_rounds"])[1]
        assert 0 < row["ttft_median_s"] <= row["p50_s"] <= row["p95_s"]
        assert f"| {row['clients']} | {row['requests']} | {row['tok_per_s']} |" in proc.stdout
    assert f"ratio 3 clients / 1 client: {report['ratio']:.2f}x" in proc.stdout
    assert run_script(["bench/bench_serve.py", "--clients", "0"]).returncode == 2


def test_the_engine_process_ends_with_the_server_and_its_loss_is_told(demo_run, demo_data, tmp_path):
    """Generation runs in a process of its own.  Killed, its requests end with an error naming it, /health
    answers 503 and new requests a clear 500; a server that is killed (no shutdown) takes it along."""
    import openai

    ports = [free_port(), free_port()]

    def start(port):
        return Process(demo_command(demo_data, demo_run[2], "--port", str(port), script="code/api_server.py"),
                       str(tmp_path / f"server{port}.log"), f"http://127.0.0.1:{port}/health")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:   # both start at once
        servers = list(pool.map(start, ports))
    try:
        engines = [engine_pid(server.proc.pid) for server in servers]
        # the first: its engine dies in the middle of an answer
        base = f"http://127.0.0.1:{ports[0]}"
        with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60) as c:
            stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}],
                                               max_tokens=400, stream=True)
            next(iter(stream))
            os.kill(engines[0], signal.SIGKILL)
            with pytest.raises(openai.APIError, match="the model process stopped"):
                list(stream)
            health = httpx.get(base + "/health")
            assert health.status_code == 503 and health.json()["engine"] == "stopped"
            with pytest.raises(openai.InternalServerError, match="the model process stopped .* restart the server"):
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}])
        # the second is killed outright: its engine notices the closed pipe and ends
        servers[1].proc.kill()
        servers[1].proc.wait()
        deadline = time.time() + 30
        while os.path.exists(f"/proc/{engines[1]}") and open(f"/proc/{engines[1]}/stat").read().split()[2] != "Z":
            assert time.time() < deadline, "the engine process outlived its server"
            time.sleep(0.2)
        servers[0].stop()   # a normal stop ends the server (its engine already gone)
        assert servers[0].proc.returncode is not None
    finally:
        for server in servers:
            server.stop()


def test_bench_serve_starts_a_model_of_a_shape(tiny_model_dir, tmp_path):
    """--shape serves a model directory of that shape (written once into --weights_dir; here the tiny model is
    already there, as a second run finds it) instead of the toy model."""
    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights)
    out = tmp_path / "serve.json"
    proc = run_script(["bench/bench_serve.py", "--shape", "tiny", "--weights_dir", str(weights), "--clients", "1,2",
                       "--requests_per_client", "1", "--max_tokens", "6", "--repeats", "1", "--json", str(out),
                       "--server_log", str(tmp_path / "server.log")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"serving the model already in {weights} (fp32, cpu)" in proc.stdout
    assert f"--model_path {weights} --lora_path none --quant fp32 --device cpu" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and [r["requests"] for r in report["rows"]] == [1, 2]
    assert all(0 < r["tokens"] <= 6 * r["requests"] for r in report["rows"])
    assert run_script(["bench/bench_serve.py", "--weights_dir", str(weights)]).returncode == 2


@pytest.mark.slow
def test_cli_errors(model_dir, tmp_path):
    proc = run_script(["code/api_server.py", "--demo", "--model_path", model_dir])
    assert proc.returncode == 2 and "--demo loads its own toy model" in proc.stderr
    proc = run_script(["code/api_server.py", "--model_path", model_dir, "--max_waiting", "0"])
    assert proc.returncode == 2 and "--max_waiting" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_script(["code/api_server.py", "--model_path", model_dir, "--port", str(port)])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use); choose another "
        f"--port (or stop what uses it)"]


# --------------------------------------------------------------------------------------------------
# the web demo in a headless browser
# --------------------------------------------------------------------------------------------------
SLOW_TOKENS = """
import time
import transformers
_forward = transformers.LlamaForCausalLM.forward
def slow(self, *args, **kwargs):   # {delay}s per forward pass (a slow model), so that the page shows the answer growing
    time.sleep({delay})
    return _forward(self, *args, **kwargs)
transformers.LlamaForCausalLM.forward = slow
"""


def test_web_demo_handler_streams_the_answer_chat_gives(loaded):
    """The page's answer handler (no browser), through the API server's engine (batched): the question box is
    emptied, the answer grows piece by piece and ends as the answer chat gives; the next question carries the
    history."""
    model, tokenizer = loaded
    with contextlib.closing(api_queue.Engine(model, tokenizer, 4)) as engine:   # its batch thread ends here
        assert engine.status()["batching"]
        respond = web_demo.responder(engine, tokenizer, chat.default_settings(demo=True),
                                     chat.context_length_of(model))
        controls = ("", 0, 0.8, 50, 1.0, 256, config.MEMORY_LIMIT)       # system, temperature 0 = greedy, ...
        # the handler updates one history list in place: each update is copied as it comes
        updates = [(box, [dict(m) for m in history])
                   for box, history in respond(config.CANNED_QUERIES[0], [], *controls)]
        assert updates[0] == ("", [{"role": "user", "content": config.CANNED_QUERIES[0]},
                                   {"role": "assistant", "content": ""}])
        answers = [history[-1]["content"] for _, history in updates[1:]]
        assert len(answers) > 3 and all(b.startswith(a) for a, b in zip(answers, answers[1:]))
        assert answers[-1] == solo(loaded, [], config.CANNED_QUERIES[0]).response == CANNED_ANSWERS[0]
        history = updates[-1][1]
        second = list(respond(config.CANNED_QUERIES[1], history, *controls))[-1][1]
        assert second[-1]["content"] == solo(loaded, [(config.CANNED_QUERIES[0], CANNED_ANSWERS[0])],
                                             config.CANNED_QUERIES[1]).response == CANNED_ANSWERS[1]
        assert engine.status()["finished"] == 2


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("the web demo test needs Debian's chromium and chromium-driver (.ci/run installs them: "
                    "apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1000", "--lang=zh-CN"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


@pytest.mark.slow
def test_web_demo_streams_an_answer_in_the_browser(demo_run, demo_data, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = Process(demo_command(demo_data, demo_run[2], "--port", str(port), script="code/web_demo.py",
                                  before=SLOW_TOKENS.format(delay=0.06)), str(tmp_path / "web.log"), url)
    try:
        browser.get(url)
        deadline = time.time() + 60
        while not browser.find_elements(By.CSS_SELECTOR, "#query textarea"):
            assert time.time() < deadline, "the page did not show its question box"
            time.sleep(0.1)
        assert browser.find_elements(By.ID, "clear") and browser.find_elements(By.ID, "settings")

        def bot_messages():
            # read in one script: the page re-renders the growing message, elements go stale
            return browser.execute_script(
                "return Array.from(document.querySelectorAll('#chatbot .message.bot')).map(e => e.innerText)")

        def user_messages():
            return browser.execute_script("return document.querySelectorAll('#chatbot .message.user').length")

        def ask(query, answer, turn):
            box = browser.find_element(By.CSS_SELECTOR, "#query textarea")
            box.send_keys(query)
            seen, deadline = [], time.time() + 90
            while user_messages() <= turn:   # Enter is ignored while the page still ends the last answer
                box.send_keys(Keys.ENTER)
                pressed = time.time()
                while user_messages() <= turn and time.time() < pressed + 2:
                    time.sleep(0.05)
                assert time.time() < deadline, "the question never showed in the page"
            while True:
                messages = bot_messages()
                text = messages[turn] if len(messages) > turn else ""
                if text and (not seen or seen[-1] != text):
                    seen.append(text)
                if " ".join(text.split()) == " ".join(answer.split()):
                    return seen
                if time.time() > deadline:
                    browser.save_screenshot(os.path.join(str(tmp_path), "failed.png"))
                    raise AssertionError(f"no full answer in the page; saw {seen[-3:]}; the server said:\n"
                                         f"{server.output()[-3000:]}")
                time.sleep(0.02)

        seen = ask(QUERY, CANNED_ANSWERS[0], 0)
        partial = [t for t in seen[:-1] if " ".join(CANNED_ANSWERS[0].split()).startswith(" ".join(t.split()))]
        assert len(partial) >= 2, seen     # the answer grew in the page before it was complete
        ask(QUERY2, CANNED_ANSWERS[1], 1)  # the second turn sees the first (the toy answers from history)
        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "web_demo.png")
        assert browser.save_screenshot(shot) and os.path.getsize(shot) > 10000
        browser.find_element(By.ID, "clear").click()
        deadline = time.time() + 20
        while bot_messages() or user_messages():
            assert time.time() < deadline, "Clear history left the messages"
            time.sleep(0.05)

        # Stop ends an answer half way: it grows no more
        box = browser.find_element(By.CSS_SELECTOR, "#query textarea")
        box.send_keys(QUERY)
        box.send_keys(Keys.ENTER)
        deadline = time.time() + 60
        while not (bot_messages() and len(bot_messages()[0].strip()) >= 3):
            assert time.time() < deadline, "no answer started"
            time.sleep(0.02)
        browser.find_element(By.ID, "stop").click()
        time.sleep(1.5)
        stopped = bot_messages()[0]
        time.sleep(1.0)
        assert bot_messages()[0] == stopped
        assert 0 < len("".join(stopped.split())) < len("".join(CANNED_ANSWERS[0].split()))
        assert "TOY model" in server.output()
    finally:
        server.stop()
