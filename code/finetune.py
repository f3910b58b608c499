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
--lr, --warmup_steps, --micro_batch_size, --grad_accum, --zero_stage (0-3) and --offload_optimizer /
--offload_param (cpu, nvme with --nvme_path) override single values and --deepspeed_config FILE.json replaces it.  The effective config is saved beside the checkpoints as
training_config.json (and printed with --print_config).

The loss of an optimizer step is the mean over every learned token of the step, across
micro-batches and ranks (each token weighs the same however rows are split among GPUs), and
packed samples never attend to each other (position ids restart per sample; a block-diagonal
causal mask for SDPA, the same pattern as a FlexAttention BlockMask for --attention flex, variable-length
kernels for flash-attention).

Speed levers (CUDA GPU only; docs/finetuning.md, and BENCHMARKS.md for what is measured): --attention flex
(a FlexAttention BlockMask for packed rows), --liger (liger-kernel's fused RMSNorm/SwiGLU/RoPE and loss),
--gradient_checkpointing.
"""
import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import checkpoints
import config
import data_io
import dataset
import distributed
import fused_kernels
import model_loader
import packing
import train_args
from data_io import DataError
from model_loader import LoaderError
from train_step import make_engine, quiet_zero3_collectives, train_step


# ----------------------------------------------------------------------------------------------
# arguments (the flags live in train_args.py)
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    return train_args.parse_args(argv, description=__doc__)


# ----------------------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------------------
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


def gathered(params):
    """Whole weights for the block: under ZeRO-3 ``params`` are gathered from every rank (a collective) and
    rank 0's changes are partitioned back on exit; otherwise they are whole already."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=distributed.is_partitioned(params))


def vocab_rows(embedding):
    """Rows of an embedding weight (its full shape under ZeRO-3, where the local tensor is a part)."""
    return getattr(embedding.weight, "ds_shape", embedding.weight.shape)[0]


def init_end_embedding(model, tokenizer, old_piece_ids):
    """Give '<end>' its embedding rows (input and output): the mean of the rows of its former pieces.

    So the model starts out reading and predicting the new token the way it read those pieces,
    rather than from a random or all-zero row.  Under ZeRO-3 the rows are set on gathered weights
    (transformers' resize gathers on its own).
    """
    new_id = tokenizer.convert_tokens_to_ids(config.END_MARKER)
    if new_id >= vocab_rows(model.get_input_embeddings()):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    weights = [e.weight for e in {id(e): e for e in embeddings if e is not None}.values()]
    with gathered(weights), torch.no_grad():
        for weight in weights:
            weight[new_id] = weight[old_piece_ids].mean(dim=0)
    return new_id


# transformers reads the DeepSpeed config through a weak reference while it loads and resizes the model
# under ZeRO-3: the object lives as long as the run
_ZERO3_CONFIG = []


def load_base_model(args, dtype, attn_implementation, ds_config, device):
    """The base model from --model_path; under ZeRO-3 each rank loads only its part (deepspeed.zero.Init
    through transformers' HfDeepSpeedConfig), so no rank ever holds the whole model."""
    kwargs = (model_loader.model_load_kwargs(args.quant, str(device), True, attn_implementation)
              if args.quant != "none" else {"dtype": dtype, "attn_implementation": attn_implementation})
    if ds_config is not None and distributed.zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _ZERO3_CONFIG[:] = [HfDeepSpeedConfig(ds_config)]
        quiet_zero3_collectives()
    # loading draws no random numbers that training sees (zero.Init initialises weights before the
    # checkpoint overwrites them): LoRA's init and dropout are the same at every ZeRO stage
    with torch.random.fork_rng(devices=[]):
        return AutoModelForCausalLM.from_pretrained(model_loader.resolve_path(args.model_path, "--model_path"),
                                                    **kwargs)


def build_model(args, tokenizer, dtype, attn_implementation, end_piece_ids=None, base_model=None,
                device="cpu", ds_config=None):
    """The model to train: the base from --model_path (or ``base_model``, as the benchmarks pass a
    randomly initialised one), wrapped in LoRA or prepared for full fine-tuning.  ``ds_config``: the
    DeepSpeed config in force (ZeRO-3 loads partitioned)."""
    # the first model class (and peft) import torchao where it is installed: its log lines are noise here
    with model_loader.quiet_torchao_import():
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        model = base_model
        if model is None:   # QLoRA: the frozen base in int8/nf4 through the shared loader's bitsandbytes settings
            model = load_base_model(args, dtype, attn_implementation, ds_config, device)
    model.config.use_cache = False
    if getattr(args, "liger", "off") != "off":
        # fused RMSNorm / SwiGLU / rotary kernels on the base, before LoRA wraps its projections
        fused_kernels.apply_liger(model, args.liger)
    if args.use_lora:
        if args.quant != "none":
            # norms and embeddings in fp32, inputs that carry gradients into the checkpointed layers
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})

        if args.load_lora:
            model = PeftModel.from_pretrained(model, model_loader.resolve_path(args.load_lora_path, "--load_lora_path"),
                                              is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                r=config.LORA_R, lora_alpha=config.LORA_ALPHA, lora_dropout=args.lora_dropout,
                target_modules=config.LORA_TARGET_MODULES, bias="none", task_type="CAUSAL_LM"))
    elif end_piece_ids is not None:
        new_id = init_end_embedding(model, tokenizer, end_piece_ids)
        distributed.print_rank0(f"added {config.END_MARKER!r} as token {new_id}; its embedding rows start as the "
                                f"mean of the rows of its former pieces {end_piece_ids}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----------------------------------------------------------------------------------------------
# setup, the training loop, main
# ----------------------------------------------------------------------------------------------
def check_inputs(args):
    """Fail fast, before any model is loaded, on paths that cannot work."""
    if not os.path.exists(args.data_path):
        raise DataError(f"--data_path {args.data_path}: file not found (make it with code/convert_data.py)")
    if args.dataset_type == "DatasetIds" and not args.data_path.endswith(".pkl"):
        raise DataError(f"--data_path {args.data_path}: DatasetIds reads the .pkl ids file of code/convert_data.py; "
                        "for a dialogue file use --dataset_type GPT2Dataset_onlyres")
    data_io.check_writable_dir(os.path.join(args.save_dir, args.save_name), "checkpoint folder (--save_dir/--save_name)")


def training_settings(args, device):
    """(precision, dtype, DeepSpeed config, attention implementation, its notice) for this run on ``device``.

    Kernels that cannot run here raise LoaderError before anything is loaded.
    """
    precision = model_loader.training_precision(args.precision, device)
    ds_config = distributed.resolve_ds_config(args, precision, device)
    attn_implementation, attn_note = model_loader.training_attention(args.attention, device)
    fused_kernels.check_liger(args.liger, device)
    return precision, model_loader.FLOAT_DTYPES[precision], ds_config, attn_implementation, attn_note


def epoch_batches(train_dataset, sampler, epoch, first_step, micro_batch, grad_accum, seed):
    """The optimizer steps of ``epoch`` from ``first_step`` on, each a list of ``grad_accum`` micro-batches.

    The epoch's order is fixed by (seed, epoch); a resumed epoch skips the rows already trained on.
    The loader has its own generator: a DataLoader iterator draws a seed, which would otherwise shift
    the global RNG stream (dropout) between a run and its resumption.  Each micro-batch is cut to its
    longest row (packing.collate_rows): padding is not computed.
    """
    sampler.set_epoch(epoch)
    order = list(sampler)[first_step * grad_accum * micro_batch:]
    batches = iter(DataLoader(train_dataset, batch_size=micro_batch, sampler=order, collate_fn=packing.collate_rows,
                              generator=torch.Generator().manual_seed(seed + epoch)))
    while group := [b for _, b in zip(range(grad_accum), batches)]:
        yield group


def train(args, engine, train_dataset, sampler, plan, save, runlog, device, world_size, is_rank0):
    """The loop: epochs of optimizer steps from ``plan``'s position, a log line every --log_every steps,
    a checkpoint every --save_steps steps and at the end of each epoch.  Returns the last step."""
    global_step = plan["global_step"]
    bar = tqdm(total=plan["total_steps"], initial=global_step, disable=not is_rank0 or args.no_progress,
               file=sys.stderr, desc="training")
    for epoch in range(plan["start_epoch"], args.max_epoches):
        if global_step >= plan["total_steps"]:
            break
        first_step = plan["start_step_in_epoch"] if epoch == plan["start_epoch"] else 0
        step_in_epoch = first_step
        for group in epoch_batches(train_dataset, sampler, epoch, first_step, plan["micro_batch"],
                                   plan["grad_accum"], args.seed):
            if global_step >= plan["total_steps"]:
                break
            start = time.perf_counter()
            loss, real_tokens = train_step(engine, group, device, world_size)
            elapsed = time.perf_counter() - start
            global_step, step_in_epoch = global_step + 1, step_in_epoch + 1
            lr = engine.get_lr()[0]
            rec = {"step": global_step, "epoch": epoch, "loss": loss, "lr": lr,
                   "tokens_per_s": real_tokens / max(elapsed, 1e-9)}
            runlog.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if global_step % args.log_every == 0 and is_rank0:
                tqdm.write(f"step {global_step}/{plan['total_steps']} epoch {epoch} loss {loss:.4f} lr {lr:.3e} "
                           f"tokens/s {rec['tokens_per_s']:.0f}", file=sys.stdout)
            if global_step % args.save_steps == 0:
                save(f"{args.save_name}_{global_step}", global_step, epoch, step_in_epoch)
        save(f"{args.save_name}_epoch{epoch}", global_step, epoch, step_in_epoch)
    bar.close()
    return global_step


SETUP_ERRORS = (DataError, LoaderError)


def setup(args, device):
    """Checks and inputs: (settings, tokenizer, end_piece_ids, rows).  Rank 0 checks the inputs and the
    save folder every node must share; each rank then loads its own, and every rank stops together, with
    one message, when any of them fails."""
    try:
        distributed.rank0_decides(lambda: check_inputs(args), device, SETUP_ERRORS)
        distributed.check_shared_dir(os.path.join(args.save_dir, args.save_name), "--save_dir", device)
        error = settings = tokenizer = end_piece_ids = train_dataset = None
        try:
            settings = training_settings(args, device)
            tokenizer = model_loader.load_tokenizer(args.model_path, "--model_path")
            # full fine-tuning trains '<end>' as one token: the data is checked against that tokenizer
            end_piece_ids = None if args.use_lora or is_pretrain_data(args) else add_end_token(tokenizer)
            train_dataset = load_train_dataset(args, tokenizer)
            if len(train_dataset) == 0:
                raise DataError(f"--data_path {args.data_path}: no training rows")
        except SETUP_ERRORS as e:
            error = str(e)
        distributed.stop_together(error, device)
    except DataError as e:
        distributed.fail(str(e))
    return settings, tokenizer, end_piece_ids, train_dataset


def decide_resume(args, fingerprint):
    """Rank 0's decision: [the checkpoint to resume from, its progress], or [None, None]."""
    if not args.resume_from:
        return [None, None]
    path = checkpoints.resolve_resume_dir(args)
    progress = checkpoints.read_progress(path)
    checkpoints.check_resumable(path, progress, fingerprint)
    return [path, progress]


def prepare_model(args, tokenizer, settings, ds_config, end_piece_ids, run_dir, fingerprint, device):
    """(model, resume dir, its progress): every rank resumes from the checkpoint rank 0 chose, and every
    rank stops together when any of them cannot read it or load the model.  ``ds_config``: the config in
    force (under ZeRO-3 the model loads partitioned)."""
    _, dtype, _, attn_implementation, _ = settings
    try:
        resume_dir, progress = distributed.rank0_decides(lambda: decide_resume(args, fingerprint), device,
                                                         SETUP_ERRORS)
        error = model = None
        try:
            if resume_dir and checkpoints.read_progress(resume_dir) != progress:
                raise DataError(f"--resume_from {resume_dir}: rank 0 reads this checkpoint, this node cannot (or "
                                f"reads another one); put it in a folder every node shares")
            model = build_model(args, tokenizer, dtype, attn_implementation, end_piece_ids, device=device,
                                ds_config=ds_config)
            checkpoints.check_free_disk(run_dir, checkpoints.checkpoint_bytes(model, dtype))
        except SETUP_ERRORS as e:
            error = str(e)
        distributed.stop_together(error, device)
    except DataError as e:
        distributed.fail(str(e))
    return model, resume_dir, progress


def main(argv=None):
    # ---- arguments and setup ----
    args = parse_args(argv)
    rank, world_size, device = distributed.init_distributed()
    is_rank0, say = rank == 0, distributed.print_rank0
    torch.manual_seed(args.seed)
    settings, tokenizer, end_piece_ids, train_dataset = setup(args, device)
    precision, dtype, ds_config, attn_implementation, attn_note = settings
    say(attn_note)
    if args.liger != "off":
        say("liger-kernel: fused RMSNorm, SwiGLU, rotary embedding"
            + (" and output-layer cross-entropy (--loss_chunk unused)" if args.liger == "all" else ""))
    say(f"precision: {precision}; ranks: {world_size}; device: {device.type}")

    # ---- data ----
    micro_batch, grad_accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    sampler = DistributedSampler(train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    steps_per_epoch = math.ceil(math.ceil(len(sampler) / micro_batch) / grad_accum)
    total_steps = steps_per_epoch * args.max_epoches
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    ds_config = distributed.with_lr_schedule(ds_config, args.lr_schedule, total_steps)

    # ---- model (and the checkpoint to resume from) ----
    run_dir = os.path.join(args.save_dir, args.save_name)
    fingerprint = checkpoints.resume_fingerprint(args, ds_config, world_size, train_dataset)
    model, resume_dir, resume_progress = prepare_model(args, tokenizer, settings, ds_config, end_piece_ids, run_dir,
                                                       fingerprint, device)
    engine = make_engine(model, ds_config, attn_implementation, dtype, args.loss_chunk, fused_loss=args.liger == "all")
    plan = {"micro_batch": micro_batch, "grad_accum": grad_accum, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "global_step": 0, "start_epoch": 0, "start_step_in_epoch": 0}
    resumed_rng = None
    if resume_dir:
        resumed_rng, position = checkpoints.resume(resume_dir, resume_progress, engine, rank, steps_per_epoch, device)
        plan.update(position)
    trainable = checkpoints.trainable_numel(model)
    say(f"trainable parameters: {trainable:,}; rows: {len(train_dataset)}; micro-batch {micro_batch} x "
        f"accumulation {grad_accum} x ranks {world_size} = {micro_batch * grad_accum * world_size} rows per step; "
        f"{total_steps} steps")

    # ---- the effective configuration and the logs ----
    record = {"args": vars(args), "deepspeed_config": ds_config, "precision": precision,
              "attention": attn_implementation, "world_size": world_size,
              "data_meta": getattr(train_dataset, "meta", None)}
    if is_rank0:
        if args.print_config:
            say("effective configuration:\n" + json.dumps(record, ensure_ascii=False, indent=1))
        data_io.atomic_write_json(os.path.join(run_dir, "training_config.json"), record)
        if resume_dir:
            checkpoints.truncate_log(os.path.join(run_dir, "train_log.jsonl"), plan["global_step"])
    runlog = checkpoints.RunLog(run_dir, is_rank0)

    def save(name, global_step, epoch, step_in_epoch):
        progress = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "steps_per_epoch": steps_per_epoch, "fingerprint": fingerprint}
        try:
            checkpoints.save_checkpoint(os.path.join(run_dir, name), engine, model, tokenizer,
                                        dict(record, step=global_step, epoch=epoch), progress, rank, device)
        except DataError as e:
            data_io.fail(str(e))

    # ---- train and save ----
    if resumed_rng is not None:
        checkpoints.set_rng_states(resumed_rng)   # after the model set-up, which drew from the same generators
    global_step = train(args, engine, train_dataset, sampler, plan, save, runlog, device, world_size, is_rank0)
    runlog.close()
    say(f"done: {global_step} steps; checkpoints in {run_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
