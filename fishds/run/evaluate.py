"""Evaluation on held-out data, summed over ranks (every rank runs the same number of forward passes).

Classification: loss and accuracy per example. Causal LM (alpaca, chat, text): loss, perplexity and
accuracy per label token (the response tokens for alpaca and chat), through the training loss path
(train.loss_impl: chunked by default, so no pass holds the micro-batch's full-vocabulary logits).
"""

from __future__ import annotations

import math

import torch

from .. import dist as fdist
from .loss import eval_sums


@torch.no_grad()
def evaluate(engine, examples: list[dict], collate, micro_batch_size: int, prefix: str = "eval") -> dict:
    """Loss and accuracy summed over ranks: per example (classification) or per label token (with perplexity)."""
    if not examples:
        return {}
    model = engine.module
    was_training = model.training
    model.eval()
    dev = fdist.device()
    mine = examples[fdist.rank() :: fdist.world_size()]
    n_batches = math.ceil(math.ceil(len(examples) / fdist.world_size()) / micro_batch_size)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens (or examples), correct
    classify = not isinstance(examples[0]["labels"], list)
    for b in range(n_batches):
        chunk = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        batch = {k: v.to(dev) for k, v in collate(chunk or examples[:1]).items()}
        if not classify:  # the loss path's chunks (fishds/run/loss.py): no full-vocabulary logits held
            sums = eval_sums(engine, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
            if chunk:  # a padding pass (no chunk) keeps ZeRO-3 collectives matched
                totals += torch.tensor(sums, dtype=torch.float64)
            continue
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if not chunk:
            continue  # padding pass keeps ZeRO-3 collectives matched
        labels = batch["labels"]
        valid = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
        correct = float((logits.argmax(-1)[valid] == labels[valid]).sum())
        totals += torch.tensor([float(loss), float(valid.sum()), correct], dtype=torch.float64)
    fdist.all_reduce_(totals)
    model.train(was_training)
    loss, acc = float(totals[0] / totals[1]), float(totals[2] / totals[1])
    if classify:
        return {f"{prefix}_loss": loss, f"{prefix}_accuracy": acc, f"{prefix}_examples": int(totals[1])}
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_ppl": math.exp(min(loss, 50.0)),
        f"{prefix}_token_acc": acc,
        f"{prefix}_tokens": int(totals[1]),
    }
