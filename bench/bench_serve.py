"""Serving throughput of the API server under concurrent clients: it starts `code/api_server.py --demo`
(the offline toy model; built and cached the first time) on a free port, or measures a running server
(--url), and for each number of clients prints aggregate tokens/s, p50/p95 latency, median time to the
first token, and the throughput of the most clients over one client.

    # the toy model on this machine: 1, 4 and 16 clients, each sending 4 requests back to back
    python bench/bench_serve.py

    # a server already running, 1, 16 and 64 clients
    python bench/bench_serve.py --url http://127.0.0.1:8000 --clients 1,16,64 --json serve.json

    # LLaMA-13B's shape with random weights (bf16 on a GPU; written once into --weights_dir, 26 GB)
    python bench/bench_serve.py --shape 13b --weights_dir /tmp/serve_13b --clients 1,16,64

Every request is a streamed chat completion (temperature 0, --max_tokens, usage included) of a question
from the sample dialogues, the clients cycling through them.  Latency: request sent to the last event;
time to first token: to the first content chunk; tokens: the completion tokens the server reports (the
toy model stops at its end marker, so answers may be shorter than --max_tokens).  Aggregate tokens/s =
all completion tokens / wall time of the round.  Each number of clients runs --repeats rounds (the
numbers taking turns); its row is the round of median tokens/s.  The machine's load average is printed
with the figures: on a shared machine they are only as good as the quiet it had.  The clients run on
the same machine as a server started here; they parse a chunk only where it can matter (until the
first content, then the usage chunk), not once per token.
"""
import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "code"))

import config  # noqa: E402
import data_io  # noqa: E402
import distributed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="measure this running server (http://HOST:PORT) instead of "
                                               "starting code/api_server.py --demo")
    p.add_argument("--api_key", default=None, help="the server's --api_key, if it has one")
    p.add_argument("--server_args", default="", help="more flags for the started server, e.g. '--demo_dir DIR'")
    p.add_argument("--shape", choices=["13b", "tiny"], default=None,
                   help="serve a model of this shape with random weights instead of the toy model (bf16 on a "
                        "GPU, fp32 on a CPU; random answers run to --max_tokens)")
    p.add_argument("--weights_dir", default=None, help="with --shape: the model directory, its weights written "
                                                       "once (default: a temporary one, removed at the end)")
    p.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients (default: %(default)s)")
    p.add_argument("--requests_per_client", type=int, default=4, help="requests each client sends back to "
                                                                      "back (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=64, help="max_tokens of each request (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per number of clients, in turn; each row is "
                                                          "the round of median tok/s (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--server_log", default=os.path.join(tempfile.gettempdir(), "bench_serve_server.log"),
                   help="where the started server's output goes (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients {args.clients}: give numbers separated by commas, e.g. 1,4,16")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients: every number must be 1 or more")
    if args.requests_per_client < 1 or args.max_tokens < 1 or args.repeats < 1:
        p.error("--requests_per_client, --max_tokens and --repeats must be 1 or more")
    if args.shape and args.url:
        p.error("--shape starts a server: leave out --url")
    if args.weights_dir and not args.shape:
        p.error("--weights_dir goes with --shape")
    return args


def questions():
    dialogues = data_io.load_dialogues(os.path.join(REPO, config.DEMO["data"]))
    return [dialogue[0]["instruction"] for dialogue in dialogues]


def shape_model(shape, directory):
    """Server flags for a model of ``shape`` with seeded random weights in ``directory`` (written once) and
    the tiny SentencePiece tokenizer."""
    import torch

    import bench_common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant, dtype = ("bf16", torch.bfloat16) if device == "cuda" else ("fp32", torch.float32)
    if os.path.isfile(os.path.join(directory, "config.json")) and bench_common.has_weights(directory):
        print(f"serving the model already in {directory} ({quant}, {device})", flush=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_dir = bench_common.build_tokenizer(os.path.join(tmp, "tokenizer"))
            bench_common.prepare_model_dir(bench_common.shape_of(shape), directory, tokenizer_dir)
        print(f"random {shape} weights into {directory} ({quant}, {device}) ...", flush=True)
        bench_common.save_random_weights(directory, torch.device(device), dtype, seed=0)
    return ["--model_path", directory, "--lora_path", "none", "--quant", quant, "--device", device]


def start_server(model_flags, server_args, log_path):
    """`python code/api_server.py MODEL_FLAGS` on a free port, its output in ``log_path``; (process, base url)."""
    port = distributed.free_port()
    command = [sys.executable, "code/api_server.py", *model_flags, "--port", str(port)] + shlex.split(server_args)
    print(f"starting {' '.join(command[1:])} (its output: {log_path})"
          + (f"; a first --demo builds the toy model into {config.DEMO['cache_dir']} (a few minutes on a CPU)"
             if "--demo" in model_flags else "") + " ...", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:   # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                raise data_io.DataError(f"code/api_server.py exited: {log.read()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise data_io.DataError(f"code/api_server.py did not come up within 30 minutes (see {log_path})")


async def one_request(session, url, question, max_tokens):
    """(latency s, time to first token s, completion tokens) of one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with session.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise data_io.DataError(f"the server answered {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            # the clients share the machine with the server: a chunk is parsed only when it can matter
            # (until the first content, the usage chunk, an error), not once per token
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is not None and line.endswith('"usage": null}') and '"error"' not in line:
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise data_io.DataError(f"the server failed: {chunk['error']}")
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first if first is not None else float("nan"), tokens


async def round_of(base, api_key, clients, per_client, max_tokens, asked):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, headers=headers, limits=limits) as session:
        async def client(index):
            return [await one_request(session, base + "/v1/chat/completions",
                                      asked[(index * per_client + k) % len(asked)], max_tokens)
                    for k in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[client(i) for i in range(clients)]) for r in rs]
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r[2] for r in results),
            "wall_s": round(wall, 3), "tok_per_s": round(sum(r[2] for r in results) / wall, 1),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "ttft_median_s": round(statistics.median(r[1] for r in results), 3)}


def main(argv=None):
    args = parse_args(argv)
    proc, weights = None, None
    try:
        base = args.url.rstrip("/") if args.url else None
        if base is None:
            model_flags = ["--demo"]
            if args.shape:
                weights = None if args.weights_dir else tempfile.TemporaryDirectory()
                model_flags = shape_model(args.shape, args.weights_dir or weights.name)
            proc, base = start_server(model_flags, args.server_args, args.server_log)
        asked = questions()
        asyncio.run(round_of(base, args.api_key, 2, 1, 8, asked))   # warm-up, not counted
        rows = []
        print("| clients | requests | aggregate tok/s | p50 latency | p95 latency | median TTFT | load avg |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        rounds = {clients: [] for clients in args.clients}
        for _ in range(args.repeats):   # in turn, so a busy spell of a shared machine hits every row alike
            for clients in args.clients:
                row = asyncio.run(round_of(base, args.api_key, clients, args.requests_per_client, args.max_tokens,
                                           asked))
                row["load_avg_1m"] = round(os.getloadavg()[0], 2)
                rounds[clients].append(row)
        for clients in args.clients:
            row = sorted(rounds[clients], key=lambda r: r["tok_per_s"])[len(rounds[clients]) // 2]
            row["tok_per_s_rounds"] = [r["tok_per_s"] for r in rounds[clients]]
            rows.append(row)
            print(f"| {clients} | {row['requests']} | {row['tok_per_s']} | {row['p50_s']} s | {row['p95_s']} s | "
                  f"{row['ttft_median_s']} s | {row['load_avg_1m']} |", flush=True)
        most = max(rows, key=lambda r: r["clients"])
        one = min(rows, key=lambda r: r["clients"])
        ratio = most["tok_per_s"] / one["tok_per_s"]
        print(f"ratio {most['clients']} clients / {one['clients']} client: {ratio:.2f}x aggregate tok/s "
              f"({os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
        if args.json:
            data_io.atomic_write_json(args.json, {"rows": rows, "ratio": round(ratio, 2), "url": base,
                                                  "model": args.shape or ("demo" if proc else "running server"),
                                                  "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
                                                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")})
    except (data_io.DataError, httpx.HTTPError) as e:
        data_io.fail(str(e))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if weights is not None:
            weights.cleanup()


if __name__ == "__main__":
    main()
