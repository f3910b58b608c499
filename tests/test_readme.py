"""README.md and README_ch.md: the same structure, and the CPU quick tour runs as written."""
import os
import re
import shutil
import subprocess

from conftest import REPO

BLOCK = re.compile(r"<!-- quick-tour: begin -->\s*```bash\n(.*?)```\s*<!-- quick-tour: end -->", re.S)


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def quick_tour(text):
    match = BLOCK.search(text)
    assert match, "quick-tour block missing"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_both_readmes_have_the_same_shape_and_commands():
    en, zh = read("README.md"), read("README_ch.md")
    assert len(re.findall(r"^#", en, re.M)) == len(re.findall(r"^#", zh, re.M))
    assert quick_tour(en) == quick_tour(zh)
    fence = re.compile(r"```bash\n(.*?)```", re.S)
    strip = lambda block: [line.split(" #")[0].rstrip() for line in block.splitlines() if not line.startswith("#")]  # noqa: E731
    assert [strip(b) for b in fence.findall(en)] == [strip(b) for b in fence.findall(zh)]
    # every script a README names exists
    for script in set(re.findall(r"(?:code|bench|data)/[\w/]+\.(?:py|sh)", en + zh)) | {"finetune.sh", "inference.py"}:
        assert os.path.exists(os.path.join(REPO, script)), script


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
