"""Distributed set-up and the DeepSpeed config in force: one place for both.

finetune.py (and bench/bench_train.py) join the process group here (a one-process group when no
launcher started them), resolve config.py's DS_CONFIG_lora / DS_CONFIG_ft with the command-line
overrides, and turn its warm-up schedule into the decay that --lr_schedule asks for.
"""
import copy
import json
import os
import socket

import torch
import torch.distributed as dist

import config
from data_io import DataError


def print_rank0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def free_port():
    """A TCP port free on this machine (for the one-process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join the process group made by deepspeed/torchrun, or make a one-process group.

    Returns (rank, world_size, device).  Without a launcher (plain `python code/finetune.py`) the
    environment a launcher would set is filled in for one process, so the same code runs.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # ranks sharing the CPU split its cores; oversubscribed threads make every rank crawl
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size(), device


def resolve_ds_config(args, precision, device):
    """The DeepSpeed config in force: config.py's (or --deepspeed_config's) plus the overrides."""
    if args.deepspeed_config:
        try:
            with open(args.deepspeed_config, "r", encoding="utf-8") as f:
                ds = json.load(f)
        except FileNotFoundError:
            raise DataError(f"--deepspeed_config {args.deepspeed_config}: file not found")
        except json.JSONDecodeError as e:
            raise DataError(f"--deepspeed_config {args.deepspeed_config}: not valid JSON ({e.msg} at line {e.lineno})")
    else:
        ds = copy.deepcopy(config.DS_CONFIG_lora if args.use_lora else config.DS_CONFIG_ft)
    if args.lr is not None:
        ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
        if "scheduler" in ds:
            ds["scheduler"].setdefault("params", {})["warmup_max_lr"] = args.lr
    if args.warmup_steps is not None and "scheduler" in ds:
        ds["scheduler"].setdefault("params", {})["warmup_num_steps"] = args.warmup_steps
    if args.micro_batch_size is not None:
        ds["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    if args.grad_accum is not None:
        ds["gradient_accumulation_steps"] = args.grad_accum
    if args.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    apply_zero_settings(ds, args)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x ranks
    # precision: the one switch in force
    ds.pop("fp16", None)
    ds["bf16"] = {"enabled": precision == "bf16"}
    if precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if zero_stage(ds) == 3 and getattr(args, "quant", "none") != "none":
        raise DataError(f"--deepspeed_config {args.deepspeed_config}: ZeRO stage 3 cannot partition the "
                        f"bitsandbytes-quantized base of --quant {args.quant}: set stage 2 there, or drop --quant")
    zero = ds.get("zero_optimization", {})
    if device.type == "cpu":
        # on a CPU-only machine the optimizer state and the weights already live in CPU memory
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    if "offload_optimizer" not in zero:
        # plain torch AdamW (foreach kernels): no DeepSpeed op to compile
        ds.get("optimizer", {}).setdefault("params", {}).setdefault("torch_adam", True)
    return ds


def zero_stage(ds):
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def apply_zero_settings(ds, args):
    """config.ZERO_3's settings under stage 3 (values already in the config win) and the offload flags."""
    zero = ds.setdefault("zero_optimization", {})
    if zero_stage(ds) == 3:
        for key, value in config.ZERO_3.items():
            zero.setdefault(key, value)
    elif zero_stage(ds) == 0:
        zero.pop("offload_optimizer", None)   # config.py's default offload needs ZeRO; stage 0 has none
    for flag, key, nvme in (("offload_optimizer", "offload_optimizer", config.OFFLOAD_NVME_OPTIMIZER),
                            ("offload_param", "offload_param", config.OFFLOAD_NVME_PARAM)):
        choice = getattr(args, flag, None)
        if choice == "none":
            zero.pop(key, None)
        elif choice == "cpu":
            zero[key] = dict(config.OFFLOAD_CPU)
        elif choice == "nvme":
            zero[key] = dict(nvme, nvme_path=args.nvme_path)


LR_SCHEDULERS = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}


def with_lr_schedule(ds, schedule, total_steps):
    """The DeepSpeed config with its WarmupLR turned into the decaying ``schedule`` over ``total_steps``
    (same peak, warm-up steps and warm-up shape)."""
    if schedule == "constant" or "scheduler" not in ds:
        return ds
    warm = ds["scheduler"].get("params", {})
    peak = warm.get("warmup_max_lr", ds.get("optimizer", {}).get("params", {}).get("lr"))
    common = {"total_num_steps": max(total_steps, 1), "warmup_num_steps": warm.get("warmup_num_steps", 0),
              "warmup_type": warm.get("warmup_type", "linear")}
    if schedule == "linear":
        params = dict(common, warmup_min_lr=warm.get("warmup_min_lr", 0.0), warmup_max_lr=peak)
    else:  # cosine scales the optimizer's lr, which --lr and config.py keep equal to the peak
        params = dict(common, warmup_min_ratio=warm.get("warmup_min_lr", 0.0) / peak, cos_min_ratio=0.0)
    return dict(ds, scheduler={"type": LR_SCHEDULERS[schedule], "params": params})


def all_ranks_agree(ok, device):
    """True when ``ok`` holds on every rank (a collective: every rank must call it)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
