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


class _Forward:
    """What `evaluate` needs of a DeepSpeed engine (`.module`, a call), for a model outside any engine."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **batch):
        return self.module(**batch)


def evaluate_adapter(adapter_dir, data_path: str, max_examples: int | None = None) -> tuple[dict, int]:
    """Eval-only on a trained adapter (`fishds evaluate`): the run's saved config (fishds_config.yaml in the
    output_dir, also found from output_dir/checkpoints/step-N) gives the base model, the tokenizer, the data format
    and its formatting (chat template, fields, max_length), the precision and the 4-bit loading; `data_path` (a file,
    a datasets folder or a Hub dataset name) is tokenized as the run tokenized its eval data and scored by
    `evaluate`: the first `max_examples` rows (None = the run's data.max_eval_examples, as its evaluations; 0 = all).
    Returns (metrics with the `eval_` prefix, examples). One process, on the GPU when one is present.
    Cost at 7B: one copy of the base in the training precision (or 4-bit) on one device, no optimizer state."""
    import json
    from pathlib import Path

    from ..config import ConfigError
    from ..files import REPORT_FILE
    from ..merge import run_config
    from ..model import load_base, load_tokenizer, resolve_model_path
    from .data import Collator, load_examples

    adapter = Path(adapter_dir)
    cfg = run_config(adapter)
    if cfg is None:
        raise ConfigError(
            f"--adapter {adapter}: no fishds_config.yaml in it or two folders up (written by fishds train at start); "
            "evaluate needs the run's config for the data formatting"
        )
    report = next((p / REPORT_FILE for p in (adapter, adapter.parent.parent) if (p / REPORT_FILE).is_file()), None)
    labels = json.loads(report.read_text()).get("labels") if report is not None else None
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    path = data_path  # a file, folder, glob or Hub id: resolved by load_examples (fishds/run/splits.py)
    limit = cfg.data.max_eval_examples if max_examples is None else (max_examples or None)
    examples = load_examples(tokenizer, path, "--data", cfg.data, limit, labels)

    from .. import quant

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    base = load_base(cfg, model_path, dtype, labels, tokenizer.pad_token_id)
    if (adapter / "bottleneck_config.json").is_file():
        from ..bottleneck import load_bottleneck

        model = load_bottleneck(base, adapter)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False, autocast_adapter_dtype=False)
    if not quant.enabled(cfg):  # a 4-bit model is placed by bitsandbytes at load
        model.to(fdist.device())
    collate = Collator(tokenizer.pad_token_id, getattr(base.config, "_attn_implementation", None), dtype)
    return evaluate(_Forward(model), examples, collate, cfg.train.micro_batch_size), len(examples)
