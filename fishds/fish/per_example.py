"""Per-example squared gradients of a whole micro-batch from ONE forward/backward (fish.per_example: batched).

For a linear layer y = x W^T + b applied to a batch, the gradient of example i's loss L_i is

    dL_i/dW = sum over tokens t of  g[i, t, :]^T x[i, t, :]        (g = dL/dy, x = the layer's input)
    dL_i/db = sum over tokens t of  g[i, t, :]

as long as the examples do not interact (attention masks keep padding out, dropout is off, no batch norm) and the
batch loss is the SUM of the per-example losses. So forward hooks keep each covered layer's input x and output y,
one torch.autograd.grad of that summed loss w.r.t. the outputs y gives g, and the per-example gradients are one
einsum per layer, 'bto,bti->boi', squared and summed over the batch: the Fisher scores of the loop, at the cost of
one pass per micro-batch (under ZeRO-3 the frozen weights are gathered once per micro-batch, not once per example).
No gradient w.r.t. the parameters themselves is computed (except once, on the first micro-batch, as a check).

Rules (which parameters this covers):
- `linear`: the nn.Linear layers holding pool parameters that are only used through their forward: LoRA's lora_A
  and lora_B (also rslora, pissa, olora: the same layers; not DoRA or other LoRA variants, whose forward also reads
  the weights directly), fishds' bottleneck down / up (weights and biases), a plain nn.Linear head kept trainable by
  modules_to_save;
- `ia3`: IA3's vector l on a layer's output, y = base(x) * l: dL_i/dl = sum_t g[i, t, :] * base(x)[i, t, :].
Every other pool parameter (DoRA's magnitude, VeRA's lambdas, LoHa / LoKr factors, embeddings, ...) is scored by
the per-example loop for those parameters only, after the batched pass; one log line names them.

The per-example loss is the one the loop differentiates: for a causal LM the mean over the example's target tokens
(labels != -100, shifted by one), taken from the training loss path (fishds/run/loss.py: per-example sums of the
chunked cross-entropy, so no pass holds the micro-batch's full-vocabulary logits); for sequence classification its
cross-entropy (or squared error / BCE) from the logits, its batch form checked against the model's own loss on the
first micro-batch. Padding and prompt tokens contribute nothing. On the first micro-batch the sum over
examples of the per-example gradients is checked against the parameters' batch gradient. A parameter that fails
that check, or a loss fishds cannot split per example, goes to the loop (decided on every rank alike).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ENTRIES = 1 << 24  # per-example gradient entries materialised at once (64 MiB in fp32)
CHECK_RTOL = 1e-3  # first-batch checks: loss and summed per-example gradients against autograd's


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(per-example losses (b,), the model's batch loss recomputed) or None when the shape is not one fishds knows.

    Causal LM: labels (b, T) with -100 where no loss, logits (b, T, V); example i's loss is the mean of its shifted
    token cross-entropies (as for a batch of one), and the model's batch loss is the mean over all target tokens.
    Sequence classification: labels (b,) class ids (or floats with one output: squared error), logits (b, C);
    multi-label: float labels (b, C), BCE averaged over the labels. The batch loss is then the mean over examples.
    """
    b = logits.shape[0]
    if labels.dim() == 2 and logits.dim() == 3 and labels.shape == logits.shape[:2]:
        lg, lb = logits.float(), F.pad(labels, (0, 1), value=-100)[:, 1:]  # labels shifted: no logits copy
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none").view(
            b, -1
        )
        n = (lb != -100).sum(1)
        return ce.sum(1) / n.clamp(min=1), ce.sum() / n.sum().clamp(min=1)
    if logits.dim() == 2 and labels.shape[0] == b:
        lg = logits.float()
        if lg.shape[1] == 1:
            per = (lg.reshape(-1) - labels.reshape(-1).float()).square()
        elif labels.dim() == 1 and not labels.is_floating_point():
            per = F.cross_entropy(lg, labels, reduction="none")
        elif labels.shape == lg.shape:
            per = F.binary_cross_entropy_with_logits(lg, labels.float(), reduction="none").mean(1)
        else:
            return None
        return per, per.mean()
    return None


class _Rule:
    """Hooks on some modules; turns the captured tensors and their output gradients into per-example squares."""

    def __init__(self, params: list[int]):
        self.params = params  # pool indices of the parameters this rule scores
        self.calls: list[tuple] = []

    def targets(self) -> list[torch.Tensor]:
        return [c[-1] for c in self.calls]


def _flat(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.reshape(b, -1, t.shape[-1]).float()


class _Linear(_Rule):
    def __init__(self, module: torch.nn.Linear, weight: int | None, bias: int | None):
        super().__init__([i for i in (weight, bias) if i is not None])
        self.module, self.weight, self.bias = module, weight, bias

    def hooks(self, capturing):
        def fwd(module, args, out):
            if capturing():
                self.calls.append((args[0].detach(), out))

        return [self.module.register_forward_hook(fwd)]

    def squares(self, grads: list[torch.Tensor], b: int) -> dict[int, torch.Tensor]:
        xs = [_flat(x, b) for x, _ in self.calls]
        gs = [_flat(g, b) for g in grads]
        out = {}
        if self.bias is not None:
            out[self.bias] = sum(g.sum(1) for g in gs).square().sum(0)
        if self.weight is not None:
            o, i = gs[0].shape[-1], xs[0].shape[-1]
            step = max(1, CHUNK_ENTRIES // max(1, o * i))
            acc = torch.zeros(o, i, dtype=torch.float32, device=gs[0].device)
            for s in range(0, b, step):
                per = sum(torch.einsum("bto,bti->boi", g[s : s + step], x[s : s + step]) for g, x in zip(gs, xs))
                acc += per.square().sum(0)
            out[self.weight] = acc
        return out


class _IA3(_Rule):
    """peft IA3 on a layer's output: y = base(x) * l, l of shape (out, 1)."""

    def __init__(self, module, vector: int):
        super().__init__([vector])
        self.module, self.vector, self._base = module, vector, []

    def hooks(self, capturing):
        def base_fwd(module, args, out):
            if capturing():
                self._base.append(out.detach())

        def fwd(module, args, out):
            if capturing():
                self.calls.append((self._base.pop(), out))

        return [self.module.base_layer.register_forward_hook(base_fwd), self.module.register_forward_hook(fwd)]

    def squares(self, grads, b):
        per = sum((_flat(g, b) * _flat(h, b)).sum(1) for (h, _), g in zip(self.calls, grads))
        return {self.vector: per.square().sum(0).reshape(-1, 1)}


def find_rules(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> tuple[list[_Rule], list[int]]:
    """Batched rules for the pool parameters they cover, and the pool indices nothing covers (loop for those)."""
    index = {id(p): i for i, p in enumerate(params)}
    rules: list[_Rule] = []
    try:
        from peft.tuners.ia3.layer import Linear as IA3Linear
        from peft.tuners.lora.layer import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        IA3Linear = LoraLayer = ModulesToSaveWrapper = ()
    from ..bottleneck import Bottleneck

    linears: list[torch.nn.Linear] = []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            variants = set(getattr(m, "lora_variant", {}) or {}) | {a for a, v in m.use_dora.items() if v}
            for name in ("lora_A", "lora_B"):
                linears += [lin for a, lin in getattr(m, name).items() if a not in variants]
        elif isinstance(m, Bottleneck):
            linears += [m.down, m.up]
        elif isinstance(m, ModulesToSaveWrapper):
            linears += [lin for lin in m.modules_to_save.values() if type(lin) is torch.nn.Linear]
        elif isinstance(m, IA3Linear) and not m.is_feedforward and len(m.ia3_l) == 1:
            vec = next(iter(m.ia3_l.values()))
            if id(vec) in index:
                rules.append(_IA3(m, index[id(vec)]))
    for lin in linears:
        if type(lin) is not torch.nn.Linear:
            continue
        w = index.get(id(lin.weight))
        b = index.get(id(lin.bias)) if lin.bias is not None else None
        if w is not None or b is not None:
            rules.append(_Linear(lin, w, b))
    covered = {i for r in rules for i in r.params}
    return rules, [i for i in range(len(params)) if i not in covered]


class BatchedFisher:
    """Installs the rules' hooks for the duration of a Fisher pass (use as a context manager)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter]):
        self.model = model
        self.rules, self.uncovered = find_rules(model, params)
        self._capturing = False
        self._handles = []

    def __enter__(self):
        for r in self.rules:
            self._handles += r.hooks(lambda: self._capturing)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self):
        for r in self.rules:
            r.calls.clear()
            if isinstance(r, _IA3):
                r._base.clear()

    def forward(self, batch: dict, **kwargs):
        """The model's output on `batch`, with this pass's layer inputs and outputs captured (only in this forward:
        a recomputation by gradient checkpointing during the backward is not captured again, nor the chunked loss's
        calls of the output embedding after it, fishds/run/loss.py: an adapted lm_head fails the first-batch check
        and is looped)."""
        self.clear()
        self._capturing = True
        try:
            return self.model(**batch, **kwargs)
        finally:
            self._capturing = False

    def targets(self) -> tuple[list[torch.Tensor], list[tuple[_Rule, int, int]]]:
        """The captured outputs to differentiate, and (rule, first, end) slices of them per rule."""
        flat, spans = [], []
        for r in self.rules:
            t = r.targets()
            spans.append((r, len(flat), len(flat) + len(t)))
            flat += t
        return flat, spans

    @staticmethod
    def squares(grads: list[torch.Tensor | None], spans, b: int) -> dict[int, torch.Tensor]:
        """Pool index -> sum over the batch of squared per-example gradients (fp32, parameter shape)."""
        out = {}
        for r, s, e in spans:
            if s == e:
                continue  # the layer did not run in this forward
            gs = [g if g is not None else torch.zeros_like(t[-1]) for g, t in zip(grads[s:e], r.calls)]
            for i, sq in r.squares(gs, b).items():
                out[i] = sq
        return out

    @staticmethod
    def summed(grads, spans, b: int) -> dict[int, torch.Tensor]:
        """Pool index -> sum over the batch of the per-example gradients (the check against autograd's)."""
        out = {}
        for r, s, e in spans:
            if s == e:
                continue
            gs = [_flat(g if g is not None else torch.zeros_like(t[-1]), b) for g, t in zip(grads[s:e], r.calls)]
            if isinstance(r, _Linear):
                xs = [_flat(x, b) for x, _ in r.calls]
                if r.weight is not None:
                    out[r.weight] = sum(torch.einsum("bto,bti->oi", g, x) for g, x in zip(gs, xs))
                if r.bias is not None:
                    out[r.bias] = sum(g.sum((0, 1)) for g in gs)
            else:
                hs = [_flat(h, b) for h, _ in r.calls]
                out[r.vector] = sum((g * h).sum((0, 1)) for g, h in zip(gs, hs)).reshape(-1, 1)
        return out
