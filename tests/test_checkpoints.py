"""checkpoints.py without a training run: which directory counts as the latest complete checkpoint, what a
resumption must match, and the log a resumed run truncates (the end-to-end runs are in test_resume.py)."""
import json
import os
import random

import numpy as np
import pytest
import torch

import checkpoints
from data_io import DataError


def make_checkpoint(run_dir, name, step, complete=True):
    path = os.path.join(run_dir, name)
    os.makedirs(os.path.join(path, checkpoints.STATE_DIR))
    if complete:
        with open(os.path.join(path, checkpoints.STATE_DIR, checkpoints.PROGRESS_FILE), "w") as f:
            json.dump({"global_step": step, "fingerprint": {"seed": 10, "world_size": 2}}, f)
    return path


def test_latest_is_the_highest_complete_step_never_a_temporary_or_half_written_one(tmp_path):
    run = str(tmp_path / "run")
    assert checkpoints.find_latest_checkpoint(run) is None            # no run folder yet
    make_checkpoint(run, "lora_4", 4)
    newest = make_checkpoint(run, "lora_epoch0", 8)
    make_checkpoint(run, "lora_12", 12, complete=False)               # killed while writing
    make_checkpoint(run, checkpoints.TMP_PREFIX + "lora_16", 16)      # not renamed into place yet
    assert checkpoints.find_latest_checkpoint(run) == newest
    assert checkpoints.read_progress(os.path.join(run, "lora_12")) is None


def test_resume_dir_latest_or_given_and_clear_errors(tmp_path):
    class Args:
        save_dir, save_name = str(tmp_path), "run"

    args = Args()
    args.resume_from = "latest"
    with pytest.raises(DataError, match="no complete checkpoint under"):
        checkpoints.resolve_resume_dir(args)
    given = make_checkpoint(str(tmp_path / "run"), "run_2", 2)
    assert checkpoints.resolve_resume_dir(args) == given
    args.resume_from = str(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="not a complete checkpoint"):
        checkpoints.resolve_resume_dir(args)


def test_a_resumption_must_match_the_interrupted_run():
    progress = {"global_step": 3, "fingerprint": {"seed": 10, "world_size": 2}}
    checkpoints.check_resumable("ckp/run_3", progress, {"seed": 10, "world_size": 2})
    with pytest.raises(DataError, match=r"the number of ranks \(GPUs\) = 2, this run has 4"):
        checkpoints.check_resumable("ckp/run_3", progress, {"seed": 10, "world_size": 4})


def test_truncated_log_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    checkpoints.truncate_log(str(log), 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    checkpoints.truncate_log(str(tmp_path / "absent.jsonl"), 4)      # nothing to truncate: no error


def test_rng_states_restore_every_generator():
    state = checkpoints.rng_states()
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoints.set_rng_states(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn
