"""Chat with CuteGPT: the seed's two canned queries, your own queries, or an interactive terminal chat.

    # the seed's run: base XuYipei/kw-cutegpt-13b-base + LoRA Abbey4799/kw-cutegpt-13b-ift-lora in int8
    # (bitsandbytes, about 13.5 GiB on one GPU), the two canned queries as one conversation
    CUDA_VISIBLE_DEVICES=0 python inference.py

    # the full fine-tuned model instead of base + LoRA, in bf16 (about 26 GiB)
    CUDA_VISIBLE_DEVICES=0 python inference.py --lora_path none --quant bf16

    # your own conversation, greedy, saved as JSONL (one object per turn)
    python inference.py --queries "你好" "介绍一下复旦大学" --greedy --output_file chat.jsonl

    # the fast path (config.FAST): static KV cache, the decoding step compiled with CUDA graphs, and int8
    # weights by torchao's weight-only kernels instead of bitsandbytes (first answer waits for the compile)
    CUDA_VISIBLE_DEVICES=0 python inference.py --fast --quant int8

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
import json
import os
import sys

import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "code"))
import chat  # noqa: E402
import config  # noqa: E402
import data_io  # noqa: E402
import demo_model  # noqa: E402
import model_loader  # noqa: E402
from data_io import DataError, note  # noqa: E402


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    g = config.GENERATION
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_loader.add_model_arguments(p)
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
    args = p.parse_args(argv)

    def conflict(message):
        p.error(message)

    if args.interactive and args.queries:
        conflict("--interactive reads the queries from the terminal: drop --queries, or drop --interactive "
                 "to run the listed queries")
    sampling_flags = [f"--{name}" for name in ("temperature", "top_p", "top_k") if getattr(args, name) is not None]
    if args.greedy and sampling_flags:
        conflict(f"--greedy does not sample, so {', '.join(sampling_flags)} would do nothing: drop one of them")
    model_loader.check_model_arguments(p, args)
    if args.demo and sampling_flags:
        conflict(f"--demo answers greedily (the toy model recalls its training answers): drop "
                 f"{', '.join(sampling_flags)}")
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


# --------------------------------------------------------------------------------------------------
# running the conversation
# --------------------------------------------------------------------------------------------------
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


def main(argv=None):
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")

    writer = None
    try:
        writer = TurnWriter(args.output_file)   # a bad path fails before minutes of loading
        model, tokenizer = model_loader.load_from_args(args)
        if args.seed is not None:
            transformers.set_seed(args.seed)
        if args.demo:
            print(demo_model.toy_notice(model), flush=True)
        settings = chat.user_settings(chat.default_settings(args.demo), 0 if args.greedy else args.temperature,
                                      args.top_p, args.top_k, args.repetition_penalty, args.max_new_tokens)
        session = chat.Chat(model, tokenizer, settings, memory_limit=args.memory_limit)
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
