"""Plain single-process PyTorch reference of the paper's formula, independent of DeepSpeed and fishds' collector.

F[j] = sum_i (dL(x_i, y_i)/d theta_j)^2 over the N scoring examples, one example per backward pass;
mask = the k largest scores, ties broken by (parameter name, flat index).
"""
from __future__ import annotations

import torch

from fishds.config import Config
from fishds.model import load_peft_model, load_tokenizer
from fishds.run.data import Collator, load_examples


def initial_model(cfg: Config):
    return load_peft_model(cfg, cfg.model.name_or_path, torch.float32)


def reference_scores(cfg: Config) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(cfg.model.name_or_path)
    examples = load_examples(tok, cfg.data.path, "data.path", cfg.data, cfg.data.max_examples)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.fish.seed)).tolist()
    model = initial_model(cfg)
    model.eval()
    collate = Collator(tok.pad_token_id)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in order[:cfg.fish.num_samples]:
        model.zero_grad(set_to_none=True)
        model(**collate([examples[i]])).loss.backward()
        for n, p in params.items():
            scores[n] += p.grad.detach() ** 2
    return scores


def reference_mask(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names]).double()
    idx = torch.arange(flat.numel(), dtype=torch.float64)
    # sort by score descending, then global index ascending
    order = sorted(range(flat.numel()), key=lambda j: (-flat[j].item(), idx[j].item()))[:k]
    sel = torch.zeros(flat.numel(), dtype=torch.bool)
    sel[order] = True
    out, off = {}, 0
    for n in names:
        out[n] = sel[off:off + scores[n].numel()].view(scores[n].shape)
        off += scores[n].numel()
    return out
