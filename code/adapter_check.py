"""Checks of a LoRA adapter directory before any weight is read: it is a LoRA adapter, its weights can
be read (safetensors, or an old peft's adapter_model.bin), and every adapted module exists in the base
model with the shapes the adapter was trained for.  model_loader runs them before it applies an adapter.
"""
import json
import os

import torch
from safetensors import safe_open

from model_paths import LoaderError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter_dir(directory):
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def read_adapter_config(directory, flag="--lora_path"):
    path = os.path.join(directory, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise LoaderError(f"{flag}: {path} cannot be read ({e})")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise LoaderError(f"{flag}: {path} describes a {cfg.get('peft_type')!r} adapter; only LoRA adapters load")
    return cfg


def adapter_weight_shapes(directory, flag="--lora_path"):
    """{key: shape} of the adapter's saved tensors (safetensors, or an old peft's adapter_model.bin)."""
    for name in ADAPTER_WEIGHTS:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the pre-zip torch format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            return {k: tuple(v.shape) for k, v in state.items()}
        except Exception as e:
            raise LoaderError(f"{flag}: {path} cannot be read ({type(e).__name__}: {e})")
    raise LoaderError(f"{flag} {directory}: holds {ADAPTER_CONFIG} but no adapter weights "
                      f"({' or '.join(ADAPTER_WEIGHTS)})")


def _module_key(key):
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> (module path, part)."""
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0], part
    return key, None


def check_adapter_fits(meta_model, adapter_dir, adapter_cfg, flag="--lora_path", model_flag="--model_path"):
    """Raise LoaderError unless every tensor of the adapter fits ``meta_model`` (built on the meta
    device from the base model's config, so nothing is loaded yet)."""
    base = adapter_cfg.get("base_model_name_or_path") or "the base model it was trained on"
    fix = f"load it on {base} (give that with {model_flag})"
    modules = dict(meta_model.named_modules())
    params = dict(meta_model.named_parameters())
    shapes = adapter_weight_shapes(adapter_dir, flag)
    for key, shape in sorted(shapes.items()):
        name, part = _module_key(key)
        if part is None:  # a fully saved weight (modules_to_save), e.g. an embedding table
            param_name = name.replace(".modules_to_save", "").replace(".original_module", "")
            if param_name in params and tuple(params[param_name].shape) != shape:
                raise LoaderError(f"{flag} {adapter_dir}: the adapter holds {param_name} of shape {list(shape)}, "
                                  f"the base model's is {list(params[param_name].shape)}: the adapter was made "
                                  f"for another base model; {fix}")
            continue
        module = modules.get(name)
        if module is None:
            raise LoaderError(f"{flag} {adapter_dir}: the adapter changes module {name}, which the base model "
                              f"does not have: the adapter was made for another base model; {fix}")
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        out_features, in_features = weight.shape
        if part in ("lora_embedding_A", "lora_embedding_B"):
            out_features, in_features = in_features, out_features
        # lora_A: (r, in_features), lora_B: (out_features, r)
        ok = shape[1] == in_features if part.endswith("A") else shape[0] == out_features
        if len(shape) != 2 or not ok:
            raise LoaderError(f"{flag} {adapter_dir}: {key} has shape {list(shape)}, which does not fit "
                              f"{name} ({in_features} -> {out_features} in the base model, hidden size "
                              f"{getattr(meta_model.config, 'hidden_size', '?')}): the adapter was made for "
                              f"another base model; {fix}")

