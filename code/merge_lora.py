"""Merge a LoRA adapter into its base model: one standard model directory, no peft needed to load it.

    # the published base + LoRA -> a full model in fp16 (about 26 GB on disk, 6 shards)
    python code/merge_lora.py --model_path XuYipei/kw-cutegpt-13b-base \
        --lora_path Abbey4799/kw-cutegpt-13b-ift-lora --out models/cutegpt-13b-merged --dtype fp16

    # your own adapter checkpoint, then chat with the merged model
    python code/merge_lora.py --model_path MODEL_DIR --lora_path ckp/llama_lora/llama_lora_epoch3 --out merged
    python inference.py --model_path merged --lora_path none

The base and adapter are loaded through model_loader (the adapter is checked against the base first),
merged with peft's merge_and_unload (W + B·A·alpha/r in every adapted layer) and saved with
save_pretrained: safetensors, sharded above --max_shard_size, plus the tokenizer (the adapter's
when its directory holds one, else the base's, as inference does) with its tokenizer.model, the chat
template and a generation config that stops at the end marker (model_files: what serving engines read).  The result loads with plain
AutoModelForCausalLM.from_pretrained.  --out is written under a temporary name and renamed into place;
an existing non-empty --out is refused unless --overwrite.  Merging happens on the CPU by default
(fp32: 4 bytes per parameter of memory, about 53 GB for 13B; --dtype bf16/fp16 halves it).
"""
import argparse
import os
import time

import config
import data_io
import model_files
import model_loader
from data_io import DataError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="base model: local directory or Hugging Face id")
    parser.add_argument("--lora_path", required=True, help="LoRA adapter: local directory or Hugging Face id")
    parser.add_argument("--out", required=True, help="directory to write the merged model into")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="precision of the merge and of the saved weights (default: %(default)s, exact)")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--max_shard_size", default=config.MERGE_MAX_SHARD_SIZE,
                        help="largest safetensors file, e.g. 5GB or 500MB (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return parser.parse_args(argv)


def merge(args):
    started = time.time()
    if os.path.exists(args.out):
        if not os.path.isdir(args.out):
            raise DataError(f"--out {args.out}: exists and is not a directory; pick another --out")
        if os.listdir(args.out) and not args.overwrite:
            raise DataError(f"--out {args.out}: exists and is not empty; pick another --out or add --overwrite")
    data_io.check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "parent folder of --out")
    model, tokenizer = model_loader.load_model_and_tokenizer(args.model_path, lora_path=args.lora_path,
                                                             quant=args.dtype, device=args.device)
    model = model.merge_and_unload()
    parameters = sum(p.numel() for p in model.parameters())
    with data_io.atomic_directory(args.out) as tmp:
        try:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=args.max_shard_size)
        except ValueError as e:
            raise DataError(f"--max_shard_size {args.max_shard_size}: not usable ({e}); write e.g. 5GB or 500MB")
        # + tokenizer.model (the adapter's tokenizer's, else the base's), chat template, generation config
        model_files.save_tokenizer(tmp, tokenizer, [model_loader.resolve_path(args.model_path, "--model_path")])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # the temporary directory is created 0700
    files = sorted(name for name in os.listdir(args.out) if name.endswith(".safetensors"))
    return parameters, files, time.time() - started


def main(argv=None):
    args = parse_args(argv)
    try:
        parameters, files, seconds = merge(args)
    except DataError as e:
        data_io.fail(str(e))
    print(f"merged {args.lora_path} into {args.model_path}: {parameters:,} parameters in {args.dtype}, "
          f"{len(files)} safetensors file(s)")
    print(f"wrote {args.out} in {seconds:.1f}s; run it with: python inference.py --model_path {args.out} --lora_path none")


if __name__ == "__main__":
    main()
