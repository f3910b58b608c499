"""A standard serving engine on a directory the project wrote: `transformers serve` loads the demo model
(tokenizer, chat template, generation config as model_files.py writes them) and answers the canned queries
through the official openai client word for word as `inference.py --demo` prints them (greedy), with
continuous batching on a paged cache sized for a CPU."""
import os
import subprocess
import sys
import time

import httpx
import pytest

import config
from conftest import CANNED_ANSWERS, REPO, kill_tree
from test_serving import free_port

# transformers' own CLI entry point (the `transformers` command), run with this interpreter
SERVE = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
# continuous batching sized for a CPU (its defaults assume a GPU's memory)
CPU_BATCHING = ["--continuous-batching", "--cb-block-size", "64", "--cb-num-blocks", "32",
                "--cb-max-batch-tokens", "512"]


def start(model_dir, port, extra, log_path, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               NO_PROXY="127.0.0.1,localhost")
    log = open(log_path, "w")
    proc = subprocess.Popen(SERVE + [model_dir, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
                            + extra, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None or time.time() > deadline:
            kill_tree(proc.pid)
            proc.wait()
            log.close()
            pytest.fail(f"transformers serve did not come up:\n{open(log_path).read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


@pytest.mark.slow
def test_transformers_serve_answers_as_inference_demo(demo_run, model_dir, tmp_path):
    from openai import OpenAI

    port = free_port()
    # the command of docs/serving.md: continuous batching (plain generate gave the same answers, 40 s a run)
    proc, log = start(model_dir, port, CPU_BATCHING, tmp_path / "serve.log")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
        messages, answers = [], []
        for query in config.CANNED_QUERIES:
            messages.append({"role": "user", "content": query})
            # greedy; no other setting: the directory's generation config stops at '<end>' and sets no penalty
            reply = client.chat.completions.create(model=model_dir, messages=messages, temperature=0)
            answers.append(reply.choices[0].message.content)
            messages.append({"role": "assistant", "content": answers[-1]})
    finally:
        kill_tree(proc.pid)
        proc.wait()
        log.close()
    assert answers == CANNED_ANSWERS, open(tmp_path / "serve.log").read()[-3000:]
    printed = demo_run[0].stdout          # what `inference.py --demo` printed
    for query, answer in zip(config.CANNED_QUERIES, answers):
        assert f"问：{query}\n答：{answer}\n" in printed
