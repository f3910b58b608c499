"""OpenAI conformance of code/api_server.py (issue 18, item 6), on the toy CuteGPT of the shared demo
fixture served in this process (uvicorn in a thread, the API key set), spoken to with the official
openai client and with raw HTTP: the forms of /v1/completions' prompt (one choice per prompt, in
order, streamed with its index), n > 1, echo, OpenAI's context-length error (wording, code, param,
which the client parses), stream_options without stream, and a 400 naming the field for everything
the server does not support.  The answers are checked against the model run directly in this process.
"""
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from openai import OpenAI

from conftest import CANNED_ANSWERS
from test_serving import free_port

import api_protocol
import api_server
import chat
import config
import prompt

KEY = "conformance-key"
MODEL = config.SERVER["model_name"]
QUERY = config.CANNED_QUERIES[0]
MAX_CHOICES = config.SERVER["max_choices"]


@pytest.fixture(scope="module")
def base(loaded):
    model, tokenizer = loaded
    app = api_server.create_app(model, tokenizer, api_key=KEY, defaults=chat.default_settings(demo=True), poll_s=0.1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the in-process server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(base):
    with OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def post(base, path, body):
    return httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def error_of(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


def solo(loaded, ids, max_tokens):
    """The model's greedy completion of ``ids`` in this process: (text, tokens generated, finish reason)."""
    model, tokenizer = loaded
    settings = chat.generation_settings(do_sample=False, repetition_penalty=1.0, max_new_tokens=max_tokens)
    result = chat.Reply(model, tokenizer, chat.Prompt(list(ids), 0, "", False), settings, "").result()
    return result.response, result.new_tokens, result.finish_reason


def chat_prompt_text(query):
    return "".join(text for text, _ in prompt.conversation_segments(prompt.chat_turns([], query)))


# --------------------------------------------------------------------------------------------------
# the wire format alone (no server)
# --------------------------------------------------------------------------------------------------
def test_protocol_checks_each_field():
    defaults = chat.default_settings(demo=True)
    request = api_protocol.generation_request({"n": 3, "seed": 7}, defaults)
    assert [request.for_choice(k).seed for k in range(3)] == [7, 8, 9]           # each choice its own seed
    assert api_protocol.generation_request({"seed": -1}, defaults).for_choice(0).seed == 2 ** 32 - 1
    assert api_protocol.generation_request({}, defaults).for_choice(2).seed is None
    on = api_protocol.generation_request({"stream": True, "stream_options": {"include_usage": True}}, defaults)
    assert on.stream and on.include_usage
    for body, param in [({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"stream": False, "stream_options": {}}, "stream_options"),
                        ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
                         "stream_options.continuous_usage_stats"),
                        ({"min_p": 0.1}, "min_p"), ({"echo": True}, "echo"), ({"prompt": "x"}, "prompt"),
                        ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"presence_penalty": 0.5}, "presence_penalty"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                        ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"store": True}, "store"), ({"n": 0}, "n"), ({"n": MAX_CHOICES + 1}, "n"),
                        ({"n": True}, "n")]:
        with pytest.raises(api_protocol.ApiError) as info:
            api_protocol.generation_request(body, defaults)
        assert info.value.status == 400 and info.value.param == param, (body, info.value.message)
    # their "off" values are accepted (clients send them by default); 0 is no False for logprobs
    api_protocol.generation_request({"logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "user": "u",
                                     "frequency_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none",
                                     "response_format": {"type": "text"}, "metadata": {"a": "b"}}, defaults)
    for body, param in [({"logprobs": 0}, "logprobs"), ({"suffix": "end"}, "suffix"),
                        ({"best_of": 2}, "best_of"), ({"messages": []}, "messages"), ({"echo": 1}, "echo")]:
        with pytest.raises(api_protocol.ApiError) as info:
            api_protocol.generation_request(body, defaults, api_protocol.COMPLETION)
        assert info.value.param == param, (body, info.value.message)
    assert api_protocol.generation_request({"best_of": 2, "n": 2, "echo": True}, defaults, api_protocol.COMPLETION).echo


def test_completion_prompt_forms():
    prompts = api_protocol.completion_prompts
    assert prompts("ab", 10) == ["ab"] and prompts(["a", "b"], 10) == ["a", "b"]
    assert prompts([1, 2], 10) == [[1, 2]] and prompts([[1], [2, 3]], 10) == [[1], [2, 3]]
    for value, words in [("", "prompt is empty"), ([], "must be a string"), ([[]], "prompt is empty"),
                         (["a", [1]], "must be a string"), ([1, "a"], "must be a string"), (None, "must be"),
                         ([[1], [10]], "prompt[1] holds the token id 10"), ([-1], "token id -1"),
                         ([True], "must be a string"), (["x"] * (MAX_CHOICES + 1), "more than")]:
        with pytest.raises(api_protocol.ApiError, match=words.replace("[", r"\[")) as info:
            prompts(value, 10)
        assert info.value.param == "prompt"


# --------------------------------------------------------------------------------------------------
# /v1/completions: the four prompt forms, one choice per prompt in order, streamed with the index
# --------------------------------------------------------------------------------------------------
def test_completions_take_strings_and_token_ids(client, loaded):
    _, tokenizer = loaded
    texts = [chat_prompt_text(QUERY), chat_prompt_text(config.CANNED_QUERIES[1]), "今天天气"]
    ids = prompt.tokenize_segment_texts(tokenizer, texts)
    expected = [solo(loaded, one, 12) for one in ids]
    assert expected[0][0] == CANNED_ANSWERS[0][:len(expected[0][0])] and len({e[0] for e in expected}) == 3

    def texts_of(response):
        assert [c.index for c in response.choices] == list(range(len(response.choices)))
        return [c.text for c in response.choices]

    one = client.completions.create(model=MODEL, prompt=texts[0], max_tokens=12)
    assert texts_of(one) == [expected[0][0]] and one.usage.completion_tokens == expected[0][1]
    for form in (texts, ids):   # a list of strings, a list of token-id lists
        many = client.completions.create(model=MODEL, prompt=form, max_tokens=12)
        assert texts_of(many) == [e[0] for e in expected]
        assert [c.finish_reason for c in many.choices] == [e[2] for e in expected]
        assert many.usage.prompt_tokens == sum(map(len, ids))
        assert many.usage.completion_tokens == sum(e[1] for e in expected)
    assert texts_of(client.completions.create(model=MODEL, prompt=ids[2], max_tokens=12)) == [expected[2][0]]

    # streamed: every chunk names its choice; the pieces of each index join into its answer
    chunks = list(client.completions.create(model=MODEL, prompt=texts, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    joined, finishes = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        (c,) = chunk.choices
        joined[c.index] += c.text
        if c.finish_reason:
            assert finishes[c.index] is None
            finishes[c.index] = c.finish_reason
    assert joined == [e[0] for e in expected] and finishes == [e[2] for e in expected]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(e[1] for e in expected)


def test_n_answers_per_prompt(client, base, loaded):
    # greedy: n equal answers, each the model's
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}], n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [CANNED_ANSWERS[0]] * 3
    single = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}])
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens                     # the prompt is read once
    assert reply.usage.completion_tokens == 3 * single.usage.completion_tokens

    # sampled with a seed: the choices differ, repeat with the same seed, and choice k is seed + k's answer
    def sampled(n, seed):
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "随便说点什么"}],
                                                n=n, seed=seed, temperature=1.5, max_tokens=12, extra_body={"top_k": 0})
        return [c.message.content for c in answer.choices]

    three = sampled(3, 40)
    assert len(set(three)) > 1 and sampled(3, 40) == three
    assert [sampled(1, 40 + k)[0] for k in range(3)] == three

    # completions: index = prompt index x n + k
    _, tokenizer = loaded
    texts = [chat_prompt_text(QUERY), "今天天气"]
    expected = [solo(loaded, ids, 8)[0] for ids in prompt.tokenize_segment_texts(tokenizer, texts)]
    answer = client.completions.create(model=MODEL, prompt=texts, n=2, max_tokens=8)
    assert [(c.index, c.text) for c in answer.choices] == list(enumerate(
        [expected[0], expected[0], expected[1], expected[1]]))

    # a streamed chat with n=2: a role chunk for each index, then content pieces that join per index
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUERY}],
                                                 n=2, stream=True))
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    joined = ["", ""]
    for chunk in chunks:
        joined[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert joined == [CANNED_ANSWERS[0]] * 2
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1]
    too_many = post(base, "/v1/completions", {"prompt": texts, "n": MAX_CHOICES // 2 + 1})
    assert "more than this server gives" in error_of(too_many, "n")["message"]


def test_echo(client, base, loaded):
    _, tokenizer = loaded
    text = chat_prompt_text(QUERY)
    ids = prompt.tokenize_segment_texts(tokenizer, [text])[0]
    completion = solo(loaded, ids, 10)[0]
    answer = client.completions.create(model=MODEL, prompt=text, echo=True, max_tokens=10)
    assert answer.choices[0].text == text + completion and answer.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model=MODEL, prompt=[ids], echo=True, max_tokens=10)
    assert by_ids.choices[0].text == tokenizer.decode(ids) + completion
    chunks = list(client.completions.create(model=MODEL, prompt=text, echo=True, max_tokens=10, stream=True))
    assert chunks[0].choices[0].text == text and "".join(c.choices[0].text for c in chunks) == text + completion
    assert client.completions.create(model=MODEL, prompt=text, max_tokens=10).choices[0].text == completion
    error = error_of(post(base, "/v1/completions", {"prompt": text, "echo": True, "logprobs": 1}), "logprobs")
    assert "log probabilities" in error["message"]


# --------------------------------------------------------------------------------------------------
# OpenAI's context-length error, and a 400 naming the field for what is not supported
# --------------------------------------------------------------------------------------------------
def test_context_length_exceeded_in_openai_words(client, base, loaded):
    _, tokenizer = loaded
    query = "这是一段很长的文字。" * 400
    system = "你是一个助手。"
    prompt_tokens = len(chat.encode_prompt(tokenizer, [], query, system + "\n"))
    context = 2048
    assert prompt_tokens + 100 > context
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=100, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": query}])
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    assert info.value.param == "messages" and info.value.type == "invalid_request_error"
    assert info.value.body["message"] == (
        f"This model's maximum context length is {context} tokens. However, you requested {prompt_tokens + 100} "
        f"tokens ({prompt_tokens} in the messages, 100 in the completion). Please reduce the length of the "
        f"messages or completion.")
    short = len(chat.encode_prompt(tokenizer, [], "你好"))
    error = error_of(post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}],
                                                         "max_tokens": context}), "messages")
    assert error["code"] == "context_length_exceeded" and f"({short} in the messages, {context} in" in error["message"]

    ids = prompt.tokenize_segment_texts(tokenizer, [query])[0]
    assert len(ids) > context
    for form in (query, ids, ["短", query]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=form, max_tokens=64)
        assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
        assert info.value.body["message"] == (
            f"This model's maximum context length is {context} tokens, however you requested {len(ids) + 64} tokens "
            f"({len(ids)} in your prompt; 64 for the completion). Please reduce your prompt; or completion length.")
    assert client.completions.create(model=MODEL, prompt=ids[:context - 4], max_tokens=4).usage.prompt_tokens == \
        context - 4                                                                        # exactly full: served


def test_unsupported_fields_are_refused_by_name(client, base):
    user = [{"role": "user", "content": QUERY}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user, stream_options={"include_usage": True})
    assert info.value.param == "stream_options" and "stream=true" in info.value.body["message"]
    chat_path, text_path = "/v1/chat/completions", "/v1/completions"
    for path, field, value in [(chat_path, "min_p", 0.05), (chat_path, "echo", True), (chat_path, "logprobs", True),
                               (chat_path, "frequency_penalty", 1.0), (chat_path, "tools", [{"type": "function"}]),
                               (chat_path, "response_format", {"type": "json_object"}), (text_path, "suffix", "x"),
                               (text_path, "best_of", 3), (text_path, "logprobs", 2), (text_path, "messages", user)]:
        body = {"messages": user} if path == chat_path else {"prompt": "你好"}
        message = error_of(post(base, path, dict(body, **{field: value})), field)["message"]
        assert field in message, message
    assert "vocabulary" in error_of(post(base, text_path, {"prompt": [[5, 10 ** 6]]}), "prompt")["message"]
    # the values clients send by default are no reason to refuse
    fine = post(base, chat_path, {"messages": user, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False,
                                  "user": "tester", "stream": False, "n": 1, "response_format": {"type": "text"}})
    assert fine.status_code == 200 and fine.json()["choices"][0]["message"]["content"] == CANNED_ANSWERS[0]
    streamed = post(base, chat_path, {"messages": user, "stream": True, "stream_options": {"include_usage": True}})
    lines = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["usage"]["completion_tokens"] > 10
    assert httpx.get(base + "/health").json()["failed"] == 0


def test_stream_events_read_together_are_joined_per_choice():
    """What the server reads from its event queue at once goes out as one chunk per run of one choice's
    text, in order; ends and other choices' texts are kept where they were."""
    done = object()
    events = [(0, "text", "a"), (0, "text", "b"), (1, "text", "c"), (1, "text", "d"), (0, "text", "e"),
              (0, "done", done), (1, "text", "f")]
    assert api_server.coalesced(events) == [(0, "text", "ab"), (1, "text", "cd"), (0, "text", "e"),
                                            (0, "done", done), (1, "text", "f")]
    assert api_server.coalesced([]) == []
