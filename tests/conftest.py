"""Shared fixtures: the repo paths, a tiny model built once per test session, script runners."""
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(REPO, "code")
SAMPLE_PKL = os.path.join(REPO, "data", "test", "ift_data.pkl")
COMPAT_PKL = os.path.join(os.path.dirname(REPO), "shared", "compat", "cutegpt_original_ift_data.pkl")
if CODE not in sys.path:
    sys.path.insert(0, CODE)


def run_script(args, cwd=REPO, env=None, timeout=600, check=False):
    """Run `python ARGS...` from the repo root; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable] + list(args), cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def load_script(relative_path):
    """Import a script of the repo (e.g. bench/bench_train.py) as a module, to test its functions."""
    path = os.path.join(REPO, relative_path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random CuteGPT (SentencePiece tokenizer trained on the sample data) built once."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    run_script(["code/build_tiny_model.py", "--data", SAMPLE_PKL, "--out", str(out)], check=True)
    return str(out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
