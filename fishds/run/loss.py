"""The training loss of one optimizer step: a mean over every target of the step, across accumulation and ranks.

Causal LM (alpaca, chat, text): the step's loss is the sum of the token cross-entropies of all its target tokens
(labels != -100 after the causal shift, as transformers shifts them) divided by the number of those tokens in the
whole step: every micro-batch of the gradient accumulation on every rank. So a long answer weighs by its tokens,
whatever micro-batch it lands in, and micro-batch 1 x accumulation 4 gives the same gradient as 4 x 1 (the
gradient-accumulation fix transformers made in 2024). Classification: each example's loss weighs the same (the
model's per-example mean, summed, divided by the step's examples).

DeepSpeed divides the loss by gradient_accumulation_steps in engine.backward (here scale_wrt_gas=False, so it does
not) and averages gradients over the data-parallel ranks (divides by the world size): train_step multiplies the
loss sum / step targets by the world size, so the reduced gradient is exactly d(sum of target losses) / d theta
divided by the step's targets.
"""

from __future__ import annotations

import torch

from .. import dist as fdist


def count_targets(batch: dict) -> int:
    """Targets of one collated micro-batch: shifted label tokens != -100, or examples (one class label each)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return int(labels.numel())
    return int((labels[:, 1:] != -100).sum())


def step_targets(batches: list[dict]) -> int:
    """Targets of the whole optimizer step: this rank's micro-batches, summed over ranks (one all-reduce)."""
    n = torch.tensor([sum(count_targets(b) for b in batches)], dtype=torch.float64)
    fdist.all_reduce_(n)
    return int(n.item())


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the losses of the micro-batch's targets (fp32): token cross-entropies, or per-example losses."""
    labels = batch["labels"]
    if labels.dim() == 1:  # classification: the model's own per-example mean (problem_type), times the examples
        return model(**batch).loss.float() * labels.numel()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # no KV cache in training; with one, transformers ignores the restarts of packed position_ids (sdpa, eager)
    logits = model(**inputs, use_cache=False).logits.float()  # a no-op in fp32
    # shift the labels, not the logits (as transformers' ForCausalLMLoss does): slicing the logits would copy the
    # whole (batch x length x vocab) tensor, and its gradient, every micro-batch
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
