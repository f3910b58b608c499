"""Crash-safe training: a run killed with SIGKILL and resumed with --resume_from ends exactly where the
uninterrupted run ends; a checkpoint killed mid-write never becomes 'latest'; bad resumes and a full
disk stop before training.

The kill points are chosen by a small wrapper around code/finetune.py (written by the tests): after the
checkpoint of a given step is complete, or while a given checkpoint is half written, every rank hangs
and leaves a marker file; the test then sends SIGKILL to torchrun and every one of its ranks
(conftest.kill_tree), as a pre-emption would.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import CODE, REPO, kill_tree, run_script
from test_finetune import MAX_LENGTH, convert, lora_weights, small_dialogues

import checkpoints
import finetune

pytestmark = pytest.mark.slow   # every test here trains, kills and resumes real runs

WRAPPER = textwrap.dedent(f"""
    import os, sys, time
    sys.path.insert(0, {CODE!r})
    import checkpoints, config, data_io, finetune

    hang_after = int(os.environ.get("HANG_AFTER_STEP", "0"))      # after this step's checkpoint is complete
    hang_inside = int(os.environ.get("HANG_INSIDE_STEP", "0"))    # while this step's checkpoint is half written
    markers = os.environ.get("MARKER_DIR", ".")
    config.CHECKPOINT_DISK_MARGIN = float(os.environ.get("DISK_MARGIN", config.CHECKPOINT_DISK_MARGIN))
    rank = os.environ.get("RANK", "0")


    def hang(what):
        open(os.path.join(markers, f"{{what}}_rank{{rank}}"), "w").close()
        time.sleep(600)


    original_save, original_write_json = checkpoints.save_checkpoint, data_io.atomic_write_json


    def save_checkpoint(path, engine, model, tokenizer, record, progress, rank_, device):
        if progress["global_step"] == hang_inside:
            def write_json(target, obj):
                if target.endswith(checkpoints.PROGRESS_FILE):   # the export and the engine state are written
                    hang("inside")
                original_write_json(target, obj)
            data_io.atomic_write_json = write_json
        original_save(path, engine, model, tokenizer, record, progress, rank_, device)
        if progress["global_step"] == hang_after:
            hang("after")


    checkpoints.save_checkpoint = save_checkpoint
    finetune.main()
""")

STEPS = 6


@pytest.fixture(scope="module")
def resume_setup(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    data = convert(tiny_model_dir, str(work / "data"), small_dialogues() * 8)
    wrapper = work / "finetune_with_kill_points.py"
    wrapper.write_text(WRAPPER)
    return work, data, str(wrapper)


def lora_args(tiny_model_dir, data, save_dir):
    # LoRA dropout stays on, so the random-number states have to be restored for the result to match
    return ["--use_lora", "--model_path", tiny_model_dir, "--data_path", data, "--max_length", str(MAX_LENGTH),
            "--max_epoches", "3", "--max_steps", str(STEPS), "--micro_batch_size", "1", "--grad_accum", "2",
            "--lr", "1e-2", "--warmup_steps", "2", "--lora_dropout", "0.1", "--precision", "fp32", "--seed", "5",
            "--save_steps", "2", "--no_progress", "--save_dir", str(save_dir), "--save_name", "run"]


def torchrun(wrapper, args, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            wrapper] + args


def start(command, marker_dir, **env):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", MARKER_DIR=str(marker_dir),
                    **{k: str(v) for k, v in env.items()})
    return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_when_hanging(proc, marker_dir, what, ranks=2, timeout=300):
    """Wait until every rank hangs at the kill point, then SIGKILL torchrun and its ranks."""
    deadline = time.time() + timeout
    while not all((marker_dir / f"{what}_rank{r}").exists() for r in range(ranks)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point:\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            kill_tree(proc.pid)
            raise AssertionError("the run never reached the kill point")
        time.sleep(0.2)
    kill_tree(proc.pid)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL or proc.returncode != 0


def finish(proc, timeout=600):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, out[-4000:]
    return out


def logged(run_dir):
    with open(run_dir / "train_log.jsonl", encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_killed_run_resumes_exactly_and_a_half_written_checkpoint_never_becomes_latest(
        tiny_model_dir, resume_setup, tmp_path):
    work, data, wrapper = resume_setup
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    markers = tmp_path / "markers"
    markers.mkdir()

    # the run never interrupted
    finish(start(torchrun(wrapper, lora_args(tiny_model_dir, data, reference_dir), 29811), markers))
    reference = logged(reference_dir / "run")
    assert sorted(reference) == list(range(1, STEPS + 1))

    # the same run, killed (SIGKILL, every process) once the checkpoint of step 4 is written
    proc = start(torchrun(wrapper, lora_args(tiny_model_dir, data, killed_dir), 29812), markers, HANG_AFTER_STEP=4)
    kill_when_hanging(proc, markers, "after")
    run_dir = killed_dir / "run"
    assert checkpoints.find_latest_checkpoint(str(run_dir)) == str(run_dir / "run_4")

    # resumed, and killed again while the checkpoint of step 6 is half written
    resume = lora_args(tiny_model_dir, data, killed_dir) + ["--resume_from", "latest"]
    proc = start(torchrun(wrapper, resume, 29813), markers, HANG_INSIDE_STEP=6)
    kill_when_hanging(proc, markers, "inside", ranks=1)   # rank 0 writes the files; rank 1 waits for it
    half_written = run_dir / (checkpoints.TMP_PREFIX + "run_6")
    assert (half_written / "adapter_model.safetensors").is_file()        # it really was mid-write
    assert not (run_dir / "run_6").exists()
    assert checkpoints.find_latest_checkpoint(str(run_dir)) == str(run_dir / "run_4")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run_dir / "run_4"))

    # resumed again: runs to the end
    out = finish(start(torchrun(wrapper, resume, 29814), markers))
    assert "resuming from" in out and "step 4" in out
    assert not half_written.exists()                                     # the leftover was cleared

    # the same weights as the run never interrupted, and the same losses after step 4
    final, expected = lora_weights(run_dir / "run_6"), lora_weights(reference_dir / "run" / "run_6")
    assert final.keys() == expected.keys()
    assert any("lora_B" in k and expected[k].abs().max() > 1e-3 for k in expected)   # it trained
    for key in expected:
        assert torch.allclose(final[key], expected[key], atol=1e-6, rtol=0), key
    resumed = logged(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))                  # no step logged twice
    for step in range(5, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_full_finetune_resumes_exactly_without_a_launcher(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = convert(tiny_model_dir, str(tmp_path / "data"), small_dialogues() * 4, "--special_end_token")
    common = ["code/finetune.py", "--model_path", tiny_model_dir, "--data_path", data, "--max_length",
              str(MAX_LENGTH), "--max_epoches", "2", "--max_steps", "4", "--micro_batch_size", "2", "--grad_accum", "1",
              "--lr", "1e-3", "--warmup_steps", "1", "--precision", "fp32", "--save_steps", "2", "--no_progress",
              "--save_name", "full"]
    proc = run_script(common + ["--save_dir", str(tmp_path / "a")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(common + ["--save_dir", str(tmp_path / "b"), "--resume_from", str(tmp_path / "a" / "full" / "full_2")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_file(str(tmp_path / "a" / "full" / "full_4" / "model.safetensors"))
    final = load_file(str(tmp_path / "b" / "full" / "full_4" / "model.safetensors"))
    start_weights = load_file(str(tmp_path / "a" / "full" / "full_2" / "model.safetensors"))
    assert max((expected[k] - start_weights[k]).abs().max().item() for k in expected) > 1e-4   # steps 3-4 trained
    for key in expected:
        assert torch.allclose(final[key], expected[key], atol=1e-6, rtol=0), key


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def test_bad_resumes_and_a_full_disk_stop_before_training(tiny_model_dir, resume_setup, tmp_path, capsys):
    work, data, wrapper = resume_setup
    base = ["code/finetune.py"] + lora_args(tiny_model_dir, data, tmp_path / "ckp")
    # nothing to resume from yet; a folder that is no checkpoint; a conflicting flag
    with pytest.raises(checkpoints.DataError, match="--resume_from latest: no complete checkpoint"):
        checkpoints.resolve_resume_dir(finetune.parse_args(base[1:] + ["--resume_from", "latest"]))
    with pytest.raises(checkpoints.DataError, match="not a complete checkpoint"):
        checkpoints.resolve_resume_dir(finetune.parse_args(base[1:] + ["--resume_from", str(tmp_path)]))
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(base[1:] + ["--resume_from", "latest", "--load_lora", "--load_lora_path", "x"])
    assert exit_info.value.code == 2 and "drop one of them" in capsys.readouterr().err
    # a checkpoint to resume from, then a resume with other settings
    proc = run_script(base + ["--max_steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = tmp_path / "ckp" / "run" / "run_2"
    assert_clean_failure(run_script(base + ["--resume_from", str(checkpoint), "--grad_accum", "4"]),
                         "--grad_accum", "2", "4")
    # a state file that holds an arbitrary object (code run on unpickling) is refused, and never runs
    evil_target = tmp_path / "pwned"
    state_file = checkpoint / checkpoints.STATE_DIR / checkpoints.ENGINE_TAG / "mp_rank_00_model_states.pt"
    payload = textwrap.dedent(f"""
        import os, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {evil_target}",))
        torch.save({{"module": Evil()}}, {str(state_file)!r})
    """)
    subprocess.run([sys.executable, "-c", payload], check=True)
    assert_clean_failure(run_script(base + ["--resume_from", str(checkpoint)]), str(state_file), "not loaded")
    assert not evil_target.exists()
    # too little free disk for one checkpoint: refused before any step (the margin makes any disk too small)
    log_before = (tmp_path / "ckp" / "run" / "train_log.jsonl").read_text()
    proc = run_script([wrapper] + lora_args(tiny_model_dir, data, tmp_path / "ckp"), env={"DISK_MARGIN": "1e15"})
    assert_clean_failure(proc, "GiB free", "--save_dir")
    assert (tmp_path / "ckp" / "run" / "train_log.jsonl").read_text() == log_before
