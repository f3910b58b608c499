"""What the three benchmarks share: printing, the device's clock and memory, the machine and package
versions, the model shapes with random weights, and the JSON report.

Imported by bench/bench_train.py, bench/bench_infer.py and bench/bench_convert.py after they have put
code/ on sys.path (data_io and config come from there).
"""
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import config
import data_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DATA = os.path.join(REPO, "data", "test", "ift_data.pkl")

# the LLaMA-13B shape with CuteGPT's extended vocabulary (the shape of the H200 baselines)
SHAPE_13B = {"vocab_size": 49954, "hidden_size": 5120, "num_layers": 40, "num_heads": 40, "num_kv_heads": 40,
             "intermediate_size": 13824, "max_position_embeddings": 2048, "initializer_range": 0.02}


def say(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# device: clock and memory
# ----------------------------------------------------------------------------------------------
def sync(device):
    """Wait for the GPU's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """GiB: torch.cuda.max_memory_allocated() on a GPU; the process's peak resident set on a CPU (it only
    ever grows, so it includes whatever ran before)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_memory_kind(device):
    return "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS (CPU)"


def memory_unit(device):
    """The unit of the tables' memory column."""
    return "GiB (cuda)" if device.type == "cuda" else "GiB (RSS)"


# ----------------------------------------------------------------------------------------------
# machine and packages
# ----------------------------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpu": cpu_model()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_GiB"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        info["cuda"] = torch.version.cuda
    return info


def installed_version(name):
    """The installed version of an importable package, "installed" when it has no metadata, or None.
    The package is looked up, not imported."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def say_versions(versions):
    say("packages: " + ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in versions.items()))


# ----------------------------------------------------------------------------------------------
# model shapes with random weights
# ----------------------------------------------------------------------------------------------
def shape_of(name):
    """The model shape: "13b" (SHAPE_13B) or "tiny" (config.TINY_MODEL)."""
    if name == "13b":
        return dict(SHAPE_13B)
    t = config.TINY_MODEL
    return {"vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"], "num_layers": t["num_layers"],
            "num_heads": t["num_heads"], "num_kv_heads": t["num_heads"], "intermediate_size": t["intermediate_size"],
            "max_position_embeddings": t["max_position_embeddings"], "initializer_range": t["initializer_range"]}


def llama_config(shape, max_positions=None, pad_token_id=None):
    """The LlamaConfig of a shape (untied embeddings, LLaMA's special ids)."""
    return LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                       intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                       num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                       max_position_embeddings=max_positions or shape["max_position_embeddings"], rms_norm_eps=1e-6,
                       initializer_range=shape["initializer_range"], bos_token_id=1, eos_token_id=2,
                       pad_token_id=pad_token_id, tie_word_embeddings=False)


def random_model(model_dir, device, dtype, attn_implementation=None):
    """A model of the config saved in ``model_dir`` with random weights, built directly on ``device``."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype, **kwargs)


def build_tiny_model(out_dir):
    """The tiny model of code/build_tiny_model.py (trained on data/test/ift_data.pkl) written to ``out_dir``,
    in a process of its own (the benchmark's process stays as it was); its SentencePiece tokenizer is the one
    the benchmarks use."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "code", "build_tiny_model.py"), "--data", SAMPLE_DATA,
                           "--out", out_dir], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise data_io.DataError(f"building the tiny tokenizer failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return out_dir


def prepare_model_dir(shape, directory, tokenizer_dir):
    """config.json of the shape + the tokenizer files: what --model_path points at (weights added later
    by save_random_weights when a variant loads them)."""
    os.makedirs(directory, exist_ok=True)
    llama_config(shape, pad_token_id=0).save_pretrained(directory)
    for name in os.listdir(tokenizer_dir):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(tokenizer_dir, name), directory)
    return directory


def build_tokenizer(directory):
    """The tiny model of code/build_tiny_model.py (its SentencePiece tokenizer is the one used)."""
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        build_tiny_model(directory)
    return directory


def has_weights(model_dir):
    return any(os.path.isfile(os.path.join(model_dir, n)) for n in ("model.safetensors", "model.safetensors.index.json"))


def save_random_weights(model_dir, device, dtype, seed, attn_implementation=None):
    """Random weights (seeded) saved into ``model_dir`` once, for the variants that load them (bitsandbytes
    quantizes only while loading); returns the seconds spent, 0 when they were there already."""
    if has_weights(model_dir):
        return 0.0
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = random_model(model_dir, device, dtype, attn_implementation)
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    free_memory(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def command_line(script, argv=None):
    """How the benchmark was run: ``python bench/X.py ARGS`` (the process's arguments unless ``argv``)."""
    return f"python {script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def markdown_table(head, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def write_json(path, report):
    """The report written atomically to ``path`` (nothing when ``path`` is empty)."""
    if path:
        text = json.dumps(report, ensure_ascii=False, indent=1, default=str) + "\n"
        data_io.atomic_write_bytes(path, text.encode("utf-8"))
