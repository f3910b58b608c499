"""Every command of README.md, README_ch.md and docs/*.md is checked or run.

- Each English page and its Chinese counterpart (README_ch.md, docs/NAME_ch.md) have the same headings
  and the same commands.
- Every script a page names exists.
- Each command of a ```bash block: `python SCRIPT ARGS` (also behind `deepspeed`/`torchrun` or environment
  variables, or srun) parses with the script's own parser; `bash finetune.sh ARGS` sets only variables finetune.sh
  reads and ARGS parse with finetune.py's parser; `pip install -r FILE` names an existing file; `curl`
  names a route of the API server; `python -m pytest` names a declared marker; `transformers serve` takes
  only options of the installed transformers' command, `vllm serve` only the options listed here.
- A `<!-- run by tests/FILE.py::TEST -->` comment names a test that exists (that test runs the command).
- Each ```python block compiles, and the names it imports from code/ exist.
- The quick tour (the marked block of README.md) runs as written in a copy of the repo (slow).
"""
import ast
import glob
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO, load_script

QUICK_TOUR = re.compile(r"<!-- quick-tour: begin -->\s*```bash\n(.*?)```\s*<!-- quick-tour: end -->", re.S)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RUN_BY = re.compile(r"<!-- run by (tests/[\w/]+\.py)::(\w+) -->")
SCRIPT = re.compile(r"(?<![\w/.])(?:code|bench|data)/[\w/]+\.(?:py|sh)\b")
LAUNCHERS = {"deepspeed", "torchrun"}


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def english_pages():
    return ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
                                  if not p.endswith("_ch.md"))


def chinese_of(page):
    return page[:-3] + "_ch.md"


def blocks(text, language):
    return [body for lang, body in FENCE.findall(text) if lang == language]


def commands_of(text):
    """The commands of the page's ```bash blocks, comments removed."""
    return [line.split(" #")[0].rstrip() for body in blocks(text, "bash") for line in body.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def headings(text):
    return re.findall(r"^#+ ", FENCE.sub("", text), re.M)


PAGES = english_pages()
COMMANDS = [(page, command) for page in PAGES for command in commands_of(read(page))]


def test_the_manuals_exist_with_their_chinese_counterparts():
    assert {"docs/inference.md", "docs/serving.md", "docs/finetuning.md", "docs/recipe.md",
            "docs/configuration.md"} <= set(PAGES)
    for page in PAGES:
        assert os.path.exists(os.path.join(REPO, chinese_of(page))), chinese_of(page)
    assert len(read("README.md").splitlines()) <= 250
    assert "python inference.py --demo" in "\n".join(read("README.md").splitlines()[:40])
    recipe = {next(w for w in shlex.split(c) if w.endswith(".py")) for c in commands_of(read("docs/recipe.md"))}
    assert {"code/extend_vocab.py", "code/convert_data.py", "code/finetune.py", "code/merge_lora.py",
            "code/evaluate_ceval.py", "inference.py"} <= recipe


@pytest.mark.parametrize("page", PAGES)
def test_english_and_chinese_pages_show_the_same_commands(page):
    en, zh = read(page), read(chinese_of(page))
    assert len(headings(en)) == len(headings(zh))
    assert commands_of(en) == commands_of(zh)
    assert QUICK_TOUR.findall(en) == QUICK_TOUR.findall(zh)
    assert RUN_BY.findall(en) == RUN_BY.findall(zh)
    strip = lambda code: [line.split("  #")[0].rstrip() for line in code.splitlines()]   # noqa: E731
    assert [strip(b) for b in blocks(en, "python")] == [strip(b) for b in blocks(zh, "python")]


@pytest.mark.parametrize("page", PAGES)
def test_every_script_a_page_names_exists(page):
    for name in (page, chinese_of(page)):
        for script in set(SCRIPT.findall(read(name))):
            assert os.path.exists(os.path.join(REPO, script)), f"{name}: {script}"


@pytest.mark.parametrize("page", PAGES)
def test_run_by_comments_name_existing_tests(page):
    for path, test in RUN_BY.findall(read(page)):
        assert re.search(rf"^def {test}\(", read(path), re.M), f"{page}: {path}::{test} not found"


def split_env(words):
    """VAR=value words at the start of a command -> ({VAR: value}, the rest)."""
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def check_python_script(words):
    """`SCRIPT ARGS...`: the script exists and its own parser accepts ARGS (it exits on a bad flag)."""
    script, args = words[0], words[1:]
    assert os.path.exists(os.path.join(REPO, script)), script
    load_script(script).parse_args(args)


def finetune_sh_arguments():
    """The arguments finetune.sh gives code/finetune.py, its variables replaced by sample values."""
    text = read("finetune.sh")
    call = text[text.index("code/finetune.py"):].split("\n")
    args = []
    for line in call[1:]:
        line = line.strip().rstrip("\\").strip()
        if line == '"$@"':
            break
        args += shlex.split(re.sub(r'"\$\w+"', "value", line))
    return args


def check_bash(words, env):
    script, args = words[0], words[1:]
    text = read(script)
    for name in env:
        assert re.search(rf"\${{?{name}\b", text), f"{script} does not read ${name}"
    if script == "finetune.sh":
        load_script("code/finetune.py").parse_args(finetune_sh_arguments() + args)
    else:
        assert not args, f"{script} takes its settings from the environment"


def check_pip(args):
    assert args[0] == "install"
    if "-r" in args:
        assert os.path.exists(os.path.join(REPO, args[args.index("-r") + 1]))
    else:   # a package the code uses only when installed (flash-attn -> flash_attn)
        package = next(a for a in args[1:] if not a.startswith("-")).split("=")[0].replace("-", "_")
        sources = "".join(read(p) for p in glob.glob(os.path.join(REPO, "code", "*.py")))
        assert package in sources, f"no code uses {package}"


def check_curl(args):
    url = next(a for a in args if a.startswith("http"))
    path = re.sub(r"^https?://[^/]+", "", url)
    assert f'"{path}"' in read("code/api_server.py"), f"no route {path} in code/api_server.py"


def check_transformers(args):
    """`transformers serve MODEL --flags`: each flag is an option of the installed transformers' serve command."""
    from transformers.cli.serve import Serve

    assert args[:1] == ["serve"] and len(args) > 1 and not args[1].startswith("-"), args
    options = {prefix + name.replace("_", "-") for name in inspect.signature(Serve.__init__).parameters
               for prefix in ("--", "--no-")}
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert flag in options, f"transformers serve has no option {flag}"


# vLLM needs a CUDA GPU and is not installed for the tests: the `vllm serve` options a page may use, each
# checked against vLLM's CLI reference (engine arguments) when added here
VLLM_SERVE_OPTIONS = {"--host", "--port", "--max-model-len", "--tensor-parallel-size", "--dtype"}


def check_vllm(args):
    assert args[:1] == ["serve"] and len(args) > 1 and not args[1].startswith("-"), args
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert flag in VLLM_SERVE_OPTIONS, f"vllm serve {flag}: not among the checked options {VLLM_SERVE_OPTIONS}"


def check_pytest(args):
    if "-m" in args:
        marker = args[args.index("-m") + 1].replace("not ", "").strip()
        assert re.search(rf"^\s+{marker}:", read("pytest.ini"), re.M), marker
    assert os.path.isdir(os.path.join(REPO, args[-1]))


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_command_is_checked(page, command):
    env, words = split_env(shlex.split(command))
    program = words.pop(0)
    if program == "srun":          # srun --OPTION=VALUE... COMMAND: SLURM runs COMMAND on each node
        while words[0].startswith("-"):
            words.pop(0)
        program = words.pop(0)
    if program in LAUNCHERS:       # deepspeed --num_gpus N SCRIPT ARGS, torchrun --nproc_per_node N SCRIPT ARGS
        words = words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
        program = "python"
    if program == "python" and words[:2] == ["-m", "pip"]:
        check_pip(words[2:])
    elif program == "python" and words[:2] == ["-m", "pytest"]:
        check_pytest(words[2:])
    elif program == "python":
        check_python_script(words)
    elif program == "bash":
        check_bash(words, env)
    elif program == "curl":
        check_curl(words)
    elif program == "transformers":
        check_transformers(words)
    elif program == "vllm":
        check_vllm(words)
    else:
        pytest.fail(f"{page}: no check for {command!r}; add one here or point at the test that runs it")


PYTHON_BLOCKS = [(page, code) for page in PAGES for code in blocks(read(page), "python")]


@pytest.mark.parametrize("page,code", PYTHON_BLOCKS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(PYTHON_BLOCKS)])
def test_python_blocks_compile_and_import_what_exists(page, code):
    tree = ast.parse(code)
    modules = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "code", "*.py"))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module}.{alias.name}"


def quick_tour(text):
    match = QUICK_TOUR.search(text)
    assert match, "quick-tour block missing"
    return [line for line in match.group(1).splitlines() if line.strip()]


@pytest.mark.slow
def test_quick_tour_runs_as_written(tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", "__pycache__", "ckp", "demo_model",
                                                               "tiny_model", "llama_ift_data_ids.pkl", ".pytest_cache"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    outputs = []
    for command in quick_tour(read("README.md")):
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        outputs.append(proc.stdout)
    assert (work / "tiny_model" / "model.safetensors").exists()
    assert (work / "data" / "test" / "llama_ift_data_ids.pkl").exists()
    assert (work / "ckp" / "tiny_lora" / "tiny_lora_epoch0" / "adapter_model.safetensors").exists()
    assert "请推荐五本名著" in outputs[-1]  # the canned conversation ran
