"""Checkpoints, exact resumption and the run's logs.

A checkpoint directory holds what inference.py loads (the PEFT adapter or the full HF model, the
tokenizer, training_config.json) and, under training_state/, what an exact resume needs: the
DeepSpeed engine state (trainable weights, optimizer partition of every rank, LR scheduler), each
rank's random-number states, and progress.json (step, epoch, position in the data order).
All ranks write into a temporary directory beside it; rank 0 writes progress.json last and renames
the directory into place, so a directory under its final name is always complete.
"""
import json
import os
import random
import shutil

import numpy as np
import torch

import config
import data_io
import model_files
from data_io import DataError
from distributed import all_ranks_agree, is_partitioned, print_rank0, stop_together

STATE_DIR = "training_state"
PROGRESS_FILE = "progress.json"
ENGINE_TAG = "engine"
TMP_PREFIX = ".tmp-"


def rng_states():
    """This rank's random-number states (torch, Python, NumPy, CUDA) as tensors and plain values."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    np_state = np.random.get_state()
    state.update(numpy_keys=torch.from_numpy(np_state[1].astype("int64")), numpy_pos=int(np_state[2]),
                 numpy_has_gauss=int(np_state[3]), numpy_gauss=float(np_state[4]))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state):
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, engine, model, tokenizer, record, progress, rank, device):
    """Write checkpoint ``path`` whole or not at all (a collective: every rank calls it).

    A failure (a full disk, say) on any rank raises DataError on every rank; the temporary
    directory is removed and earlier checkpoints stay as they were.
    """
    tmp = os.path.join(os.path.dirname(path), TMP_PREFIX + os.path.basename(path))
    state_dir = os.path.join(tmp, STATE_DIR)
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)   # left by a run killed while saving
            os.makedirs(state_dir)
        except OSError as e:
            error = e
    state_dict = None
    if all_ranks_agree(error is None, device):
        # under ZeRO-3 the weights to export are gathered from every rank (a collective) for rank 0 to write
        state_dict = export_state_dict(model, rank)
        try:
            # DeepSpeed: rank 0 writes the trainable weights and the scheduler, each rank its optimizer part
            engine.save_checkpoint(state_dir, tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
            torch.save(rng_states(), os.path.join(state_dir, f"rng_rank{rank}.pt"))
        except OSError as e:
            error = e
    if all_ranks_agree(error is None, device) and rank == 0:
        try:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            model_files.save_tokenizer(tmp, tokenizer)   # + tokenizer.model, chat template, generation config
            data_io.atomic_write_json(os.path.join(tmp, "training_config.json"), record)
            data_io.atomic_write_json(os.path.join(state_dir, PROGRESS_FILE), progress)   # written last
            if os.path.exists(path):   # an older checkpoint of the same name goes only once the new one is whole
                os.replace(path, tmp + ".old")
            os.replace(tmp, path)
            shutil.rmtree(tmp + ".old", ignore_errors=True)
        except OSError as e:
            error = e
    if not all_ranks_agree(error is None, device):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f" ({error.strerror or error})" if error is not None else " (on another rank)"
        raise DataError(f"checkpoint {path}: could not be written{reason}; earlier checkpoints are intact: free "
                        f"space or fix the folder, then continue with --resume_from latest")


def export_state_dict(model, rank):
    """The weights the checkpoint exports, whole, on rank 0 (None elsewhere); None too when the model is not
    partitioned (save_pretrained reads the weights itself).

    Under ZeRO-3 each parameter is gathered from every rank in turn (a collective: every rank calls this)
    and copied to CPU memory in its training precision: every weight for full fine-tuning, only the
    trainable ones for LoRA (the adapter, all PEFT's save_pretrained takes from it).
    """
    import deepspeed

    if not is_partitioned(model.parameters()):
        return None
    lora = hasattr(model, "peft_config")
    state = {}
    for name, param in model.named_parameters():
        if lora and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    return state if rank == 0 else None


def read_progress(path):
    """progress.json of checkpoint ``path``, or None when it is not a complete, resumable checkpoint."""
    try:
        with open(os.path.join(path, STATE_DIR, PROGRESS_FILE), "r", encoding="utf-8") as f:
            progress = json.load(f)
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) and isinstance(progress.get("global_step"), int) else None


def find_latest_checkpoint(run_dir):
    """The complete checkpoint with the highest step under ``run_dir`` (ties: the newest), or None."""
    found = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        progress = None if name.startswith(TMP_PREFIX) else read_progress(path)
        if progress is not None:
            found.append((progress["global_step"], os.path.getmtime(os.path.join(path, STATE_DIR, PROGRESS_FILE)),
                          path))
    return max(found)[2] if found else None


def resolve_resume_dir(args):
    run_dir = os.path.join(args.save_dir, args.save_name)
    if args.resume_from == "latest":
        path = find_latest_checkpoint(run_dir)
        if path is None:
            raise DataError(f"--resume_from latest: no complete checkpoint under {run_dir} (check --save_dir and "
                            f"--save_name, or start without --resume_from)")
        return path
    if read_progress(args.resume_from) is None:
        raise DataError(f"--resume_from {args.resume_from}: not a complete checkpoint of code/finetune.py (it needs "
                        f"{STATE_DIR}/{PROGRESS_FILE}); give one of the directories under {run_dir}, or 'latest'")
    return args.resume_from


def resume_fingerprint(args, ds_config, world_size, train_dataset):
    """What must match between the interrupted run and its resumption for the result to be exact."""
    return {"use_lora": args.use_lora, "quant": args.quant, "seed": args.seed, "world_size": world_size, "rows": len(train_dataset),
            "micro_batch_size": ds_config["train_micro_batch_size_per_gpu"],
            "grad_accum": ds_config["gradient_accumulation_steps"], "max_length": args.max_length,
            "dataset_type": args.dataset_type, "lr_schedule": args.lr_schedule}


RESUME_FLAGS = {"use_lora": "--use_lora", "quant": "--quant", "seed": "--seed", "world_size": "the number of ranks (GPUs)",
                "rows": "--data_path / --max_training_samples (the number of training rows)",
                "micro_batch_size": "--micro_batch_size", "grad_accum": "--grad_accum", "max_length": "--max_length",
                "dataset_type": "--dataset_type", "lr_schedule": "--lr_schedule"}


def check_resumable(path, progress, fingerprint):
    saved = progress.get("fingerprint", {})
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise DataError(f"--resume_from {path}: was saved with {RESUME_FLAGS[key]} = {saved.get(key)!r}, this "
                            f"run has {value!r}; resume with the interrupted run's settings")


def deepspeed_state_classes():
    """The plain data classes DeepSpeed stores in its optimizer state, allowed by the restricted loader."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_restricted(path):
    """torch.load that accepts tensors, plain containers and DeepSpeed's state classes only."""
    try:
        with torch.serialization.safe_globals(deepspeed_state_classes()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:   # pickle.UnpicklingError and friends: a type outside the allow-list
        detail = str(e).split("WeightsUnpickler error: ")[-1].split(". ")[0]
        raise DataError(f"{path}: holds objects other than tensors, plain values and DeepSpeed's optimizer state, "
                        f"so it is not loaded (checkpoints of code/finetune.py never do): {detail[:200]}")


def read_rank_states(path, rank, device):
    """This rank's saved random states from checkpoint ``path`` (a collective): every file DeepSpeed will
    read is first opened with the restricted loader (DeepSpeed's own loader unpickles without restriction:
    a file holding anything but tensors and plain values is refused).  When any rank cannot read its
    files, every rank stops with that rank's message, instead of the others waiting in DeepSpeed's load."""
    error = rng = None
    state_dir = os.path.join(path, STATE_DIR)
    try:
        engine_dir = os.path.join(state_dir, ENGINE_TAG)
        for name in sorted(os.listdir(engine_dir)):
            if name.endswith(".pt"):
                _load_restricted(os.path.join(engine_dir, name))
        rng_file = os.path.join(state_dir, f"rng_rank{rank}.pt")
        if not os.path.isfile(rng_file):
            raise DataError(f"--resume_from {path}: {rng_file} is missing (was the run saved with more ranks?)")
        rng = _load_restricted(rng_file)
    except OSError as e:
        error = f"--resume_from {path}: cannot read {e.filename or state_dir} ({e.strerror or e})"
    except DataError as e:
        error = str(e)
    stop_together(error, device)
    return rng


def load_training_state(path, engine, rank, device):
    """Restore the engine (weights, optimizer, scheduler) from ``path``; returns this rank's random states."""
    rng = read_rank_states(path, rank, device)
    load_path, _ = engine.load_checkpoint(os.path.join(path, STATE_DIR), tag=ENGINE_TAG, load_module_strict=False)
    if load_path is None:
        raise DataError(f"--resume_from {path}: DeepSpeed found no engine state in "
                        f"{os.path.join(path, STATE_DIR, ENGINE_TAG)}")
    return rng


def numel(param):
    """Elements of a parameter: its full size under ZeRO-3 too (where the local tensor is a part)."""
    return getattr(param, "ds_numel", None) or param.numel()


def trainable_numel(model):
    return sum(numel(p) for p in model.parameters() if p.requires_grad)


def checkpoint_bytes(model, dtype):
    """A generous estimate of one checkpoint's size on disk (full sizes at every ZeRO stage)."""
    trainable = trainable_numel(model)
    weight_bytes = torch.tensor([], dtype=dtype).element_size()
    # the export and DeepSpeed's copy of the trainable weights, plus fp32 master weights and two Adam
    # moments (12 bytes a parameter, split among the ranks but summed on a shared disk)
    return trainable * (2 * weight_bytes + 12) + 64 * 2**20   # + tokenizer, configs, slack


def check_free_disk(run_dir, needed):
    free = shutil.disk_usage(run_dir).free
    if free < needed * config.CHECKPOINT_DISK_MARGIN:
        raise DataError(f"{run_dir}: {free / 2**30:.2f} GiB free, but one checkpoint needs about "
                        f"{needed / 2**30:.2f} GiB (x{config.CHECKPOINT_DISK_MARGIN} margin, "
                        f"config.CHECKPOINT_DISK_MARGIN): free space or pick another --save_dir")


def truncate_log(path, last_step):
    """Drop the log lines of steps after ``last_step`` (a resumed run logs them again)."""
    if not os.path.isfile(path):
        return
    with open(path, "r", encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    data_io.atomic_write_bytes(path, "".join(kept).encode("utf-8"))


class RunLog:
    """Rank 0's logs: JSONL lines, TensorBoard events (where installed), a loss-curve PNG at the end."""

    def __init__(self, run_dir, enabled):
        self.enabled = enabled
        self.records = []
        self.writer = None
        if not enabled:
            return
        self.path = os.path.join(run_dir, "train_log.jsonl")
        self.file = open(self.path, "a", encoding="utf-8")
        self.run_dir = run_dir
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            pass

    def log(self, record):
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "tokens_per_s"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self):
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.records:
            try:
                import matplotlib
                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                return
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([r["step"] for r in self.records], [r["loss"] for r in self.records])
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss (mean over learned tokens)")
            ax.set_title("CuteGPT fine-tuning")
            fig.tight_layout()
            fig.savefig(os.path.join(self.run_dir, "loss_curve.png"), dpi=100)
            plt.close(fig)



def resume(path, progress, engine, rank, steps_per_epoch, device):
    """Restore the engine from checkpoint ``path`` (every rank together); returns this rank's saved random
    states and where the run continues: {"global_step", "start_epoch", "start_step_in_epoch"}."""
    try:
        rng = load_training_state(path, engine, rank, device)
    except DataError as e:
        data_io.fail(str(e))
    epoch, step_in_epoch = progress["epoch"], progress["step_in_epoch"]
    if step_in_epoch >= steps_per_epoch:   # saved at the end of an epoch
        epoch, step_in_epoch = epoch + 1, 0
    print_rank0(f"resuming from {path}: step {progress['global_step']}, epoch {epoch}, "
                f"step {step_in_epoch} of {steps_per_epoch} in that epoch")
    return rng, {"global_step": progress["global_step"], "start_epoch": epoch, "start_step_in_epoch": step_in_epoch}
