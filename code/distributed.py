"""Distributed set-up and the DeepSpeed config in force: one place for both.

finetune.py (and bench/bench_train.py) join the process group here (a one-process group when no
launcher started them), resolve config.py's DS_CONFIG_lora / DS_CONFIG_ft with the command-line
overrides, and turn its warm-up schedule into the decay that --lr_schedule asks for.

Decisions every rank must share are made together, so that no rank stops alone while the others wait
for it: rank 0 decides (``rank0_decides``: the input checks, the checkpoint to resume) and every rank
gets its answer; each rank's own failures are pooled (``stop_together``) and every rank stops with the
same message; ``check_shared_dir`` stops a run whose nodes do not share the save directory.  Values
travel as JSON in byte tensors: nothing received from another process is unpickled.
"""
import copy
import datetime
import json
import os
import secrets
import socket
import sys

import torch
import torch.distributed as dist

import config
import data_io
from data_io import DataError


def print_rank0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def free_port():
    """A TCP port free on this machine (for the one-process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_on_this_node(env=None):
    """How many ranks share this machine: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's launcher's LOCAL_SIZE,
    else WORLD_SIZE (a launcher that says neither runs one node)."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name])
    return 1


def threads_per_rank(env=None, cores=None):
    """CPU threads for one rank: the ranks of a node split its cores (oversubscribed threads make every
    rank crawl); ranks on other nodes do not count."""
    return max(1, (cores or os.cpu_count() or 1) // ranks_on_this_node(env))


def init_distributed():
    """Join the process group made by deepspeed/torchrun, or make a one-process group.

    Returns (rank, world_size, device).  Without a launcher (plain `python code/finetune.py`) the
    environment a launcher would set is filled in for one process, so the same code runs.  A rank
    that waits longer than config.DIST_TIMEOUT_MINUTES for the others stops with an error.
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
        torch.set_num_threads(threads_per_rank())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(minutes=config.DIST_TIMEOUT_MINUTES))
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------------------------
# decisions all ranks share
# ----------------------------------------------------------------------------------------------
def _encode(value, device):
    return torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8).to(device)


def _decode(tensor):
    return json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))


def broadcast_json(value, device, src=0):
    """Rank ``src``'s ``value`` (anything JSON holds) on every rank, rank ``src`` included (a collective)."""
    payload = _encode(value, device) if dist.get_rank() == src else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src)
    return _decode(payload)


def all_gather_json(value, device):
    """Every rank's ``value`` on every rank, in rank order (a collective)."""
    payload = _encode(value, device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
    longest = max(int(n.item()) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [_decode(t[:int(n.item())]) for t, n in zip(gathered, sizes)]


def rank0_decides(decide, device, errors=(DataError,)):
    """``decide()`` run on rank 0 only, its (JSON) result returned on every rank (a collective).

    An error of ``errors`` that it raises is raised on every rank as DataError with the same message.
    """
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = {"value": decide()}
        except errors as e:
            outcome = {"error": str(e)}
    outcome = broadcast_json(outcome, device)
    if "error" in outcome:
        raise DataError(outcome["error"])
    return outcome["value"]


def stop_together(error, device):
    """Every rank passes its error message, or None (a collective).  When any rank has one, every rank
    raises DataError with the same message: the lowest failing rank's, naming that rank and its host
    when it is not rank 0."""
    reports = all_gather_json(None if error is None else [error, socket.gethostname()], device)
    for rank, report in enumerate(reports):
        if report is not None:
            message, host = report
            raise DataError(message if rank == 0 else f"{message} (rank {rank}, on {host})")


SHARED_DIR_MARKER = ".shared-dir-check"


def check_shared_dir(path, flag, device):
    """Stop every rank unless each one sees the folder ``path`` that rank 0 writes in (a collective).

    Rank 0 writes a file with a random token there; after it, every rank reads it back.  A node with
    its own disk under that path (no shared filesystem) reads nothing or an old token: checkpoints
    would be split between the nodes and could not be resumed, so the run stops before any work.
    """
    marker = os.path.join(path, SHARED_DIR_MARKER)

    def write_marker():
        token = secrets.token_hex(16)
        try:
            data_io.atomic_write_bytes(marker, token.encode("ascii"))
        except OSError as e:
            raise DataError(f"{flag} {path}: cannot write there ({e.strerror}); pick a writable path")
        return token

    token = rank0_decides(write_marker, device)
    try:
        with open(marker, "r", encoding="ascii") as f:
            seen = f.read()
    except OSError:
        seen = None
    error = None if seen == token else (
        f"{flag}: {path} is not the same folder on every node (the check file rank 0 wrote there is "
        f"{'missing' if seen is None else 'another'} here); all ranks write one checkpoint together, so put "
        f"{flag} (SAVE_DIR of finetune.sh) on a filesystem every node shares (NFS, Lustre, ...)")
    try:
        stop_together(error, device)
    finally:
        if dist.get_rank() == 0:
            try:
                os.remove(marker)
            except OSError:
                pass


def fail(message):
    """Stop this rank with ``message`` when every rank stops with it: printed once per node, exit 2."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


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


def is_partitioned(params):
    """True when ZeRO-3 holds these parameters split among the ranks (each rank keeps a part)."""
    return any(hasattr(p, "ds_id") for p in params)


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
