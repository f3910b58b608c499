"""The training step: the loss of a micro-batch of packed rows, the module DeepSpeed wraps, one optimizer step.

finetune.py runs it; bench/bench_train.py times the same functions.
"""
import warnings

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import distributed
import packing


def _chunk_loss_sum(hidden, weight, bias, targets):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def attention_mask_for(attn_implementation, position_ids, dtype, attention_mask=None):
    """The mask that keeps the packed samples of a micro-batch apart, in the form the kernel takes.

    flash_attention_2: none (its variable-length kernels split samples at every position id 0);
    flex_attention: a FlexAttention BlockMask (packing.block_causal_block_mask; with ``attention_mask`` the
    padding is a document of its own), built once here and shared by every layer (transformers takes a
    prebuilt 4-D mask as it is); sdpa/eager: the dense additive mask (packing.block_causal_mask).  Every
    real token sees the same positions under all three.
    """
    if attn_implementation == "flash_attention_2":
        return None
    if attn_implementation == "flex_attention":
        return packing.block_causal_block_mask(position_ids, attention_mask)
    return packing.block_causal_mask(position_ids, dtype)


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
    learned = targets != packing.IGNORE_INDEX
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[learned]
    targets = targets[learned]
    head = causal_lm.get_output_embeddings()
    if fused_loss:
        loss_sum = _liger_loss_sum(hidden, head.weight, head.bias, targets)
    elif loss_chunk <= 0 or hidden.shape[0] <= loss_chunk:
        loss_sum = _chunk_loss_sum(hidden, head.weight, head.bias, targets)
    else:
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
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != packing.IGNORE_INDEX).sum()) for b in micro_batches),
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



def quiet_zero3_collectives():
    """ZeRO-3 gathers and scatters weights with collectives torch 2.13 calls deprecated: one warning per
    call, several per step on every rank, none of them the user's to act on."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)


def make_engine(model, ds_config, attn_implementation, dtype, loss_chunk, fused_loss=False):
    """DeepSpeed's engine around ``LossModule(model)``, training the parameters that require grad."""
    import deepspeed

    module = LossModule(model, attn_implementation, dtype, loss_chunk, fused_loss)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config)
    if distributed.is_partitioned(model.parameters()):
        quiet_zero3_collectives()
        # ZeRO-3: the loss uses the output layer's weight outside that layer's forward (forward_loss_sum),
        # so DeepSpeed is told to gather it for LossModule's forward and backward as well
        head = model.get_output_embeddings() if not hasattr(model, "get_base_model") \
            else model.get_base_model().get_output_embeddings()
        deepspeed.zero.register_external_parameter(module, head.weight)
    engine.train()
    return engine

