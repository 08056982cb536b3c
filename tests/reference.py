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
    for i in order[: cfg.fish.num_samples]:
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
        out[n] = sel[off : off + scores[n].numel()].view(scores[n].shape)
        off += scores[n].numel()
    return out


def model_with_state(cfg: Config, state: dict[str, torch.Tensor]):
    """The initial PEFT model with its adapter tensors replaced by `state` (parameter names)."""
    model = initial_model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    return model


def _examples(cfg: Config):
    tok = load_tokenizer(cfg.model.name_or_path)
    return load_examples(tok, cfg.data.path, "data.path", cfg.data, cfg.data.max_examples), Collator(tok.pad_token_id)


def reference_moments(cfg: Config, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """sum_i g_i^2 and sum_i g_i over the scoring examples, one example per backward, at adapter `state`."""
    examples, collate = _examples(cfg)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.fish.seed)).tolist()
    model = model_with_state(cfg, state)
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    sm = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in order[: cfg.fish.num_samples]:
        model.zero_grad(set_to_none=True)
        model(**collate([examples[i]])).loss.backward()
        for n, p in params.items():
            sq[n] += p.grad.double() ** 2
            sm[n] += p.grad.double()
    return sq, sm


def reference_warmup(cfg: Config, state: dict[str, torch.Tensor], world: int, steps: int) -> tuple[dict, dict]:
    """Plain torch AdamW from `state` for `steps` steps on the batches `world` data-parallel ranks would see (the
    step's loss: the sum of every target token's cross-entropy over the ranks' batches, divided by their target
    count; fishds' LR schedule, no clipping): the adapter and AdamW's exp_avg_sq after them."""
    from fishds.run import schedule
    from fishds.run.data import ShardedBatches

    examples, collate = _examples(cfg)
    model = model_with_state(cfg, state)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = schedule.scheduler(cfg, cfg.train.max_steps)(opt)
    batches = [ShardedBatches(examples, cfg.train.micro_batch_size, r, world, cfg.train.seed) for r in range(world)]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        step = [collate(b.next()) for b in batches]
        sums, targets = [], 0
        for batch in step:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            sums.append(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                )
            )
            targets += int((labels != -100).sum())
        (sum(sums) / targets).backward()
        opt.step()
        sched.step()
    return (
        {n: p.detach().clone() for n, p in params.items()},
        {n: opt.state[p]["exp_avg_sq"].clone() for n, p in params.items()},
    )
