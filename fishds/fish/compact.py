"""Compact optimizer state (`fish.compact_optimizer`): Adam moments only for the selected entries.

With a keep ratio p, a dense masked AdamW still keeps two fp32 moments (8 B) for every pool entry of
the local partition, and the mask enforcer keeps a copy of every frozen fp32 master entry plus its
position (4 + 8 B per unselected entry). `CompactAdamW` is the client optimizer DeepSpeed wraps; once
the mask is fixed it is told, per tensor it updates (ZeRO 1/2: the flat fp32 partition of a group;
ZeRO-3: the flat fp32 partition of a sub-group; stage 0: the parameters), which local entries are
selected (int32 indices, located with `zero.master_fragments`, the same layout logic the enforcer
uses). Its step gathers those entries of the parameter and the gradient, runs torch's own functional
AdamW on them (same code path as torch.optim.AdamW on this device, so the same bits), and scatters
the result back. Unselected entries are never written, so weight decay cannot move them and the
enforcer's restore copies are not needed.

Per selected local entry the state is exp_avg (4 B) + exp_avg_sq (4 B) + index (4 B) = 12 B, against
8 B per local entry dense. What DeepSpeed does not let a client optimizer change stays dense: the fp32
master partition (DeepSpeed copies it into the model weights after every step) and the fp32 gradient
partition (DeepSpeed reduces dense buffers).

Before the mask is fixed (fish.dense_steps) the optimizer is an ordinary dense AdamW; when the mask
is set, existing dense moments are cut down to the selected entries. The indices live in the
optimizer state (key `idx`), so DeepSpeed checkpoints save and resume the compact state as they are.
Only AdamW is offered: train.optimizer=sgd, an optimizer named in the DeepSpeed JSON, optimizer
offload and selection=dense are refused by `check_config`.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam
from torch.optim.optimizer import _get_scalar_dtype

from .. import zero
from ..memory import optimizer_tensors
from ..schema import ConfigError
from ..zero import UnsupportedSetup
from .pool import Pool


class CompactAdamW(torch.optim.AdamW):
    """torch.optim.AdamW that, for tensors given `select(tensor, idx)`, keeps state and updates only at idx."""

    def select(self, p: torch.Tensor, idx: torch.Tensor) -> None:
        """From now on update only p.view(-1)[idx]; existing dense moments are cut to idx."""
        idx = idx.to(p.device, torch.int32)
        st = self.state[p]
        if "idx" in st:  # resumed from a compact checkpoint
            if not torch.equal(st["idx"], idx):
                raise UnsupportedSetup("the compact optimizer state of the checkpoint was saved with another mask")
            return
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in st:
                st[key] = st[key].reshape(-1).index_select(0, idx).clone()
        st["idx"] = idx

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor of a float parameter to its dtype: keep the indices exact int32
        saved = {i: s["idx"] for i, s in state_dict["state"].items() if "idx" in s}
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p]["idx"] = saved[i].to(p.device, torch.int32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = [p for p in group["params"] if p.grad is not None and "idx" not in self.state.get(p, {})]
            if dense:
                self._dense_step(group, dense)
            compact = [p for p in group["params"] if p.grad is not None and "idx" in self.state.get(p, {})]
            if compact:
                self._compact_step(group, compact)
        return loss

    def _dense_step(self, group: dict, params: list) -> None:
        params_with_grad, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        has_complex = self._init_group(
            dict(group, params=params), params_with_grad, grads, exp_avgs, exp_avg_sqs, max_sqs, steps
        )
        self._adam(group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, has_complex)

    def _compact_step(self, group: dict, params: list) -> None:
        if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"] or group["fused"]:
            raise UnsupportedSetup(
                "CompactAdamW supports plain AdamW only (no amsgrad, maximize, capturable, differentiable or fused)"
            )
        sel, grads, exp_avgs, exp_avg_sqs, steps, where = [], [], [], [], [], []
        for p in params:
            st = self.state[p]
            idx = st["idx"]
            if idx.numel() == 0:
                continue
            flat = p.view(-1)
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                st["exp_avg"] = torch.zeros(idx.numel(), dtype=p.dtype, device=p.device)
                st["exp_avg_sq"] = torch.zeros(idx.numel(), dtype=p.dtype, device=p.device)
            sel.append(flat.index_select(0, idx))
            grads.append(p.grad.reshape(-1).index_select(0, idx))
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
            where.append((flat, idx))
        if sel:
            self._adam(group, sel, grads, exp_avgs, exp_avg_sqs, [], steps, False)
            for (flat, idx), new in zip(where, sel):
                flat[idx] = new

    def _adam(self, group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, has_complex) -> None:
        beta1, beta2 = group["betas"]
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_sqs,
            steps,
            amsgrad=group["amsgrad"],
            has_complex=has_complex,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )


def check_config(cfg, ds: dict) -> None:
    """Refuse fish.compact_optimizer where it cannot work (before any weights load; cfg: config.Config)."""
    if not cfg.fish.compact_optimizer:
        return
    if cfg.fish.dense:
        raise ConfigError(
            "fish.compact_optimizer=true needs a mask; with fish.selection=dense every entry trains "
            "(set fish.compact_optimizer=false)"
        )
    if cfg.train.optimizer != "adamw":
        raise ConfigError(
            f"fish.compact_optimizer=true supports train.optimizer=adamw only (got "
            f"train.optimizer={cfg.train.optimizer}); use adamw or set fish.compact_optimizer=false"
        )
    if "optimizer" in ds:
        raise ConfigError(
            "fish.compact_optimizer=true needs fishds' client optimizer: remove the optimizer section "
            "from the DeepSpeed JSON (lr and weight decay come from train.lr / train.weight_decay)"
        )
    if ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        raise ConfigError(
            "fish.compact_optimizer=true does not support zero_optimization.offload_optimizer in the "
            "DeepSpeed JSON; remove the offload or set fish.compact_optimizer=false"
        )


def _owner(tensors: list[torch.Tensor], view: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The updated tensor whose memory holds `view`, and the flat offset of view[0] in it."""
    ptr = view.untyped_storage().data_ptr()
    for p in tensors:
        if p.untyped_storage().data_ptr() == ptr and p.dtype == view.dtype:
            off = view.storage_offset() - p.storage_offset()
            if 0 <= off and off + view.numel() <= p.numel():
                return p, off
    raise UnsupportedSetup(
        "cannot find the optimizer tensor that holds a pool tensor's fp32 masters "
        "(DeepSpeed layout changed?); set fish.compact_optimizer=false"
    )


@torch.no_grad()
def apply_mask(engine, pool: Pool, masks: dict[str, torch.Tensor]) -> None:
    """Tell the CompactAdamW inside `engine` the local selected entries of every tensor it updates."""
    opt = zero.torch_optimizer(engine)
    if not isinstance(opt, CompactAdamW):
        raise UnsupportedSetup(
            f"fish.compact_optimizer needs CompactAdamW inside DeepSpeed, found {type(opt).__name__}"
        )
    tensors = optimizer_tensors(engine)
    chosen: dict[int, list[torch.Tensor]] = {}
    owner_of: dict[int, torch.Tensor] = {}
    for name, master, start, local in zero.master_fragments(engine, pool):
        if master.numel() == 0:
            continue
        if not torch.equal(master[: local.numel()].to(local.dtype), local):
            raise UnsupportedSetup(
                f"DeepSpeed's fp32 master layout for {name} does not match the model weights (pinned DeepSpeed: 0.19.8)"
            )
        p, off = _owner(tensors, master)
        flat_mask = masks[name].reshape(-1).to(master.device)
        n = max(0, min(master.numel(), flat_mask.numel() - start))  # beyond n: ZeRO-3 padding, never selected
        pos = flat_mask[start : start + n].nonzero().reshape(-1)
        chosen.setdefault(id(p), []).append(pos + off)
        owner_of[id(p)] = p
    for key, p in owner_of.items():
        idx = torch.cat(chosen[key]).sort().values
        opt.select(p, idx)
    for p in tensors:  # a tensor holding no pool entry here (e.g. an empty ZeRO partition) gets no update
        if id(p) not in owner_of and p.numel():
            opt.select(p, torch.zeros(0, dtype=torch.int32))


def check_resumed_state(engine, compact: bool) -> None:
    """After loading a checkpoint: a compact optimizer state cannot continue in a dense AdamW."""
    if not compact and any("idx" in st for st in zero.torch_optimizer(engine).state.values()):
        raise ConfigError(
            "this checkpoint holds a compact optimizer state (written with fish.compact_optimizer=true); "
            "resume it with fish.compact_optimizer=true"
        )
