"""Loading a CuteGPT model: the ONE place that decides tokenizer, dtype, quantization, attention
kernel, adapter and device.  inference.py, the API server, the web demo, evaluation and the
benchmarks all call it, so a model runs the same way everywhere.

    from model_loader import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("XuYipei/kw-cutegpt-13b-base",
                                                lora_path="Abbey4799/kw-cutegpt-13b-ift-lora", quant="int8")

- Paths are local directories or Hugging Face ids (model_paths.resolve_path).  An id is looked up in
  the local Hugging Face cache first, then fetched when the Hub can be reached; otherwise
  ``LoaderError`` says what to do.
- ``quant``: int8 / nf4 (bitsandbytes, weights placed by accelerate's device map), bf16 / fp16 / fp32.
  Default: int8 where a CUDA GPU is visible (what the published 13B models were run with: about
  13.5 GiB, one 24 GB card), fp32 on a machine without one (with a one-line notice).
- The tokenizer comes from the LoRA directory when it holds one (as the seed did), else from the
  model directory.
- A LoRA adapter is checked against the base model before any weight is read (adapter_check): every
  adapted module must exist with the shapes the adapter was trained for, and the tokenizer must fit
  the embedding table.  Adapters saved by old peft (``adapter_model.bin`` + an ``adapter_config.json`` with keys
  today's peft no longer knows) load as they are.

Every user mistake raises ``LoaderError`` (a ``data_io.DataError``) whose message names the flag and
the fix; front ends print it with ``data_io.fail``.
"""
import contextlib
import logging
import os
import warnings

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, CompileConfig,
                          TorchAoConfig)

import config
import data_io
import demo_model
import sp_convert
from adapter_check import ADAPTER_CONFIG, check_adapter_fits, is_adapter_dir, read_adapter_config
from model_paths import TOKENIZER_FILES, LoaderError, has_tokenizer, resolve_path  # noqa: F401  (re-exported)

QUANT_CHOICES = ("int8", "nf4", "bf16", "fp16", "fp32")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def load_tokenizer(path, flag="--tokenizer"):
    """The tokenizer of a local directory or Hugging Face id.

    A directory holding tokenizer.model (LLaMA, CuteGPT: with or without tokenizer.json, extended by
    extend_vocab.py, with '<end>' added by full fine-tuning) gives a fast tokenizer built from the
    SentencePiece model itself, checked to encode exactly as SentencePiece and to decode back to the text
    (sp_convert.load_llama_tokenizer; transformers' own conversion differs on leading spaces and on
    appended pieces).  Other directories load through AutoTokenizer.  Either way text is encoded as text:
    '<s>', '</s>', '<end>' written in it are characters (split_special_tokens)."""
    directory = resolve_path(path, flag)
    if not has_tokenizer(directory):
        raise LoaderError(f"{flag} {path}: holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        try:
            return sp_convert.load_llama_tokenizer(directory)
        except sp_convert.NotConvertible as e:
            raise LoaderError(f"{flag} {path}: its tokenizer.model cannot be loaded with SentencePiece's ids ({e}); "
                              f"give a directory whose tokenizer.model is a SentencePiece BPE model and whose "
                              f"added tokens follow its pieces")
    try:
        return AutoTokenizer.from_pretrained(directory, split_special_tokens=True)
    except Exception as e:
        raise LoaderError(f"{flag} {path}: the tokenizer cannot be loaded ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------------------------
# quantization, dtype, device
# ----------------------------------------------------------------------------------------------
def cuda_available():
    return torch.cuda.is_available()


def bitsandbytes_available():
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


def default_quant():
    """int8 where a CUDA GPU is visible, else fp32 (bitsandbytes on a CPU works but crawls)."""
    return "int8" if cuda_available() else "fp32"


def resolve_device(device):
    """A torch.device string for ``device`` (None: 'cuda' when visible, else 'cpu')."""
    if device is None:
        return "cuda" if cuda_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise LoaderError(f"--device {device}: not a device; use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not cuda_available():
            raise LoaderError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LoaderError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    return str(parsed)


def compute_dtype(device):
    """Half precision for quantized layers: bf16 where the GPU has it, else fp16."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if device.startswith("cuda") else torch.float32


def torchao_available():
    try:
        import torchao  # noqa: F401
        return True
    except Exception:
        return False


@contextlib.contextmanager
def quiet_torchao_import(unless=False):
    """Within the block, torchao's import-time log lines (C extensions its wheel cannot load here, torch
    deprecation warnings about its enums) stay below the warning level, unless ``unless`` (the load uses
    torchao: then they matter).  transformers imports torchao whenever it is installed, with the first
    model class it builds, whatever the quantization."""
    loggers = [] if unless else [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def fast_int8_config():
    """The torchao quantization --fast --quant int8 loads with: int8 weight-only, one scale per output
    channel (what TorchAoConfig applies to each linear layer as its weight is loaded)."""
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def model_load_kwargs(quant, device, device_given, attn_implementation=None, fast=False):
    """Keyword arguments of ``from_pretrained`` for a quantization mode and device (``fast``: the
    --fast path, which loads int8 with torchao instead of bitsandbytes)."""
    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    on_cuda = device.startswith("cuda")
    # accelerate's device map: spread over the visible GPUs ("auto", as the seed did) unless the
    # user named one device
    device_map = {"": device} if (device_given or not on_cuda) else "auto"
    if fast and quant == "nf4":
        raise LoaderError("--fast has no nf4 path (bitsandbytes 4-bit is not compiled): use --fast with "
                          "--quant int8 or bf16, or drop --fast")
    if fast and quant == "int8":
        if not torchao_available():
            raise LoaderError("--fast --quant int8 needs torchao (int8 weight-only kernels), which is not installed: "
                              "`pip install torchao`, or drop --fast for bitsandbytes int8")
        kwargs["quantization_config"] = TorchAoConfig(fast_int8_config())
        kwargs["dtype"] = compute_dtype(device)
        kwargs["device_map"] = device_map
    elif quant in ("int8", "nf4"):
        if not bitsandbytes_available():
            raise LoaderError(f"--quant {quant} needs bitsandbytes, which is not installed: "
                              f"`pip install bitsandbytes`, or use --quant bf16/fp16 (GPU) or fp32 (CPU)")
        if quant == "int8":
            # the seed: load_in_8bit with fp16 for the layers bitsandbytes keeps in floating point
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["dtype"] = torch.float16 if on_cuda else torch.float32
        else:
            half = compute_dtype(device)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half)
            kwargs["dtype"] = half
        kwargs["device_map"] = device_map
    elif quant in FLOAT_DTYPES:
        kwargs["dtype"] = FLOAT_DTYPES[quant]
        if on_cuda:
            kwargs["device_map"] = device_map
    else:
        raise LoaderError(f"--quant {quant}: unknown; choose one of {', '.join(QUANT_CHOICES)}")
    return kwargs


def input_device(model):
    """Where input ids must go: the device of the embedding table (first shard of a device map)."""
    return model.get_input_embeddings().weight.device


# ----------------------------------------------------------------------------------------------
# tokenizer and adapter against the base model
# ----------------------------------------------------------------------------------------------
def check_vocab_fits(tokenizer, model_config, tokenizer_source, model_flag="--model_path"):
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise LoaderError(f"the tokenizer of {tokenizer_source} has {len(tokenizer)} tokens, but the model has "
                          f"only {vocab} embeddings: tokenizer and model do not belong together (a CuteGPT "
                          f"adapter needs the CuteGPT base with its Chinese vocabulary); check {model_flag}")


def _checked_adapter(lora_path, model_config):
    """The directory of the LoRA adapter ``lora_path``, checked against the base model's config (the
    model is built on the meta device: nothing is loaded yet)."""
    adapter_dir = resolve_path(lora_path, "--lora_path")
    if not is_adapter_dir(adapter_dir):
        hint = (" (it is a full model: give it with --model_path and --lora_path none)"
                if os.path.isfile(os.path.join(adapter_dir, "config.json")) else "")
        raise LoaderError(f"--lora_path {lora_path}: holds no {ADAPTER_CONFIG}, so it is not a LoRA adapter{hint}")
    adapter_cfg = read_adapter_config(adapter_dir)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(model_config)
    check_adapter_fits(meta_model, adapter_dir, adapter_cfg)
    return adapter_dir


def _apply_adapter(model, adapter_dir, flag="--lora_path"):
    from peft import PeftModel

    with warnings.catch_warnings():
        # adapters saved by old peft carry keys (enable_lora, merge_weights, ...) that today's peft
        # ignores with a warning: they change nothing for inference
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
        try:
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        except Exception as e:
            raise LoaderError(f"{flag} {adapter_dir}: the adapter cannot be applied ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------------------------
# the whole load
# ----------------------------------------------------------------------------------------------
def load_model_and_tokenizer(model_path, lora_path=None, quant=None, device=None, attn_implementation=None,
                             notice=data_io.note, fast=False):
    """(model, tokenizer) ready for generation (eval mode).

    model_path: base or full model (local dir or Hugging Face id).
    lora_path: a LoRA adapter dir or id to apply on top, or None.
    quant: one of QUANT_CHOICES; None means default_quant().
    device: 'cpu', 'cuda', 'cuda:N' or None (a GPU when visible; int8/nf4/bf16/fp16 on CUDA spread
            over the visible GPUs by accelerate's device map unless a device is named).
    attn_implementation: e.g. 'sdpa', 'eager', 'flash_attention_2'; None: transformers' default.
    notice: called with one-line notes for the user (default: print to stderr).
    fast: the --fast path (config.FAST): static KV cache, compiled decoding step on a GPU, and for
          int8 torchao's weight-only kernels instead of bitsandbytes (see enable_fast_path).
    """
    device_given = device is not None
    device = resolve_device(device)
    if quant is None:
        quant = default_quant()
        if not device.startswith("cuda"):
            notice("no CUDA GPU visible: loading in fp32 on the CPU (a 13B model needs about 53 GB of "
                   "memory here; --quant int8 needs a GPU to be practical)")
    if quant not in QUANT_CHOICES:
        raise LoaderError(f"--quant {quant}: unknown; choose one of {', '.join(QUANT_CHOICES)}")
    load_kwargs = model_load_kwargs(quant, device, device_given, attn_implementation, fast)

    model_dir = resolve_path(model_path, "--model_path")
    if is_adapter_dir(model_dir) and not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise LoaderError(f"--model_path {model_path}: is a LoRA adapter, not a model; give it with "
                          f"--lora_path and its base model with --model_path")
    try:
        model_config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise LoaderError(f"--model_path {model_path}: no usable config.json ({type(e).__name__}: {e})")

    # the first model class transformers builds imports torchao (its quantizer registry) when installed
    with quiet_torchao_import(unless=fast and quant == "int8"):
        adapter_dir = _checked_adapter(lora_path, model_config) if lora_path else None
        tokenizer_dir, tokenizer_flag = ((adapter_dir, "--lora_path") if adapter_dir and has_tokenizer(adapter_dir)
                                         else (model_dir, "--model_path"))
        tokenizer = load_tokenizer(tokenizer_dir, tokenizer_flag)
        check_vocab_fits(tokenizer, model_config, tokenizer_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs)
        except (ImportError, ValueError) as e:
            raise LoaderError(f"--model_path {model_path} with --quant {quant} on {device}: cannot be loaded "
                              f"({type(e).__name__}: {e})")
        except (OSError, RuntimeError) as e:
            raise LoaderError(f"--model_path {model_path}: the weights cannot be loaded ({type(e).__name__}: {e})")
    # the directory's stop_strings are for engines (model_files); chat.py stops at the end marker itself,
    # and generate() refuses stop strings unless it is handed the tokenizer
    model.generation_config.stop_strings = None
    if "device_map" not in load_kwargs:
        model.to(device)
    if adapter_dir:
        model = _apply_adapter(model, adapter_dir)
    model.eval()
    if fast:
        enable_fast_path(model)
    return model, tokenizer


def enable_fast_path(model):
    """Switch ``model`` to the --fast generation path (config.FAST), through transformers' own
    generation_config switches: a static KV cache of FAST["max_cache_len"] positions (never more than
    the model's context), which makes generate() compile the decoding step on a CUDA GPU with
    FAST["compile"] (transformers' CompileConfig).  Every later ``generate`` call uses it."""
    generation_config = model.generation_config
    context = getattr(model.config, "max_position_embeddings", None) or config.FAST["max_cache_len"]
    generation_config.cache_implementation = "static"
    generation_config.max_cache_len = min(config.FAST["max_cache_len"], int(context))
    if model.device.type == "cuda":   # transformers compiles on a GPU only (a CPU would warn and skip it)
        generation_config.compile_config = CompileConfig(**config.FAST["compile"])
    return model


def fast_path_active(model):
    """True when ``model`` generates with the --fast path's static cache."""
    return getattr(model.generation_config, "cache_implementation", None) == "static"


# ----------------------------------------------------------------------------------------------
# the model flags every front end shares (inference.py, api_server.py, web_demo.py, evaluation)
# ----------------------------------------------------------------------------------------------
NONE_WORDS = ("none", "None", "")


def add_model_arguments(parser, demo=True):
    """--model_path --lora_path --quant --device --attn_implementation --fast (and --demo --demo_dir)."""
    parser.add_argument("--model_path", default=None,
                        help=f"base or full model: local directory or Hugging Face id (default: {config.BASE_MODEL}, "
                             f"or {config.FULL_FT_MODEL} with --lora_path none)")
    parser.add_argument("--lora_path", default=None,
                        help=f"LoRA adapter to apply, or 'none' (default: {config.LORA_MODEL} when --model_path is "
                             f"not given, else none)")
    parser.add_argument("--quant", choices=list(QUANT_CHOICES), default=None,
                        help="weights: int8/nf4 (bitsandbytes) or a float type (default: int8 on a CUDA GPU, "
                             "fp32 without one)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: the GPUs when visible, spread by accelerate; else cpu)")
    parser.add_argument("--attn_implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention kernel (default: transformers' choice, sdpa)")
    parser.add_argument("--fast", action="store_true",
                        help="fast generation (config.FAST): static KV cache, and on a CUDA GPU the decoding step "
                             "compiled by torch.compile (CUDA graphs; compiling takes a while on the first answer); "
                             "with --quant int8 the weights are int8 by torchao's weight-only kernels instead of "
                             "bitsandbytes (needs torchao). Not with --quant nf4")
    if demo:
        parser.add_argument("--demo", action="store_true",
                            help="offline toy model trained on data/test/ift_data.pkl (built and cached the first "
                                 "time by code/demo_model.py)")
        parser.add_argument("--demo_dir", default=None,
                            help=f"where --demo caches its model (default: {config.DEMO['cache_dir']} in the repo)")


def check_model_arguments(parser, args):
    """Conflicts among the model flags end in parser.error (exit 2, one line naming the fix)."""
    if getattr(args, "fast", False) and args.quant == "nf4":
        parser.error("--fast has no nf4 path (bitsandbytes 4-bit is not compiled): use --quant int8 or bf16 "
                     "with --fast, or drop --fast")
    if not getattr(args, "demo", False):
        if getattr(args, "demo_dir", None) is not None:
            parser.error("--demo_dir only applies with --demo")
        return
    given = [flag for flag, value in (("--model_path", args.model_path), ("--lora_path", args.lora_path),
                                      ("--quant", args.quant)) if value is not None]
    if given:
        parser.error(f"--demo loads its own toy model: drop {', '.join(given)} (or drop --demo)")


def model_choice(args):
    """(model_path, lora_path) from the flags: the seed's base + LoRA by default."""
    lora = args.lora_path
    if lora is not None and lora in NONE_WORDS:
        return (args.model_path or config.FULL_FT_MODEL), None
    if args.model_path is None:
        return config.BASE_MODEL, (lora or config.LORA_MODEL)
    return args.model_path, lora


def load_spec(args):
    """load_model_and_tokenizer's arguments for parsed model flags; --demo builds the toy model first
    when needed."""
    if getattr(args, "demo", False):
        model_path, lora_path = demo_model.ensure_demo_model(args.demo_dir), None
        quant, device = "fp32", args.device or "cpu"
    else:
        model_path, lora_path = model_choice(args)
        quant, device = args.quant, args.device
    return dict(model_path=model_path, lora_path=lora_path, quant=quant, device=device,
                attn_implementation=args.attn_implementation, fast=getattr(args, "fast", False))


def load_from_args(args, notice=data_io.note):
    """(model, tokenizer) for parsed model flags; --demo builds the toy model first when needed."""
    return load_model_and_tokenizer(**load_spec(args), notice=notice)


# ----------------------------------------------------------------------------------------------
# training: precision and attention kernel (finetune.py and the benchmarks ask here)
# ----------------------------------------------------------------------------------------------
def training_precision(requested, device):
    """auto: bf16 where the GPU supports it, else fp32; an explicit choice stands."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def flex_attention_available():
    """True when this torch and transformers can run FlexAttention (torch.nn.attention.flex_attention)."""
    try:
        from transformers.utils import is_torch_flex_attn_available

        return bool(is_torch_flex_attn_available())
    except ImportError:
        return False


def training_attention(attention, device):
    """The attention kernel of a training run: ``(attn_implementation, note)``; the note says which one runs.

    ``attention``: sdpa, flex or flash (finetune.py --attention; ``True``/``False`` are the old
    --use_flash_attention switch).  flash falls back to SDPA where flash-attn or a GPU is missing, and says
    so.  flex raises LoaderError on a CPU (FlexAttention has no backward pass there) or where this torch
    lacks it, naming the fix.
    """
    if isinstance(attention, bool):
        attention = "flash" if attention else "sdpa"
    if attention == "flash":
        try:
            import flash_attn  # noqa: F401
            if device.type == "cuda":
                return "flash_attention_2", "attention: flash_attention_2 (flash_attn package)"
            reason = "flash-attention needs a CUDA GPU"
        except ImportError:
            reason = "the flash_attn package is not installed"
        return "sdpa", f"attention: PyTorch SDPA ({reason}; README's 'Install on a GPU' names the flash-attn extra)"
    if attention == "flex":
        if not flex_attention_available():
            raise LoaderError(f"--attention flex: torch {torch.__version__} has no FlexAttention "
                              f"(torch.nn.attention.flex_attention); install torch 2.6 or newer, or use --attention sdpa")
        if device.type != "cuda":
            raise LoaderError(f"--attention flex trains on a CUDA GPU only: FlexAttention has no backward pass on "
                              f"a {device.type.upper()} (torch {torch.__version__}); use --attention sdpa here "
                              f"(the same block-diagonal mask as a dense tensor)")
        return "flex_attention", ("attention: PyTorch FlexAttention (block-diagonal causal BlockMask, built once per "
                                  "micro-batch; compiled on the first step)")
    if attention != "sdpa":
        raise LoaderError(f"--attention {attention}: unknown; choose sdpa, flex or flash")
    return "sdpa", "attention: PyTorch SDPA (block-diagonal causal mask)"
