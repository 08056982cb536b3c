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

How the token cross-entropies are computed (train.loss_impl; fishds/config.py documents the choice):
- full: the model's logits (micro-batch x length x vocab) upcast to fp32 and one cross_entropy. Holds about three
  fp32 copies of the logits (the upcast, the log-softmax kept for backward, its gradient): 12 bytes x vocab per
  token, 25 GB at Llama-3-8B's micro-batch of 4 x 4,096 tokens and its 128,256-token vocabulary.
- chunked (the default): one forward of the model asking for the last position's logits only (logits_to_keep=1,
  so the model's own projection costs micro-batch x vocab) and its final hidden states; the hidden states of the
  target tokens (labels != -100: prompt and padding tokens get no logits at all) are projected through the model's
  output embedding one chunk of train.loss_chunk_tokens tokens at a time. At most one chunk's logits exist at once:
  about 16 bytes x vocab x chunk tokens (the projection, its fp32 upcast, the softmax gradient), 0.5 GB at 256
  tokens of a 128k vocabulary, whatever the micro-batch. Two ways, the same values:
  * a frozen plain lm_head (the usual case, tied embeddings and QLoRA included): each chunk's input gradient is
    computed in its forward (softmax - one-hot, times the weight; the pure-PyTorch form of liger's fused linear
    cross-entropy) and only that (tokens x hidden) is kept, so the step costs the full loss's two matmuls per
    token and no recompute; under ZeRO-3 the weight is gathered once per micro-batch (GatheredParameters) for it;
  * an adapted lm_head (a LoRA target, or in peft.modules_to_save): the output-embedding module itself
    (get_output_embeddings()) is called per chunk under torch.utils.checkpoint, so its logits are freed after
    the chunk's loss and recomputed in backward (as torchtune does), and the adapter's gradients flow as usual;
    under ZeRO-3 its forward hooks gather the partitioned weight for each call (also in the recompute), and every
    rank makes as many calls (the most chunks of any rank, one small all-reduce per micro-batch). The cost: the
    output projection runs once more per step.
  A Gemma-style final_logit_softcapping is applied; on the first call the chunked logits of the last position are
  checked against the model's own, so a model whose logits are more than its output embedding refuses chunked
  (ConfigError, naming train.loss_impl).
- liger / cce: the same hidden states of the target tokens through liger-kernel's fused linear cross-entropy
  (LigerFusedLinearCrossEntropyLoss) or Apple's cut-cross-entropy (linear_cross_entropy): fused kernels that never
  hold a chunk of fp32 logits in memory (CUDA only). They take the output embedding's weight tensor, so they need
  a plain, frozen lm_head (no LoRA on it, not in modules_to_save); under ZeRO-3 liger's weight is gathered for its
  forward (it computes the input gradient there), cce is refused (it reads the weight again in backward).
The per-example Fisher pass (fishds/fish/per_example.py, fish/fisher.py) takes its per-example losses from the same
forward and chunks (`example_losses`); with liger / cce it uses the chunked path (the fused kernels sum).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dist as fdist
from .. import zero
from ..schema import ConfigError

CHUNK_LOGIT_BYTES = 1 << 27  # train.loss_chunk_tokens unset: a chunk's fp32 logits within 128 MiB
IMPLS = ("auto", "chunked", "full", "liger", "cce")
PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
CHECK_RTOL = 1e-2  # first call: chunked logits of the last position against the model's (bf16 rounding)


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


@dataclass
class LossPath:
    """The resolved train.loss_impl of a model (`configure` attaches it; an unconfigured model uses chunked)."""

    impl: str = "chunked"  # chunked | full | liger | cce
    chunk_tokens: int | None = None  # None: CHUNK_LOGIT_BYTES / (4 x vocab)
    checked: bool = False  # the first-call check of the chunked logits has run

    def chunk(self, vocab: int) -> int:
        return self.chunk_tokens or max(8, CHUNK_LOGIT_BYTES // (4 * vocab) // 8 * 8)


def check_loss_impl(impl: str, zero_stage: int = 0) -> None:
    """Refuse a fused implementation that cannot run here (not installed, no CUDA, cce at ZeRO-3): one line naming
    train.loss_impl, before any weights load."""
    if impl not in PACKAGES:
        return
    module, pip = PACKAGES[impl]
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.loss_impl={impl} runs {pip}'s CUDA kernels and there is no CUDA device here; use "
            "train.loss_impl=chunked (or auto)"
        )
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"train.loss_impl={impl} needs {pip}, which is not installed: pip install {pip}, or use "
            "train.loss_impl=chunked (or auto)"
        )
    if impl == "cce" and zero_stage == 3:
        raise ConfigError(
            "train.loss_impl=cce reads the output embedding's weight again in backward, which ZeRO-3 has released "
            "by then; use train.loss_impl=liger or chunked at ZeRO-3"
        )


def _base(model):
    """The transformers model under a DeepSpeed engine and a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(model) -> bool:
    """The output embedding is a frozen nn.Linear (no LoRA on it, not in modules_to_save): what liger / cce take."""
    head = _base(model).get_output_embeddings()
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def configure(model, impl: str, chunk_tokens: int | None, zero_stage: int) -> LossPath:
    """Resolve train.loss_impl for `model` (auto: liger where it runs, else chunked) and attach it; returns it."""
    import inspect

    takes_keep = "logits_to_keep" in inspect.signature(_base(model).forward).parameters
    if impl == "auto":
        impl = "chunked" if takes_keep else "full"
        if (
            takes_keep
            and torch.cuda.is_available()
            and importlib.util.find_spec("liger_kernel") is not None
            and _plain_head(model)
        ):
            impl = "liger"
    if impl != "full" and not takes_keep:
        raise ConfigError(
            f"train.loss_impl={impl}: {type(_base(model)).__name__}.forward takes no logits_to_keep, so it would "
            "compute the full logits anyway; use train.loss_impl=full (or auto)"
        )
    check_loss_impl(impl, zero_stage)
    if impl != "full" and _base(model).get_output_embeddings() is None:
        raise ConfigError(
            f"train.loss_impl={impl}: the model has no output embedding (get_output_embeddings() is None); use "
            "train.loss_impl=full"
        )
    if impl in PACKAGES and not _plain_head(model):
        raise ConfigError(
            f"train.loss_impl={impl} takes the output embedding's weight, but lm_head is adapted (a LoRA target or in "
            "peft.modules_to_save); use train.loss_impl=chunked"
        )
    path = LossPath(impl, chunk_tokens)
    getattr(model, "module", model).fishds_loss = path
    return path


def loss_path(model) -> LossPath:
    path = getattr(getattr(model, "module", model), "fishds_loss", None)
    if path is None:
        path = LossPath()
        getattr(model, "module", model).fishds_loss = path
    return path


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    # shift the labels, not the logits (as transformers' ForCausalLMLoss does): slicing the logits would copy them
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def _project(head, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # a no-op in fp32
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _FrozenLinearCE(torch.autograd.Function):
    """Token cross-entropies (n,) of the logits h W^T + b against t, `step` tokens at a time, for a frozen output
    embedding: each chunk's input gradient (softmax - one-hot, through a softcap if any, times W) is computed in the
    forward, so no logits are kept and none are recomputed (the same two matmuls per token as the full loss; the
    pure-PyTorch form of liger's fused linear cross-entropy). Backward scales the stored input gradient per token."""

    @staticmethod
    def forward(ctx, h, weight, bias, t, step: int, softcap):
        n = h.shape[0]
        wide = torch.promote_types(h.dtype, torch.float32)  # bf16 logits are upcast, as the full loss does
        ce = torch.empty(n, dtype=wide, device=h.device)
        grad = torch.empty_like(h) if h.requires_grad else None
        rows = torch.arange(min(step, n), device=h.device)
        for s in range(0, n, step):
            logits = F.linear(h[s : s + step], weight, bias).to(wide)
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            tgt, r = t[s : s + step], rows[: min(step, n - s)]
            lse = torch.logsumexp(logits, -1)
            ce[s : s + step] = lse - logits[r, tgt]
            if grad is not None:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[r, tgt] -= 1
                if softcap:
                    g.mul_(1 - capped.square_())
                grad[s : s + step] = g.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        (grad,) = ctx.saved_tensors
        g = None if grad is None else grad * grad_ce[:, None].to(grad.dtype)
        return g, None, None, None, None, None


def _frozen_ce(head: torch.nn.Linear, h: torch.Tensor, t: torch.Tensor, step: int, softcap) -> torch.Tensor:
    params = [p for p in head.parameters() if zero.is_partitioned(p)]
    if not params:
        return _FrozenLinearCE.apply(h, head.weight, head.bias, t, step, softcap)
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):  # ZeRO-3: gathered once per micro-batch, used in forward only
        return _FrozenLinearCE.apply(h, head.weight, head.bias, t, step, softcap)


def _chunk_ce(head, softcap):
    def fn(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_project(head, hidden, softcap), target, reduction="none")

    return fn


def _targets(model, out, labels: torch.Tensor, path: LossPath):
    """(head, softcap, hidden states of the target tokens (n, h), their targets (n,), row of each (n,), weight) from
    a forward asked for hidden states (`forward_kwargs`); weight 0 when the micro-batch has no target (one token
    then stands in, so that every parameter stays in the backward graph)."""
    base = _base(model)
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    hidden = out.hidden_states[-1]  # the final (normed) hidden states, what lm_head reads
    if not path.checked:  # once: are the model's logits its output embedding applied to the hidden states?
        with torch.no_grad():
            want = out.logits[:, -1].float()
            got = _project(head, hidden[:, -1], softcap)
            scale = float(want.abs().max()) or 1.0
            ok = float((got - want).abs().max()) <= CHECK_RTOL * scale
        if not ok:
            raise ConfigError(
                f"train.loss_impl={path.impl}: this model's logits are not its output embedding applied to the "
                "final hidden states (a scale or cap fishds does not apply); use train.loss_impl=full"
            )
        path.checked = True
    target = _shifted(labels).to(hidden.device)
    sel = target != -100
    rows = sel.nonzero()[:, 0]
    weight = 1.0
    if rows.numel() == 0:
        sel = torch.zeros_like(sel)
        sel[0, 0] = True
        rows, weight = sel.nonzero()[:, 0], 0.0
        target = torch.zeros_like(target)
    return head, softcap, hidden[sel], target[sel], rows, weight


def _n_chunks(head, n: int, step: int) -> int:
    """Chunks of `step` tokens for n targets; under ZeRO-3 every call of the head gathers its weight (a collective),
    so every rank makes as many calls: the most chunks of any rank (the extra chunks are empty; one small
    all-reduce per micro-batch)."""
    chunks = -(-n // step)
    if any(zero.is_partitioned(p) for p in head.parameters()):
        chunks = int(fdist.all_reduce_(torch.tensor([chunks]), op=torch.distributed.ReduceOp.MAX)[0])
    return chunks


def _target_ce(model, out, labels: torch.Tensor, path: LossPath, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(token cross-entropies of the target tokens (n,) in fp32 - or their sum with a fused kernel -, row of each
    target (n,)) from a forward asked for hidden states (`forward_kwargs`)."""
    head, softcap, h, t, rows, weight = _targets(model, out, labels, path)
    if fused:
        return _fused_sum(path.impl, head, h, t, softcap) * weight, rows
    step = path.chunk(out.logits.shape[-1])
    if type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return _frozen_ce(head, h, t, step, softcap) * weight, rows
    fn = _chunk_ce(head, softcap)
    # determinism_check off: under ZeRO-3 a frozen head weight is saved as the parameter itself, which its release
    # after the recompute empties (the metadata check would fail); its backward hook gathers it again before use
    parts = [
        torch.utils.checkpoint.checkpoint(
            fn,
            h[i * step : (i + 1) * step],
            t[i * step : (i + 1) * step],
            use_reentrant=False,
            determinism_check="none",
        )
        for i in range(_n_chunks(head, h.shape[0], step))
    ]
    return torch.cat(parts) * weight, rows


@torch.no_grad()
def eval_sums(model, batch: dict) -> tuple[float, int, int]:
    """Causal LM evaluation of one micro-batch without its full logits (unless train.loss_impl=full): the sum of the
    target-token cross-entropies, the number of targets and how many the argmax predicts, chunk by chunk."""
    path = loss_path(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, **forward_kwargs(model))
    if path.impl == "full":
        logits, target = out.logits.float(), _shifted(labels).to(out.logits.device)
        valid = target != -100
        loss = F.cross_entropy(logits[valid], target[valid], reduction="sum")
        return float(loss), int(valid.sum()), int((logits.argmax(-1)[valid] == target[valid]).sum())
    head, softcap, h, t, _, weight = _targets(model, out, labels, path)
    step = path.chunk(out.logits.shape[-1])
    loss, correct = torch.zeros((), dtype=torch.float64, device=h.device), torch.zeros((), dtype=torch.long)
    for i in range(_n_chunks(head, h.shape[0], step)):
        lg, tc = _project(head, h[i * step : (i + 1) * step], softcap), t[i * step : (i + 1) * step]
        loss += F.cross_entropy(lg, tc, reduction="sum").double()
        correct += int((lg.argmax(-1) == tc).sum())
    return (float(loss), int(h.shape[0]), int(correct)) if weight else (0.0, 0, 0)


def _fused_sum(impl: str, head: torch.nn.Linear, h: torch.Tensor, t: torch.Tensor, softcap) -> torch.Tensor:
    """Sum of the token cross-entropies by liger-kernel or cut-cross-entropy (CUDA; imports guarded by configure)."""
    cap = {"softcap": softcap} if softcap else {}
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(
            h, head.weight, t, bias=head.bias, ignore_index=-100, reduction="sum", **cap
        ).float()
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", **cap)
    params = [p for p in head.parameters() if zero.is_partitioned(p)]
    if not params:
        return ce(head.weight, h, t, head.bias).float()
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):  # liger computes the input gradient in its forward
        return ce(head.weight, h, t, head.bias).float()


def forward_kwargs(model) -> dict:
    """Extra arguments of the model's forward for the loss path (no KV cache in training; with one, transformers
    ignores the restarts of packed position_ids): chunked / fused ask for the final hidden states and the last
    position's logits only."""
    if loss_path(model).impl == "full":
        return {"use_cache": False}
    return {"use_cache": False, "output_hidden_states": True, "logits_to_keep": 1}


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the losses of the micro-batch's targets (fp32): token cross-entropies, or per-example losses."""
    labels = batch["labels"]
    if labels.dim() == 1:  # classification: the model's own per-example mean (problem_type), times the examples
        return model(**batch).loss.float() * labels.numel()
    path = loss_path(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, **forward_kwargs(model))
    if path.impl == "full":
        logits = out.logits.float()  # a no-op in fp32
        target = _shifted(labels).to(logits.device)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
    ce, _ = _target_ce(model, out, labels, path, fused=path.impl in PACKAGES)
    return ce.sum()


def example_losses(model, out, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM, from a forward called with `forward_kwargs(model)` (and no labels): (per-example losses (b,): the
    mean of each example's target-token cross-entropies, as for a batch of one; the micro-batch's mean over all its
    target tokens). Chunked unless train.loss_impl=full (the fused kernels only sum)."""
    path = loss_path(model)
    b = labels.shape[0]
    if path.impl == "full":
        lg, lb = out.logits.float(), _shifted(labels).to(out.logits.device)
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none")
        per_sum, n = ce.view(b, -1).sum(1), (lb != -100).sum(1)
    else:
        ce, rows = _target_ce(model, out, labels, path, fused=False)
        per_sum = torch.zeros(b, dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
        n = (_shifted(labels) != -100).sum(1).to(ce.device)
    return per_sum / n.clamp(min=1), per_sum.sum() / n.sum().clamp(min=1)


def mean_loss(model, batch: dict) -> torch.Tensor:
    """The micro-batch's mean loss, as model(**batch).loss gives it (causal LM: over its target tokens, through the
    loss path; classification: the model's own)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return model(**batch).loss
    return loss_sum(model, batch) / max(1, count_targets(batch))
