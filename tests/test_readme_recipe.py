"""README "The whole recipe": every command parses with its script's own argument parser (the tests
test_extend_vocab, test_pretrain_ceval, test_merge_lora and test_finetune run the same scripts with the
same flags on the tiny model)."""
import re
import shlex

import pytest

from conftest import load_script
from test_readme import read

SECTIONS = {"README.md": "## The whole recipe", "README_ch.md": "## 完整流程"}


def recipe_commands(name):
    text = read(name)
    start = text.index(SECTIONS[name])
    section = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_both_readmes_show_the_same_recipe():
    assert recipe_commands("README.md") == recipe_commands("README_ch.md")
    scripts = {next(w for w in shlex.split(c) if w.endswith(".py")) for c in recipe_commands("README.md")}
    assert {"code/extend_vocab.py", "code/convert_data.py", "code/finetune.py", "code/merge_lora.py",
            "code/evaluate_ceval.py", "inference.py"} <= scripts


@pytest.mark.parametrize("index", range(len(recipe_commands("README.md"))))
def test_recipe_command_parses(index):
    words = shlex.split(recipe_commands("README.md")[index])
    if words[0] == "deepspeed":          # deepspeed --num_gpus N SCRIPT ARGS...
        words = ["python"] + words[3:]
    assert words[0] == "python"
    module = load_script(words[1])
    module.parse_args(words[2:])         # exits (SystemExit) on an unknown or conflicting flag
