"""liger-kernel's fused Triton kernels for training (finetune.py --liger): RMSNorm, SwiGLU MLP and rotary
embedding swapped into a loaded LLaMA.  model_loader re-exports these names.
"""
from model_paths import LoaderError

LIGER_PACKAGE = "liger-kernel"
LIGER_CHOICES = ("off", "kernels", "all")


def check_liger(liger, device):
    """Raise LoaderError unless --liger ``liger`` can run here: liger-kernel installed (with triton) and a
    CUDA GPU.  'off' always passes."""
    if liger == "off":
        return
    if liger not in LIGER_CHOICES:
        raise LoaderError(f"--liger {liger}: unknown; choose {', '.join(LIGER_CHOICES)}")
    fix = (f"install the GPU extra (pip install -r requirements-gpu.txt, which pins {LIGER_PACKAGE}) on a CUDA "
           f"machine, or drop --liger")
    if device.type != "cuda":
        raise LoaderError(f"--liger needs a CUDA GPU: {LIGER_PACKAGE}'s kernels are Triton GPU code and this run "
                          f"is on the {device.type.upper()}; drop --liger here")
    try:
        import liger_kernel.transformers  # noqa: F401  (imports triton)
    except ImportError as e:
        raise LoaderError(f"--liger needs the {LIGER_PACKAGE} package (and triton), which cannot be imported "
                          f"({e}); {fix}")


def apply_liger(model, liger):
    """liger-kernel's fused RMSNorm, SwiGLU MLP and rotary embedding on a loaded LLaMA ``model`` (before LoRA
    wraps it), through liger's public ``apply_liger_kernel_to_llama``.  Its fused linear cross-entropy is
    not patched in here: finetune.forward_loss_sum calls it directly (--liger all).

    Note: liger swaps the rotary function and the RMSNorm/MLP classes of transformers' LLaMA module for the
    whole process, so every LLaMA built afterwards in the same process uses them too."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    if model.config.model_type != "llama":
        raise LoaderError(f"--liger: wired for LLaMA models only, this one is {model.config.model_type!r}; drop --liger")
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
