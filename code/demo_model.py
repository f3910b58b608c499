"""The offline toy CuteGPT behind every script's --demo flag: built once by the project's own pipeline
(build_tiny_model.py -> convert_data.py -> finetune.py, recipe in config.DEMO) and cached.

    python inference.py --demo          # builds data/demo_model/ the first time (a few minutes on a CPU)
    python code/api_server.py --demo    # the same cached model behind the API server

Nothing here downloads anything; the model recalls the sample answers to the canned queries.
"""
import collections
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from tqdm import tqdm

import config
import data_io
import model_files
from data_io import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --demo's recipe lives in config.DEMO (one place to tune); changing it rebuilds the cache.
DEMO = config.DEMO
DEMO_INFO = "demo_info.json"
BUILD_LOG = "build.log"                                # the steps' whole output, kept beside the cache
STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")           # finetune.py's log line of an optimizer step


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _demo_recipe(data_file):
    recipe = {k: v for k, v in DEMO.items() if k not in ("cache_dir", "generation", "data")}
    recipe["data_sha256"] = _sha256(data_file)
    recipe["tiny_model_defaults"] = config.TINY_MODEL
    recipe["model_files"] = model_files.FORMAT   # a cache made before the engine files were written is rebuilt
    return recipe


def _run_step(number, title, args, bar, log_file):
    """Run one pipeline step with its output going to ``log_file`` (the fine-tuning's step lines move
    ``bar``); on failure, raise with the output's last lines."""
    bar.set_description_str(f"[demo {number}/3] {title}")
    command = [sys.executable] + args
    log_file.write(f"==== [demo {number}/3] {title}\n$ {shlex.join(command)}\n")
    tail = collections.deque(maxlen=30)
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          encoding="utf-8", errors="replace", env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
        for line in proc.stdout:
            log_file.write(line)
            tail.append(line)
            step = STEP_LINE.match(line)
            if step:
                bar.total, bar.n = int(step.group(2)), int(step.group(1))
                bar.refresh()
    log_file.write(f"==== exit code {proc.returncode}\n")
    log_file.flush()
    if proc.returncode != 0:
        raise DataError(f"--demo: step {number} ({title}) failed with exit code {proc.returncode}; its last lines:\n"
                        + "".join(tail).rstrip())


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
    """Run the pipeline in ``work`` under one progress bar, the steps' output in ``work``/build.log;
    returns the directory of the fine-tuned model inside it."""
    base, ids, ckp = (os.path.join(work, name) for name in ("base", "ids", "ckp"))
    os.makedirs(work, exist_ok=True)
    train_file = demo_training_file(work, data_file)
    tiny = [a for k, v in DEMO["tiny_model"].items() for a in (f"--{k}", str(v))]
    convert = ["code/convert_data.py", "--tokenizer", base, "--max_length", str(DEMO["max_length"]),
               "--out_data_path", ids + os.sep, "--data_file", train_file, "--template", DEMO["template"],
               "--max_dialogues_per_sample", str(DEMO["max_dialogues_per_sample"])]
    if DEMO["special_end_token"]:
        convert.append("--special_end_token")
    ft = DEMO["finetune"]
    finetune = ["code/finetune.py", "--model_path", base, "--dataset_type", "DatasetIds",
                "--data_path", os.path.join(ids, "llama_ift_data_ids.pkl"), "--max_length", str(DEMO["max_length"]),
                "--save_dir", ckp, "--save_name", "demo", "--save_steps", "1000000", "--no_progress"]
    finetune += [a for k, v in ft.items() for a in (f"--{k}", str(v))]
    # stderr: stdout stays the chat
    with open(os.path.join(work, BUILD_LOG), "w", encoding="utf-8") as log_file, \
            tqdm(file=sys.stderr, unit="step", dynamic_ncols=True) as bar:
        _run_step(1, "a tiny random CuteGPT and its tokenizer (code/build_tiny_model.py)",
                  ["code/build_tiny_model.py", "--data", data_file, "--out", base] + tiny, bar, log_file)
        _run_step(2, "tokenizing the sample dialogues (code/convert_data.py)", convert, bar, log_file)
        _run_step(3, f"full fine-tuning for {ft['max_epoches']} epochs on the CPU (code/finetune.py)", finetune,
                  bar, log_file)
    run_dir = os.path.join(ckp, "demo")
    epochs = sorted((int(name.rsplit("epoch", 1)[1]), name) for name in os.listdir(run_dir)
                    if name.startswith("demo_epoch") and name.rsplit("epoch", 1)[1].isdigit())
    if not epochs:
        raise DataError(f"--demo: code/finetune.py saved no checkpoint under {run_dir}")
    return os.path.join(run_dir, epochs[-1][1])


def ensure_demo_model(cache_dir=None, log=None):
    """The cached demo model directory; built first when missing or made by other settings/data."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cache_dir = os.path.abspath(cache_dir or os.path.join(REPO, DEMO["cache_dir"]))
    data_file = os.path.join(REPO, DEMO["data"])
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
    build_log = cache_dir + "_" + BUILD_LOG
    log(f"--demo: first run: building the toy model into {cache_dir} (a few minutes on a CPU; "
        f"cached for the next runs; the steps' output goes to {build_log})")
    data_io.check_writable_dir(os.path.dirname(cache_dir), "folder for the demo model (--demo_dir)")
    start = time.perf_counter()
    with data_io.atomic_directory(cache_dir) as tmp:
        work = os.path.join(tmp, "work")
        try:
            trained = build_demo_model(work, data_file, log)
        except DataError as e:
            raise DataError(f"{e}\nThe whole output is in {build_log}; run the same command again after fixing it") \
                from None
        finally:
            if os.path.isfile(os.path.join(work, BUILD_LOG)):
                shutil.copyfile(os.path.join(work, BUILD_LOG), build_log)
        shutil.move(trained, os.path.join(tmp, "model"))
        # engines serving the directory answer as `inference.py --demo` does: greedy, no repetition penalty
        model_files.write_model_files(os.path.join(tmp, "model"), generation=DEMO["generation"])
        shutil.rmtree(work)
        data_io.atomic_write_json(os.path.join(tmp, DEMO_INFO),
                                  {"recipe": recipe, "build_seconds": round(time.perf_counter() - start, 1)})
    os.chmod(cache_dir, 0o755)   # the temporary directory was private (mkdtemp)
    log(f"--demo: toy model ready in {time.perf_counter() - start:.0f}s")
    return model_dir


def toy_notice(model):
    size = sum(p.numel() for p in model.parameters())
    return (f"This is a TOY model: a {size / 1e6:.1f}M-parameter CuteGPT trained for a few minutes on the sample "
            f"dialogues of {DEMO['data']} (the canned conversation repeated {DEMO['repeat_canned']} times). It "
            f"recalls the sample answers to the two canned queries and little else; for real answers load "
            f"CuteGPT without --demo.")
