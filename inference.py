"""Chat with CuteGPT: the seed's two canned queries, your own queries, or an interactive terminal chat.

    # the seed's run: base XuYipei/kw-cutegpt-13b-base + LoRA Abbey4799/kw-cutegpt-13b-ift-lora in int8
    # (bitsandbytes, about 13.5 GiB on one GPU), the two canned queries as one conversation
    CUDA_VISIBLE_DEVICES=0 python inference.py

    # the full fine-tuned model instead of base + LoRA, in bf16 (about 26 GiB)
    CUDA_VISIBLE_DEVICES=0 python inference.py --lora_path none --quant bf16

    # your own conversation, greedy, saved as JSONL (one object per turn)
    python inference.py --queries "你好" "介绍一下复旦大学" --greedy --output_file chat.jsonl

    # a terminal chat: tokens appear as they are generated; /clear forgets the history, /quit leaves,
    # Ctrl-C stops the current answer (not the program)
    python inference.py --interactive

    # local checkpoints, e.g. what code/finetune.py saved (a LoRA adapter dir or a full model dir)
    python inference.py --model_path MODEL_DIR --lora_path ckp/llama_lora/llama_lora_epoch3

    # on a CPU only (fp32: about 53 GB of memory and slow for 13B; fine for small checkpoints)
    python inference.py --model_path MODEL_DIR --device cpu --greedy

    # offline, CPU only, nothing to download: a toy CuteGPT trained on data/test/ift_data.pkl by the
    # project's own pipeline the first time (a few minutes), cached in data/demo_model/ after that
    python inference.py --demo
    python inference.py --demo --interactive

Without a GPU the default precision is fp32 on the CPU (slow for 13B, and about 53 GB of memory);
--quant int8 / nf4 need bitsandbytes and are meant for a CUDA GPU.  Defaults come from
code/config.py (GENERATION, MEMORY_LIMIT, CANNED_QUERIES, BASE_MODEL, LORA_MODEL, FULL_FT_MODEL).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CODE = os.path.join(HERE, "code")
if CODE not in sys.path:
    sys.path.insert(0, CODE)

import config  # noqa: E402
import data_io  # noqa: E402
from data_io import DataError  # noqa: E402

# --demo's recipe lives in config.DEMO (one place to tune); changing it rebuilds the cache.
DEMO = config.DEMO
DEMO_INFO = "demo_info.json"
NONE_WORDS = ("none", "None", "")


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    g = config.GENERATION
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None,
                   help=f"base or full model: local directory or Hugging Face id (default: {config.BASE_MODEL}, "
                        f"or {config.FULL_FT_MODEL} with --lora_path none)")
    p.add_argument("--lora_path", default=None,
                   help=f"LoRA adapter to apply, or 'none' (default: {config.LORA_MODEL} when --model_path is not "
                        f"given, else none)")
    p.add_argument("--quant", choices=["int8", "nf4", "bf16", "fp16", "fp32"], default=None,
                   help="weights: int8/nf4 (bitsandbytes) or a float type (default: int8 on a CUDA GPU, "
                        "fp32 without one)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: the GPUs when visible, spread by accelerate; else cpu)")
    p.add_argument("--attn_implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention kernel (default: transformers' choice, sdpa)")
    p.add_argument("--queries", nargs="+", default=None, metavar="Q",
                   help="queries asked in order as one conversation (default: the two canned queries of "
                        "config.CANNED_QUERIES)")
    p.add_argument("--interactive", action="store_true",
                   help="chat in the terminal (/clear forgets the history, /quit leaves, Ctrl-C stops an answer)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (repeatable)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature (default: {g['temperature']})")
    p.add_argument("--top_p", type=float, default=None, help=f"nucleus sampling mass (default: {g['top_p']})")
    p.add_argument("--top_k", type=int, default=None, help=f"sample among the k likeliest tokens (default: {g['top_k']})")
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help=f"penalty on tokens already seen, 1 = none (default: {g['repetition_penalty']})")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"longest answer in tokens (default: {g['max_new_tokens']})")
    p.add_argument("--memory_limit", type=int, default=config.MEMORY_LIMIT,
                   help="earlier (query, response) turns fed back with each query, 0 = none (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling, for repeatable runs (default: none)")
    p.add_argument("--output_file", default=None,
                   help="write the turns as JSONL: query, response, history_used (turns of history fed), ...")
    p.add_argument("--show_prompt", action="store_true", help="print the full prompt of every turn (as the seed did)")
    p.add_argument("--demo", action="store_true",
                   help="offline toy model trained on data/test/ift_data.pkl (built and cached the first time)")
    p.add_argument("--demo_dir", default=None,
                   help=f"where --demo caches its model (default: {DEMO['cache_dir']} in the repo)")
    args = p.parse_args(argv)

    def conflict(message):
        p.error(message)

    if args.interactive and args.queries:
        conflict("--interactive reads the queries from the terminal: drop --queries, or drop --interactive "
                 "to run the listed queries")
    sampling_flags = [f"--{name}" for name in ("temperature", "top_p", "top_k") if getattr(args, name) is not None]
    if args.greedy and sampling_flags:
        conflict(f"--greedy does not sample, so {', '.join(sampling_flags)} would do nothing: drop one of them")
    if args.demo:
        given = [f for f, v in (("--model_path", args.model_path), ("--lora_path", args.lora_path),
                                ("--quant", args.quant)) if v is not None]
        if given:
            conflict(f"--demo loads its own toy model: drop {', '.join(given)} (or drop --demo)")
        if sampling_flags:
            conflict(f"--demo answers greedily (the toy model recalls its training answers): drop "
                     f"{', '.join(sampling_flags)}")
    elif args.demo_dir is not None:
        conflict("--demo_dir only applies with --demo")
    if args.temperature is not None and args.temperature <= 0:
        conflict("--temperature must be above 0 (use --greedy for deterministic answers)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        conflict("--top_p must be in (0, 1]")
    if args.top_k is not None and args.top_k < 0:
        conflict("--top_k must be 0 (no limit) or more")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        conflict("--repetition_penalty must be above 0 (1 = no penalty)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        conflict("--max_new_tokens must be 1 or more")
    if args.memory_limit < 0:
        conflict("--memory_limit must be 0 (no history) or more")
    if args.queries is not None and not all(q.strip() for q in args.queries):
        conflict("--queries: every query needs some text")
    return args


def model_choice(args):
    """(model_path, lora_path) from the flags: the seed's base + LoRA by default."""
    lora = args.lora_path
    if lora is not None and lora in NONE_WORDS:
        return (args.model_path or config.FULL_FT_MODEL), None
    if args.model_path is None:
        return config.BASE_MODEL, (lora or config.LORA_MODEL)
    return args.model_path, lora


def settings_from(args, demo=False):
    import chat

    overrides = dict(DEMO["generation"]) if demo else {}
    if args.greedy:
        overrides["do_sample"] = False
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return chat.generation_settings(**overrides)


# --------------------------------------------------------------------------------------------------
# --demo: build (once) and cache the toy model
# --------------------------------------------------------------------------------------------------
def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _demo_recipe(data_file):
    recipe = {k: v for k, v in DEMO.items() if k not in ("cache_dir", "generation", "data")}
    recipe["data_sha256"] = _sha256(data_file)
    recipe["tiny_model_defaults"] = config.TINY_MODEL
    return recipe


def _run_step(number, title, args, log):
    log(f"[demo {number}/3] {title}")
    start = time.perf_counter()
    # the steps' own output (progress bars, loss lines) goes to stderr, so stdout stays the chat
    proc = subprocess.run([sys.executable] + args, cwd=HERE, stdout=sys.stderr, stderr=sys.stderr,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise DataError(f"--demo: step {number} ({title}) failed with exit code {proc.returncode} "
                        f"(its output is above); run `python inference.py --demo` again after fixing it")
    log(f"[demo {number}/3] done in {time.perf_counter() - start:.0f}s")


def demo_training_file(work, data_file):
    """The dialogues the demo fine-tunes on: the sample, with the canned conversation repeated
    DEMO['repeat_canned'] times in all."""
    repeat = int(DEMO.get("repeat_canned", 1))
    if repeat <= 1:
        return data_file
    dialogues = data_io.load_dialogues(data_file)
    canned = [d for d in dialogues if [t["instruction"] for t in d[:len(config.CANNED_QUERIES)]]
              == config.CANNED_QUERIES]
    path = os.path.join(work, "train_dialogues.json")
    data_io.atomic_write_json(path, dialogues + canned * (repeat - 1))
    return path


def build_demo_model(work, data_file, log):
    """Run the pipeline in ``work``; returns the directory of the fine-tuned model inside it."""
    base, ids, ckp = (os.path.join(work, name) for name in ("base", "ids", "ckp"))
    os.makedirs(work, exist_ok=True)
    train_file = demo_training_file(work, data_file)
    tiny = [a for k, v in DEMO["tiny_model"].items() for a in (f"--{k}", str(v))]
    _run_step(1, "building a tiny random CuteGPT and its tokenizer (code/build_tiny_model.py)",
              ["code/build_tiny_model.py", "--data", data_file, "--out", base] + tiny, log)
    convert = ["code/convert_data.py", "--tokenizer", base, "--max_length", str(DEMO["max_length"]),
               "--out_data_path", ids + os.sep, "--data_file", train_file, "--template", DEMO["template"],
               "--max_dialogues_per_sample", str(DEMO["max_dialogues_per_sample"])]
    if DEMO["special_end_token"]:
        convert.append("--special_end_token")
    _run_step(2, "tokenizing the sample dialogues (code/convert_data.py)", convert, log)
    ft = DEMO["finetune"]
    _run_step(3, f"full fine-tuning for {ft['max_epoches']} epochs on the CPU (code/finetune.py)",
              ["code/finetune.py", "--model_path", base, "--dataset_type", "DatasetIds",
               "--data_path", os.path.join(ids, "llama_ift_data_ids.pkl"), "--max_length", str(DEMO["max_length"]),
               "--save_dir", ckp, "--save_name", "demo", "--save_steps", "1000000", "--no_progress"]
              + [a for k, v in ft.items() for a in (f"--{k}", str(v))], log)
    run_dir = os.path.join(ckp, "demo")
    epochs = sorted((int(name.rsplit("epoch", 1)[1]), name) for name in os.listdir(run_dir)
                    if name.startswith("demo_epoch") and name.rsplit("epoch", 1)[1].isdigit())
    if not epochs:
        raise DataError(f"--demo: code/finetune.py saved no checkpoint under {run_dir}")
    return os.path.join(run_dir, epochs[-1][1])


def ensure_demo_model(cache_dir=None, log=None):
    """The cached demo model directory; built first when missing or made by other settings/data."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cache_dir = os.path.abspath(cache_dir or os.path.join(HERE, DEMO["cache_dir"]))
    data_file = os.path.join(HERE, DEMO["data"])
    if not os.path.isfile(data_file):
        raise DataError(f"--demo trains on {DEMO['data']}, which is missing: restore it (git checkout -- "
                        f"{DEMO['data']})")
    recipe = _demo_recipe(data_file)
    model_dir = os.path.join(cache_dir, "model")
    try:
        with open(os.path.join(cache_dir, DEMO_INFO), encoding="utf-8") as f:
            if json.load(f).get("recipe") == recipe and os.path.isfile(os.path.join(model_dir, "config.json")):
                return model_dir
            log(f"--demo: the cached model in {cache_dir} was made from other settings or data: rebuilding it")
    except (OSError, ValueError):
        pass
    log(f"--demo: first run: building the toy model into {cache_dir} (a few minutes on a CPU; "
        f"cached for the next runs)")
    data_io.check_writable_dir(os.path.dirname(cache_dir), "folder for the demo model (--demo_dir)")
    start = time.perf_counter()
    with data_io.atomic_directory(cache_dir) as tmp:
        work = os.path.join(tmp, "work")
        trained = build_demo_model(work, data_file, log)
        shutil.move(trained, os.path.join(tmp, "model"))
        shutil.rmtree(work)
        data_io.atomic_write_json(os.path.join(tmp, DEMO_INFO),
                                  {"recipe": recipe, "build_seconds": round(time.perf_counter() - start, 1)})
    os.chmod(cache_dir, 0o755)   # the temporary directory was private (mkdtemp)
    log(f"--demo: toy model ready in {time.perf_counter() - start:.0f}s")
    return model_dir


# --------------------------------------------------------------------------------------------------
# running the conversation
# --------------------------------------------------------------------------------------------------
def note(message):
    print(f"note: {message}", file=sys.stderr, flush=True)


class TurnWriter:
    """--output_file: one JSON object per turn, written (and flushed) as each turn ends."""

    def __init__(self, path):
        self.file = None
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            data_io.check_writable_dir(directory, "folder of --output_file")
            try:
                self.file = open(path, "w", encoding="utf-8")
            except OSError as e:
                raise DataError(f"--output_file {path}: cannot be written ({e.strerror})")

    def write(self, index, result):
        if self.file is None:
            return
        record = {"turn": index, "query": result.query, "response": result.response,
                  "history_used": result.history_used, "prompt_tokens": result.prompt_tokens,
                  "new_tokens": result.new_tokens, "finish_reason": result.finish_reason,
                  "query_truncated": result.query_truncated}
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def answer(session, query, show_prompt=False):
    """Stream one answer to stdout; Ctrl-C stops it.  Returns the TurnResult."""
    reply = session.stream(query)   # chat.ChatError is a DataError: reported as one line
    for message in reply.prepared.notices:
        note(message)
    if show_prompt:
        print(session.tokenizer.decode(reply.prepared.input_ids), flush=True)
        print("-" * 40, flush=True)
    print("答：", end="", flush=True)
    try:
        for piece in reply:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        reply.cancel()
        print(" [stopped]", end="", flush=True)
    while True:
        try:
            result = reply.result()
            break
        except KeyboardInterrupt:  # a second Ctrl-C while the generation winds down
            reply.cancel()
    print(flush=True)
    return result


def run_queries(session, queries, writer, show_prompt=False):
    for index, query in enumerate(queries):
        print(f"问：{query}", flush=True)
        result = answer(session, query, show_prompt)
        writer.write(index, result)
        print(flush=True)


HELP = ("Type a question and press Enter.  /clear forgets the conversation, /quit leaves (or Ctrl-D, or "
        "Ctrl-C at an empty prompt); Ctrl-C during an answer stops that answer.")


def interactive(session, writer, show_prompt=False):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(HELP, flush=True)
    index = 0
    while True:
        try:
            line = input("\n问：")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            break
        query = line.strip()
        if not query:
            continue
        if query in ("/quit", "/exit"):
            break
        if query == "/clear":
            session.clear()
            print("(history cleared)", flush=True)
            continue
        if query in ("/help", "/?"):
            print(HELP, flush=True)
            continue
        try:
            result = answer(session, query, show_prompt)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        writer.write(index, result)
        index += 1
    print("bye", flush=True)


def toy_notice(model):
    size = sum(p.numel() for p in model.parameters())
    return (f"This is a TOY model: a {size / 1e6:.1f}M-parameter CuteGPT trained for a few minutes on the sample "
            f"dialogues of {DEMO['data']} (the canned conversation repeated {DEMO['repeat_canned']} times). It "
            f"recalls the sample answers to the two canned queries and little else; for real answers load "
            f"CuteGPT without --demo.")


def main(argv=None):
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    import chat
    import model_loader

    writer = None
    try:
        writer = TurnWriter(args.output_file)   # a bad path fails before minutes of loading
        if args.demo:
            model_path, lora_path = ensure_demo_model(args.demo_dir), None
            quant, device = "fp32", args.device or "cpu"
        else:
            model_path, lora_path = model_choice(args)
            quant, device = args.quant, args.device
        model, tokenizer = model_loader.load_model_and_tokenizer(
            model_path, lora_path=lora_path, quant=quant, device=device, attn_implementation=args.attn_implementation)
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)
        if args.demo:
            print(toy_notice(model), flush=True)
        session = chat.Chat(model, tokenizer, settings_from(args, demo=args.demo), memory_limit=args.memory_limit)
        if args.interactive:
            interactive(session, writer, args.show_prompt)
        else:
            run_queries(session, args.queries or config.CANNED_QUERIES, writer, args.show_prompt)
    except DataError as e:
        data_io.fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if writer is not None:
            writer.close()
    if args.output_file:
        note(f"wrote {args.output_file}")


if __name__ == "__main__":
    main()
