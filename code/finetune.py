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
causal mask for SDPA, the same pattern as a FlexAttention BlockMask for --attention flex, variable-length
kernels for flash-attention).

Speed levers (CUDA GPU only; see README "Train" and BENCHMARKS.md for what is measured):

    python code/finetune.py --use_lora ... --attention flex           # FlexAttention BlockMask for packed rows
    python code/finetune.py --use_lora ... --liger                    # liger-kernel fused RMSNorm/SwiGLU/RoPE + loss
    python code/finetune.py --use_lora ... --attention flex --liger --gradient_checkpointing
"""
import argparse
import copy
import functools
import json
import math
import os
import shutil
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
                   help="the seed's switch, the same as --attention flash: flash_attention_2 where the flash_attn "
                        "package and a GPU are there (else PyTorch SDPA, with a notice)")
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
    p.add_argument("--lr_schedule", choices=sorted(LR_SCHEDULERS), default=config.LR_SCHEDULE,
                   help="after the warm-up: constant (the seed's WarmupLR), or linear / cosine decay to 0 at the "
                        "last step (default from config.py: %(default)s)")
    p.add_argument("--micro_batch_size", type=int, default=None, help="rows per GPU per forward pass")
    p.add_argument("--grad_accum", type=int, default=None, help="micro-batches accumulated per optimizer step")
    p.add_argument("--zero_stage", type=int, choices=[0, 1, 2], default=None, help="ZeRO stage")
    # ours
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where the GPU supports it, else fp32 (default: %(default)s)")
    p.add_argument("--lora_dropout", type=float, default=config.LORA_DROPOUT,
                   help="dropout on the LoRA input (default from config.py: %(default)s); 0 skips the dropout pass")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--quant", choices=["none", "int8", "nf4"], default="none",
                   help="LoRA only: keep the frozen base in int8 or nf4 (bitsandbytes; QLoRA) to fit a small GPU "
                        "(default: %(default)s)")
    p.add_argument("--attention", choices=config.TRAINING_ATTENTION_CHOICES, default=None,
                   help="attention kernel for the packed rows: sdpa (dense block-diagonal mask, runs anywhere), flex "
                        "(FlexAttention BlockMask; CUDA GPU only, as it has no backward pass on a CPU) or flash "
                        "(flash-attn variable-length kernels) (default from config.TRAINING_ATTENTION: "
                        f"{config.TRAINING_ATTENTION})")
    p.add_argument("--liger", nargs="?", const="all", default="off", choices=model_loader.LIGER_CHOICES,
                   help="liger-kernel's fused Triton kernels (CUDA GPU + the liger-kernel package, "
                        "requirements-gpu.txt): '--liger' or '--liger all' = fused RMSNorm, SwiGLU and rotary "
                        "embedding plus its fused output-layer cross-entropy in place of the --loss_chunk loss; "
                        "'--liger kernels' = the first three only (default: %(default)s)")
    p.add_argument("--loss_chunk", type=int, default=config.LOSS_CHUNK_TOKENS,
                   help="compute the output layer and the loss this many positions at a time, recomputed in "
                        "backward, so the full logits never exist (0: all at once) (default from config.py: "
                        "%(default)s)")
    p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: all epochs)")
    p.add_argument("--template", default="random",
                   help="template for GPT2Dataset_onlyres/BertDataset_onlyres ('random' or a name in config.TURN_TEMPLATES)")
    p.add_argument("--log_every", type=int, default=config.LOG_EVERY, help="optimizer steps between log lines (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--resume_from", default=None, metavar="DIR|latest",
                   help="continue an interrupted run exactly: a checkpoint directory this script saved, or 'latest' "
                        "(the newest complete one under SAVE_DIR/SAVE_NAME); restores weights, optimizer, scheduler, "
                        "step, data position and random states. Give the same other flags as the interrupted run")
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
    if args.resume_from is not None and args.load_lora:
        parser.error("--resume_from restores the adapter with its optimizer state; --load_lora starts a new run from "
                     "an adapter with a fresh optimizer: drop one of them")
    if args.quant != "none" and not args.use_lora:
        parser.error(f"--quant {args.quant} freezes a quantized base, so it needs --use_lora (full fine-tuning "
                     f"trains every weight in --precision)")
    if args.loss_chunk < 0:
        parser.error("--loss_chunk must be 0 (all positions at once) or more")
    if args.use_flash_attention:
        if args.attention not in (None, "flash"):
            parser.error(f"--use_flash_attention means --attention flash, but --attention {args.attention} is given: "
                         f"drop one of them")
        args.attention = "flash"
    if args.attention is None:
        args.attention = config.TRAINING_ATTENTION
    args.use_flash_attention = args.attention == "flash"
    if args.load_lora_path and not args.load_lora:
        parser.error("--load_lora_path is only read with --load_lora: add --load_lora")
    if args.deepspeed_config and args.lr_schedule != "constant":
        parser.error(f"--lr_schedule {args.lr_schedule} rewrites config.py's scheduler; with --deepspeed_config put "
                     "the scheduler you want in that file and drop --lr_schedule")
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


def build_model(args, tokenizer, dtype, attn_implementation, end_piece_ids=None, base_model=None,
                device="cpu"):
    """The model to train: the base from --model_path (or ``base_model``, as the benchmarks pass a
    randomly initialised one), wrapped in LoRA or prepared for full fine-tuning."""
    from transformers import AutoModelForCausalLM

    from model_loader import resolve_path

    if base_model is not None:
        model = base_model
    elif args.quant != "none":
        # QLoRA: the frozen base in int8/nf4 through the shared loader's bitsandbytes settings
        kwargs = model_loader.model_load_kwargs(args.quant, str(device), True, attn_implementation)
        model = AutoModelForCausalLM.from_pretrained(resolve_path(args.model_path, "--model_path"), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_path(args.model_path, "--model_path"), dtype=dtype,
                                                     attn_implementation=attn_implementation)
    model.config.use_cache = False
    if getattr(args, "liger", "off") != "off":
        # fused RMSNorm / SwiGLU / rotary kernels on the base, before LoRA wraps its projections
        model_loader.apply_liger(model, args.liger)
    if args.use_lora:
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        if args.quant != "none":
            # norms and embeddings in fp32, inputs that carry gradients into the checkpointed layers
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})

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
def _chunk_loss_sum(hidden, weight, bias, targets):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def attention_mask_for(attn_implementation, position_ids, dtype, attention_mask=None):
    """The mask that keeps the packed samples of a micro-batch apart, in the form the kernel takes.

    flash_attention_2: none (its variable-length kernels split samples at every position id 0);
    flex_attention: a FlexAttention BlockMask (dataset.block_causal_block_mask; with ``attention_mask`` the
    padding is a document of its own), built once here and shared by every layer (transformers takes a
    prebuilt 4-D mask as it is); sdpa/eager: the dense additive mask (dataset.block_causal_mask).  Every
    real token sees the same positions under all three.
    """
    if attn_implementation == "flash_attention_2":
        return None
    if attn_implementation == "flex_attention":
        return dataset.block_causal_block_mask(position_ids, attention_mask)
    return dataset.block_causal_mask(position_ids, dtype)


def _liger_loss_sum(hidden, weight, bias, targets):
    """liger-kernel's fused output layer + cross-entropy (summed): the logits exist one chunk at a time and
    the gradients of its inputs are computed in the same pass (--liger all)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)


def forward_loss_sum(model, batch, attn_implementation, dtype, loss_chunk=0, fused_loss=False):
    """Summed cross-entropy over the learned tokens of one micro-batch, and their count.

    ``model`` is a Hugging Face causal LM or a PEFT model around one.  The decoder runs once, with the
    samples kept apart by ``attention_mask_for``; the output layer then runs only at the positions whose
    next token is learned (prompts are not), and with ``loss_chunk`` > 0 that many positions at a time,
    each chunk recomputed in backward (activation checkpointing), so the logits of the whole micro-batch
    never exist at once.  ``fused_loss``: liger-kernel's fused linear cross-entropy instead (GPU only;
    --liger all), which chunks on its own and ignores ``loss_chunk``.
    """
    input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch["position_ids"]
    mask = attention_mask_for(attn_implementation, position_ids, dtype, batch.get("attention_mask"))
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
    targets = labels[:, 1:].reshape(-1)
    learned = targets != dataset.IGNORE_INDEX
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[learned]
    targets = targets[learned]
    head = causal_lm.get_output_embeddings()
    if fused_loss:
        loss_sum = _liger_loss_sum(hidden, head.weight, head.bias, targets)
    elif loss_chunk <= 0 or hidden.shape[0] <= loss_chunk:
        loss_sum = _chunk_loss_sum(hidden, head.weight, head.bias, targets)
    else:
        from torch.utils.checkpoint import checkpoint

        loss_sum = sum(checkpoint(_chunk_loss_sum, hidden[start:start + loss_chunk], head.weight, head.bias,
                                  targets[start:start + loss_chunk], use_reentrant=False)
                       for start in range(0, hidden.shape[0], loss_chunk))
    return loss_sum, int(learned.sum())


class LossModule(torch.nn.Module):
    """The model and its loss as one module, which DeepSpeed's engine wraps: forward(batch) returns the
    summed loss of the micro-batch (``forward_loss_sum``).  The checkpoints save the inner ``model``."""

    def __init__(self, model, attn_implementation, dtype, loss_chunk, fused_loss=False):
        super().__init__()
        self.model = model
        self.attn_implementation, self.dtype, self.loss_chunk = attn_implementation, dtype, loss_chunk
        self.fused_loss = fused_loss

    def forward(self, input_ids, labels, position_ids, attention_mask=None):
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 "attention_mask": attention_mask}
        return forward_loss_sum(self.model, batch, self.attn_implementation, self.dtype, self.loss_chunk,
                                self.fused_loss)[0]


def train_step(engine, micro_batches, device, world_size):
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
        loss_sum = engine(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                          attention_mask=batch["attention_mask"])
        engine.backward(loss_sum * (world_size / step_tokens), scale_wrt_gas=False)
        engine.step()
        loss_total += loss_sum.detach().double()
    dist.all_reduce(loss_total)
    return loss_total.item() / step_tokens, int(counts[1].item())


# ----------------------------------------------------------------------------------------------
# checkpoints and logs
# ----------------------------------------------------------------------------------------------
# A checkpoint directory holds what inference.py loads (the PEFT adapter or the full HF model, the
# tokenizer, training_config.json) and, under training_state/, what an exact resume needs: the
# DeepSpeed engine state (trainable weights, optimizer partition of every rank, LR scheduler), each
# rank's random-number states, and progress.json (step, epoch, position in the data order).
# All ranks write into a temporary directory beside it; rank 0 writes progress.json last and renames
# the directory into place, so a directory under its final name is always complete.
STATE_DIR = "training_state"
PROGRESS_FILE = "progress.json"
ENGINE_TAG = "engine"
TMP_PREFIX = ".tmp-"


def all_ranks_agree(ok, device):
    """True when ``ok`` holds on every rank (a collective: every rank must call it)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def rng_states():
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    np_state = np.random.get_state()
    state.update(numpy_keys=torch.from_numpy(np_state[1].astype("int64")), numpy_pos=int(np_state[2]),
                 numpy_has_gauss=int(np_state[3]), numpy_gauss=float(np_state[4]))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state):
    import random

    import numpy as np

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
    if all_ranks_agree(error is None, device):
        try:
            # DeepSpeed: rank 0 writes the trainable weights and the scheduler, each rank its optimizer part
            engine.save_checkpoint(state_dir, tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
            torch.save(rng_states(), os.path.join(state_dir, f"rng_rank{rank}.pt"))
        except OSError as e:
            error = e
    if all_ranks_agree(error is None, device) and rank == 0:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
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


def load_training_state(path, engine, rank):
    """Restore the engine (weights, optimizer, scheduler) and this rank's random states from ``path``.

    DeepSpeed's loader unpickles without restriction, so every file it will read is first opened
    with the restricted loader: one holding anything but tensors and plain values is refused.
    """
    state_dir = os.path.join(path, STATE_DIR)
    engine_dir = os.path.join(state_dir, ENGINE_TAG)
    for name in sorted(os.listdir(engine_dir)):
        if name.endswith(".pt"):
            _load_restricted(os.path.join(engine_dir, name))
    load_path, _ = engine.load_checkpoint(state_dir, tag=ENGINE_TAG, load_module_strict=False)
    if load_path is None:
        raise DataError(f"--resume_from {path}: DeepSpeed found no engine state in {engine_dir}")
    rng_file = os.path.join(state_dir, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise DataError(f"--resume_from {path}: {rng_file} is missing (was the run saved with more ranks?)")
    return _load_restricted(rng_file)


def checkpoint_bytes(model, dtype):
    """A generous estimate of one checkpoint's size on disk."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
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
        dtype = model_loader.FLOAT_DTYPES[precision]
        ds_config = resolve_ds_config(args, precision, device)
        # kernels that cannot run here stop the run before anything is loaded
        attn_implementation, attn_note = model_loader.training_attention(args.attention, device)
        model_loader.check_liger(args.liger, device)
        tokenizer = load_tokenizer(args.model_path, "--model_path")
        # full fine-tuning trains '<end>' as one token: the data is checked against that tokenizer
        end_piece_ids = None if args.use_lora or is_pretrain_data(args) else add_end_token(tokenizer)
        train_dataset = load_train_dataset(args, tokenizer)
    except (DataError, LoaderError) as e:
        data_io.fail(str(e))
    if len(train_dataset) == 0:
        data_io.fail(f"--data_path {args.data_path}: no training rows")
    say(attn_note)
    if args.liger != "off":
        say("liger-kernel: fused RMSNorm, SwiGLU, rotary embedding"
            + (" and output-layer cross-entropy (--loss_chunk unused)" if args.liger == "all" else ""))
    say(f"precision: {precision}; ranks: {world_size}; device: {device.type}")

    # ---- data ----
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    grad_accum = ds_config["gradient_accumulation_steps"]
    sampler = DistributedSampler(train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_dataset, batch_size=micro_batch, sampler=sampler, collate_fn=dataset.collate_rows)
    steps_per_epoch = math.ceil(len(loader) / grad_accum)
    total_steps = steps_per_epoch * args.max_epoches
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    ds_config = with_lr_schedule(ds_config, args.lr_schedule, total_steps)

    # ---- model ----
    run_dir = os.path.join(args.save_dir, args.save_name)
    fingerprint = resume_fingerprint(args, ds_config, world_size, train_dataset)
    try:
        resume_dir = resolve_resume_dir(args) if args.resume_from else None
        if resume_dir:
            resume_progress = read_progress(resume_dir)
            check_resumable(resume_dir, resume_progress, fingerprint)
        model = build_model(args, tokenizer, dtype, attn_implementation, end_piece_ids, device=device)
        check_free_disk(run_dir, checkpoint_bytes(model, dtype))
    except (DataError, LoaderError) as e:
        data_io.fail(str(e))
    engine, _, _, _ = deepspeed.initialize(model=LossModule(model, attn_implementation, dtype, args.loss_chunk,
                                                            fused_loss=args.liger == "all"),
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config)
    global_step, start_epoch, start_step_in_epoch, resumed_rng = 0, 0, 0, None
    if resume_dir:
        try:
            resumed_rng = load_training_state(resume_dir, engine, rank)
        except DataError as e:
            data_io.fail(str(e))
        global_step = resume_progress["global_step"]
        start_epoch, start_step_in_epoch = resume_progress["epoch"], resume_progress["step_in_epoch"]
        if start_step_in_epoch >= steps_per_epoch:   # saved at the end of an epoch
            start_epoch, start_step_in_epoch = start_epoch + 1, 0
        say(f"resuming from {resume_dir}: step {global_step}, epoch {start_epoch}, "
            f"step {start_step_in_epoch} of {steps_per_epoch} in that epoch")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"trainable parameters: {trainable:,}; rows: {len(train_dataset)}; micro-batch {micro_batch} x "
        f"accumulation {grad_accum} x ranks {world_size} = {micro_batch * grad_accum * world_size} rows per step; "
        f"{total_steps} steps")

    record = {"args": vars(args), "deepspeed_config": ds_config, "precision": precision,
              "attention": attn_implementation, "world_size": world_size,
              "data_meta": getattr(train_dataset, "meta", None)}
    if is_rank0:
        say("effective configuration:\n" + json.dumps(record, ensure_ascii=False, indent=1))
        data_io.atomic_write_json(os.path.join(run_dir, "training_config.json"), record)
    if is_rank0 and resume_dir:
        truncate_log(os.path.join(run_dir, "train_log.jsonl"), global_step)
    runlog = RunLog(run_dir, is_rank0)

    def save(name, epoch, step_in_epoch):
        progress = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "steps_per_epoch": steps_per_epoch, "fingerprint": fingerprint}
        try:
            save_checkpoint(os.path.join(run_dir, name), engine, model, tokenizer,
                            dict(record, step=global_step, epoch=epoch), progress, rank, device)
        except DataError as e:
            data_io.fail(str(e))

    # ---- train ----
    engine.train()
    if resumed_rng is not None:
        set_rng_states(resumed_rng)   # after the model set-up, which drew from the same generators
    bar = tqdm(total=total_steps, initial=global_step, disable=not is_rank0 or args.no_progress, file=sys.stderr,
               desc="training")
    for epoch in range(start_epoch, args.max_epoches):
        if global_step >= total_steps:
            break
        sampler.set_epoch(epoch)
        first_step = start_step_in_epoch if epoch == start_epoch else 0
        # the epoch's order is fixed by (seed, epoch); a resumed epoch skips the rows already trained on
        order = list(sampler)[first_step * grad_accum * micro_batch:]
        # its own generator: a DataLoader iterator draws a seed, which would shift the global RNG stream
        # (dropout) between a run and its resumption
        # each micro-batch is cut to its longest row (dataset.collate_rows): padding is not computed
        batches = iter(DataLoader(train_dataset, batch_size=micro_batch, sampler=order,
                                  collate_fn=dataset.collate_rows,
                                  generator=torch.Generator().manual_seed(args.seed + epoch)))
        step_in_epoch = first_step
        for step_in_epoch in range(first_step + 1, steps_per_epoch + 1):
            if global_step >= total_steps:
                step_in_epoch -= 1
                break
            group = [b for _, b in zip(range(grad_accum), batches)]
            start = time.perf_counter()
            loss, real_tokens = train_step(engine, group, device, world_size)
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
                save(f"{args.save_name}_{global_step}", epoch, step_in_epoch)
        save(f"{args.save_name}_epoch{epoch}", epoch, step_in_epoch)
    bar.close()
    runlog.close()
    say(f"done: {global_step} steps; checkpoints in {run_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
