"""The command line of code/finetune.py: its flags and the checks between them.

finetune.py passes its own docstring as the help text; everything here only parses, so the docs test
(tests/test_docs.py) and the benchmarks can check a command without loading a model.
"""
import argparse

import config
import dataset
import distributed
import fused_kernels

OFFLOAD_CHOICES = ("none", "cpu", "nvme")


def build_parser(description=None):
    import deepspeed

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--lr_schedule", choices=sorted(distributed.LR_SCHEDULERS), default=config.LR_SCHEDULE,
                   help="after the warm-up: constant (the seed's WarmupLR), or linear / cosine decay to 0 at the "
                        "last step (default from config.py: %(default)s)")
    p.add_argument("--micro_batch_size", type=int, default=None, help="rows per GPU per forward pass")
    p.add_argument("--grad_accum", type=int, default=None, help="micro-batches accumulated per optimizer step")
    p.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="ZeRO stage: 1 splits the optimizer state among the ranks, 2 the gradients too, 3 the "
                        "weights too (each rank loads and keeps only its part; needed for full fine-tuning of "
                        "13B on 8 x 24/40 GB, docs/finetuning.md)")
    p.add_argument("--offload_optimizer", choices=OFFLOAD_CHOICES, default=None,
                   help="keep the optimizer state (fp32 master weights, Adam moments) in CPU memory or on an NVMe "
                        "disk (--nvme_path) instead of the GPUs; ZeRO stage 1-3 (default: config.py's, cpu for "
                        "full fine-tuning, none for LoRA)")
    p.add_argument("--offload_param", choices=OFFLOAD_CHOICES, default=None,
                   help="ZeRO-3 only: keep the 16-bit weights in CPU memory or on NVMe too, fetched layer by "
                        "layer (default: none)")
    p.add_argument("--nvme_path", default=None, metavar="DIR",
                   help="a folder on a fast local NVMe disk for --offload_optimizer/--offload_param nvme")
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
    p.add_argument("--liger", nargs="?", const="all", default="off", choices=fused_kernels.LIGER_CHOICES,
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
    p.add_argument("--print_config", action="store_true",
                   help="print the effective configuration (it is always saved as SAVE_DIR/SAVE_NAME/training_config.json)")
    p.add_argument("--resume_from", default=None, metavar="DIR|latest",
                   help="continue an interrupted run exactly: a checkpoint directory this script saved, or 'latest' "
                        "(the newest complete one under SAVE_DIR/SAVE_NAME); restores weights, optimizer, scheduler, "
                        "step, data position and random states. Give the same other flags as the interrupted run")
    return deepspeed.add_config_arguments(p)


def check_zero_flags(parser, args):
    """ZeRO stage and offload flags that cannot work together stop here, naming the alternative."""
    if args.offload_param not in (None, "none") and args.zero_stage != 3:
        parser.error(f"--offload_param {args.offload_param} moves the weights, which only ZeRO-3 partitions: "
                     f"add --zero_stage 3 (or offload the optimizer state alone with --offload_optimizer)")
    if args.offload_optimizer not in (None, "none") and args.zero_stage == 0:
        parser.error(f"--offload_optimizer {args.offload_optimizer} needs ZeRO: use --zero_stage 1, 2 or 3")
    uses_nvme = "nvme" in (args.offload_optimizer, args.offload_param)
    if uses_nvme and not args.nvme_path:
        parser.error("--offload_optimizer/--offload_param nvme needs --nvme_path DIR (a folder on a local NVMe disk)")
    if args.nvme_path and not uses_nvme:
        parser.error("--nvme_path is only read with --offload_optimizer nvme or --offload_param nvme: add one, "
                     "or drop --nvme_path")
    if args.zero_stage == 3 and args.quant != "none":
        parser.error(f"--quant {args.quant} (QLoRA) keeps a bitsandbytes-quantized base that ZeRO-3 cannot "
                     f"partition: use --zero_stage 2 with --quant, or --zero_stage 3 without --quant (plain LoRA "
                     f"on a 16-bit base split among the GPUs)")


def parse_args(argv=None, description=None):
    parser = build_parser(description)
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
    overrides = (args.lr, args.warmup_steps, args.micro_batch_size, args.grad_accum, args.zero_stage,
                 args.offload_optimizer, args.offload_param, args.nvme_path)
    if args.deepspeed_config and any(v is not None for v in overrides):
        parser.error("--deepspeed_config replaces the whole config: put lr/batch/ZeRO/offload settings in that file, "
                     "or drop --deepspeed_config and use --lr/--warmup_steps/--micro_batch_size/--grad_accum/"
                     "--zero_stage/--offload_optimizer/--offload_param")
    check_zero_flags(parser, args)
    for name in ("max_epoches", "save_steps", "max_length", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more")
    if not args.model_path:
        parser.error("--model_path is required (a local model directory or a Hugging Face id)")
    if not args.data_path:
        parser.error("--data_path is required (llama_ift_data_ids.pkl from code/convert_data.py, or a dialogue file)")
    return args
