"""Fine-tune CuteGPT (LoRA or full) with DeepSpeed: step 2 of the pipeline.

    # the seed's 8-GPU LoRA run (what finetune.sh does)
    deepspeed --num_gpus 8 --master_port 12932 code/finetune.py --use_lora \
        --model_path XuYipei/kw-cutegpt-13b-base --dataset_type DatasetIds \
        --data_path data/test/llama_ift_data_ids.pkl --max_length 2048 --max_epoches 4 \
        --save_steps 2000 --save_name llama_lora --use_flash_attention

    # one GPU, or the CPU, without any launcher (one process)
    python code/finetune.py --use_lora --model_path MODEL_DIR --dataset_type DatasetIds \
        --data_path data/test/llama_ift_data_ids.pkl --max_length 2048

    # several CPU ranks (gloo), as the tests run it
    deepspeed --num_gpus 2 code/finetune.py ...        # or: torchrun --nproc_per_node 2 code/finetune.py ...

    # full fine-tuning: no --use_lora; convert the data with --special_end_token first
    python code/convert_data.py --tokenizer MODEL_DIR --out_data_path data/test/ --special_end_token

The DeepSpeed config is config.DS_CONFIG_lora (with --use_lora) or config.DS_CONFIG_ft;
--lr, --warmup_steps, --micro_batch_size, --grad_accum and --zero_stage override single values and
--deepspeed_config FILE.json replaces it.  The effective config is printed once and saved beside the
checkpoints as training_config.json.

The loss of an optimizer step is the mean over every learned token of the step, across
micro-batches and ranks (each token weighs the same however rows are split among GPUs), and
packed samples never attend to each other (position ids restart per sample; a block-diagonal
causal mask for SDPA, variable-length kernels for flash-attention).
"""
import argparse
import copy
import functools
import json
import math
import os
import socket
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import config  # noqa: E402
import data_io  # noqa: E402
import dataset  # noqa: E402
import model_loader  # noqa: E402
from data_io import DataError  # noqa: E402


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def build_parser():
    import deepspeed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the seed's flags
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; leave it alone")
    p.add_argument("--seed", type=int, default=config.TRAIN_SEED, help="seed of the data order and LoRA init (default: %(default)s)")
    p.add_argument("--max_epoches", type=int, default=5, help="epochs over the data (default: %(default)s)")
    p.add_argument("--max_training_samples", type=int, default=-1,
                   help="use at most this many rows (DatasetIds) or dialogues (other types); -1: all")
    p.add_argument("--data_path", default="", help="llama_ift_data_ids.pkl for DatasetIds, else a dialogue file (.pkl/.json/.jsonl)")
    p.add_argument("--model_path", default="", help="base model: local directory or Hugging Face id")
    p.add_argument("--max_length", type=int, default=config.MAX_LENGTH, help="tokens per row (default: %(default)s)")
    p.add_argument("--use_flash_attention", action="store_true",
                   help="use flash_attention_2 where the flash_attn package is installed (else PyTorch SDPA)")
    p.add_argument("--use_lora", action="store_true", help="train a LoRA adapter (config.py's settings); default: full fine-tuning")
    p.add_argument("--load_lora", action="store_true", help="start from the LoRA adapter in --load_lora_path (fresh optimizer)")
    p.add_argument("--load_lora_path", default="", help="adapter directory for --load_lora")
    p.add_argument("--save_dir", default="ckp/", help="checkpoints go to SAVE_DIR/SAVE_NAME/ (default: %(default)s)")
    p.add_argument("--save_name", default="cutegpt", help="run name (default: %(default)s)")
    p.add_argument("--save_steps", type=int, default=1000, help="save a checkpoint every N optimizer steps (default: %(default)s)")
    p.add_argument("--dataset_type", choices=sorted(dataset.DATASET_TYPES), default="DatasetIds",
                   help="how rows are made (code/dataset.py) (default: %(default)s)")
    # overrides of the DeepSpeed config
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (optimizer lr and WarmupLR's warmup_max_lr)")
    p.add_argument("--warmup_steps", type=int, default=None, help="WarmupLR warm-up steps")
    p.add_argument("--micro_batch_size", type=int, default=None, help="rows per GPU per forward pass")
    p.add_argument("--grad_accum", type=int, default=None, help="micro-batches accumulated per optimizer step")
    p.add_argument("--zero_stage", type=int, choices=[0, 1, 2], default=None, help="ZeRO stage")
    # ours
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where the GPU supports it, else fp32 (default: %(default)s)")
    p.add_argument("--lora_dropout", type=float, default=config.LORA_DROPOUT,
                   help="dropout on the LoRA input (default from config.py: %(default)s); 0 skips the dropout pass")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: all epochs)")
    p.add_argument("--template", default="random",
                   help="template for GPT2Dataset_onlyres/BertDataset_onlyres ('random' or a name in config.TURN_TEMPLATES)")
    p.add_argument("--log_every", type=int, default=config.LOG_EVERY, help="optimizer steps between log lines (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    return deepspeed.add_config_arguments(p)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.load_lora and not args.use_lora:
        parser.error("--load_lora continues a LoRA adapter: add --use_lora")
    if args.load_lora and not args.load_lora_path:
        parser.error("--load_lora needs --load_lora_path DIR (the adapter to continue from)")
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error("--lora_dropout must be in [0, 1)")
    if args.load_lora_path and not args.load_lora:
        parser.error("--load_lora_path is only read with --load_lora: add --load_lora")
    if args.deepspeed_config and any(v is not None for v in (args.lr, args.warmup_steps, args.micro_batch_size,
                                                                   args.grad_accum, args.zero_stage)):
        parser.error("--deepspeed_config replaces the whole config: put lr/batch/ZeRO settings in that file, "
                     "or drop --deepspeed_config and use --lr/--warmup_steps/--micro_batch_size/--grad_accum/--zero_stage")
    for name in ("max_epoches", "save_steps", "max_length", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more")
    if not args.model_path:
        parser.error("--model_path is required (a local model directory or a Hugging Face id)")
    if not args.data_path:
        parser.error("--data_path is required (llama_ift_data_ids.pkl from code/convert_data.py, or a dialogue file)")
    return args


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------
def print_rank0(*args, **kwargs):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join the process group made by deepspeed/torchrun, or make a one-process group.

    Returns (rank, world_size, device).  Without a launcher (plain `python code/finetune.py`) the
    environment a launcher would set is filled in for one process, so the same code runs.
    """
    import deepspeed
    import torch.distributed as dist

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
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x ranks
    # precision: the one switch in force
    ds.pop("fp16", None)
    ds["bf16"] = {"enabled": precision == "bf16"}
    if precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    zero = ds.get("zero_optimization", {})
    if device.type == "cpu" and "offload_optimizer" in zero:
        # on a CPU-only machine the optimizer already lives in CPU memory
        zero.pop("offload_optimizer")
    if "offload_optimizer" not in zero:
        # plain torch AdamW (foreach kernels): no DeepSpeed op to compile
        ds.get("optimizer", {}).setdefault("params", {}).setdefault("torch_adam", True)
    return ds


@functools.lru_cache(maxsize=1)
def read_ids_file(path):
    """The ids file of code/convert_data.py (read once: is_pretrain_data looks at it first)."""
    return data_io.safe_load_pickle(path)


def is_pretrain_data(args):
    """True for an ids file of `convert_data.py --mode pretrain`: plain text, no '<end>' to add."""
    if args.dataset_type != "DatasetIds":
        return False
    datas = read_ids_file(args.data_path)
    return isinstance(datas, dict) and isinstance(datas.get("meta"), dict) and datas["meta"].get("mode") == "pretrain"


def load_train_dataset(args, tokenizer):
    if args.dataset_type == "DatasetIds":
        datas = read_ids_file(args.data_path)
        return dataset.DatasetIds(tokenizer, datas, args.max_length, source=args.data_path,
                                  max_rows=args.max_training_samples)
    dialogues = data_io.load_dialogues(args.data_path)
    if args.max_training_samples > 0:
        dialogues = dialogues[:args.max_training_samples]
    cls = dataset.DATASET_TYPES[args.dataset_type]
    return cls(tokenizer, dialogues, args.max_length, template=args.template, seed=args.seed)


def add_end_token(tokenizer):
    """Full fine-tuning: make '<end>' one special token of ``tokenizer``.

    Returns the ids of the pieces '<end>' was split into before (None if it already was one
    token); ``init_end_embedding`` uses them once the model is loaded.
    """
    if config.END_MARKER in tokenizer.get_vocab():
        return None
    old_piece_ids = tokenizer(config.END_MARKER, add_special_tokens=False)["input_ids"]
    tokenizer.add_special_tokens({"additional_special_tokens": [config.END_MARKER]})
    return old_piece_ids


def init_end_embedding(model, tokenizer, old_piece_ids):
    """Give '<end>' its embedding rows (input and output): the mean of the rows of its former pieces.

    So the model starts out reading and predicting the new token the way it read those pieces,
    rather than from a random or all-zero row.
    """
    new_id = tokenizer.convert_tokens_to_ids(config.END_MARKER)
    if new_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for emb in {id(e): e for e in embeddings if e is not None}.values():
            emb.weight[new_id] = emb.weight[old_piece_ids].mean(dim=0)
    return new_id


def build_model(args, tokenizer, dtype, attn_implementation, end_piece_ids=None, base_model=None):
    """The model to train: the base from --model_path (or ``base_model``, as the benchmarks pass a
    randomly initialised one), wrapped in LoRA or prepared for full fine-tuning."""
    from transformers import AutoModelForCausalLM

    from model_loader import resolve_path

    if base_model is not None:
        model = base_model
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_path(args.model_path, "--model_path"), dtype=dtype,
                                                     attn_implementation=attn_implementation)
    model.config.use_cache = False
    if args.use_lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if args.load_lora:
            model = PeftModel.from_pretrained(model, resolve_path(args.load_lora_path, "--load_lora_path"),
                                              is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                r=config.LORA_R, lora_alpha=config.LORA_ALPHA, lora_dropout=args.lora_dropout,
                target_modules=config.LORA_TARGET_MODULES, bias="none", task_type="CAUSAL_LM"))
    elif end_piece_ids is not None:
        new_id = init_end_embedding(model, tokenizer, end_piece_ids)
        print_rank0(f"added {config.END_MARKER!r} as token {new_id}; its embedding rows start as the mean of "
                    f"the rows of its former pieces {end_piece_ids}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----------------------------------------------------------------------------------------------
# the training step
# ----------------------------------------------------------------------------------------------
def forward_loss_sum(model, batch, attn_implementation, dtype):
    """Summed cross-entropy over the learned tokens of one micro-batch, and their count."""
    input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch["position_ids"]
    if attn_implementation == "flash_attention_2":
        # variable-length kernels split samples at every position id 0
        mask = None
    else:
        mask = dataset.block_causal_mask(position_ids, dtype)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=dataset.IGNORE_INDEX,
                                                 reduction="sum")
    return loss_sum, int((shift_labels != dataset.IGNORE_INDEX).sum())


def train_step(engine, micro_batches, device, attn_implementation, dtype, world_size):
    """One optimizer step over this rank's micro-batches; returns (mean loss, real tokens) globally.

    Each micro-batch's summed loss is divided by the number of learned tokens of the whole step
    (all micro-batches on all ranks) and multiplied by the world size, because DeepSpeed averages
    gradients over ranks: the update is the gradient of the step's token-mean loss.
    """
    import torch.distributed as dist

    counts = torch.tensor([sum(int((b["labels"][:, 1:] != dataset.IGNORE_INDEX).sum()) for b in micro_batches),
                           sum(int(b["attention_mask"].sum()) for b in micro_batches)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    step_tokens = max(counts[0].item(), 1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    for index, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        loss_sum, _ = forward_loss_sum(engine, batch, attn_implementation, dtype)
        engine.backward(loss_sum * (world_size / step_tokens), scale_wrt_gas=False)
        engine.step()
        loss_total += loss_sum.detach().double()
    dist.all_reduce(loss_total)
    return loss_total.item() / step_tokens, int(counts[1].item())


# ----------------------------------------------------------------------------------------------
# checkpoints and logs
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, model, tokenizer, record, is_rank0):
    """Rank 0 writes the checkpoint into a temporary directory and renames it into place."""
    import torch.distributed as dist

    dist.barrier()
    if is_rank0:
        with data_io.atomic_directory(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "training_config.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False, indent=1)
    dist.barrier()


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


# ----------------------------------------------------------------------------------------------
# main: setup, data, model, train, save
# ----------------------------------------------------------------------------------------------
def check_inputs(args):
    """Fail fast, before any model is loaded, on paths that cannot work."""
    if not os.path.exists(args.data_path):
        raise DataError(f"--data_path {args.data_path}: file not found (make it with code/convert_data.py)")
    if args.dataset_type == "DatasetIds" and not args.data_path.endswith(".pkl"):
        raise DataError(f"--data_path {args.data_path}: DatasetIds reads the .pkl ids file of code/convert_data.py; "
                        "for a dialogue file use --dataset_type GPT2Dataset_onlyres")
    data_io.check_writable_dir(os.path.join(args.save_dir, args.save_name), "checkpoint folder (--save_dir/--save_name)")


def main(argv=None):
    import deepspeed
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from tqdm import tqdm

    from model_loader import LoaderError, load_tokenizer

    args = parse_args(argv)
    rank, world_size, device = init_distributed()
    is_rank0 = rank == 0
    say = print_rank0
    torch.manual_seed(args.seed)

    # ---- setup and checks (every rank runs them, so every rank stops on a bad input) ----
    try:
        check_inputs(args)
        precision = model_loader.training_precision(args.precision, device)
        dtype = model_loader.TRAINING_DTYPES[precision]
        ds_config = resolve_ds_config(args, precision, device)
        tokenizer = load_tokenizer(args.model_path, "--model_path")
        attn_implementation, attn_note = model_loader.training_attention(args.use_flash_attention, device)
        # full fine-tuning trains '<end>' as one token: the data is checked against that tokenizer
        end_piece_ids = None if args.use_lora or is_pretrain_data(args) else add_end_token(tokenizer)
        train_dataset = load_train_dataset(args, tokenizer)
    except (DataError, LoaderError) as e:
        data_io.fail(str(e))
    if len(train_dataset) == 0:
        data_io.fail(f"--data_path {args.data_path}: no training rows")
    say(attn_note)
    say(f"precision: {precision}; ranks: {world_size}; device: {device.type}")

    # ---- data ----
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    grad_accum = ds_config["gradient_accumulation_steps"]
    sampler = DistributedSampler(train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_dataset, batch_size=micro_batch, sampler=sampler)
    steps_per_epoch = math.ceil(len(loader) / grad_accum)
    total_steps = steps_per_epoch * args.max_epoches
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)

    # ---- model ----
    try:
        model = build_model(args, tokenizer, dtype, attn_implementation, end_piece_ids)
    except LoaderError as e:
        data_io.fail(str(e))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"trainable parameters: {trainable:,}; rows: {len(train_dataset)}; micro-batch {micro_batch} x "
        f"accumulation {grad_accum} x ranks {world_size} = {micro_batch * grad_accum * world_size} rows per step; "
        f"{total_steps} steps")

    run_dir = os.path.join(args.save_dir, args.save_name)
    record = {"args": vars(args), "deepspeed_config": ds_config, "precision": precision,
              "attention": attn_implementation, "world_size": world_size,
              "data_meta": getattr(train_dataset, "meta", None)}
    if is_rank0:
        say("effective configuration:\n" + json.dumps(record, ensure_ascii=False, indent=1, default=str))
        with open(os.path.join(run_dir, "training_config.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, indent=1, default=str)
    runlog = RunLog(run_dir, is_rank0)

    # ---- train ----
    engine.train()
    global_step = 0
    bar = tqdm(total=total_steps, disable=not is_rank0 or args.no_progress, file=sys.stderr, desc="training")
    for epoch in range(args.max_epoches):
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            if global_step >= total_steps:
                break
            group = [b for _, b in zip(range(grad_accum), batches)]
            start = time.perf_counter()
            loss, real_tokens = train_step(engine, group, device, attn_implementation, dtype, world_size)
            elapsed = time.perf_counter() - start
            global_step += 1
            lr = engine.get_lr()[0]
            rec = {"step": global_step, "epoch": epoch, "loss": loss, "lr": lr,
                   "tokens_per_s": real_tokens / max(elapsed, 1e-9)}
            runlog.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if global_step % args.log_every == 0 and is_rank0:
                tqdm.write(f"step {global_step}/{total_steps} epoch {epoch} loss {loss:.4f} lr {lr:.3e} "
                           f"tokens/s {rec['tokens_per_s']:.0f}", file=sys.stdout)
            if global_step % args.save_steps == 0:
                save_checkpoint(os.path.join(run_dir, f"{args.save_name}_{global_step}"), model, tokenizer,
                                dict(record, step=global_step, epoch=epoch), is_rank0)
        save_checkpoint(os.path.join(run_dir, f"{args.save_name}_epoch{epoch}"), model, tokenizer,
                        dict(record, step=global_step, epoch=epoch), is_rank0)
        if global_step >= total_steps:
            break
    bar.close()
    runlog.close()
    say(f"done: {global_step} steps; checkpoints in {run_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
