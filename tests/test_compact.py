"""fish.compact_optimizer: Adam moments only for the selected entries, same bits as the dense masked AdamW."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file
from test_distributed import assert_mask_enforced

from fishds.config import ConfigError, load_config
from fishds.dsconfig import resolve_ds_config
from fishds.fish.compact import CompactAdamW, check_config


def _dense_masked_step(p, opt, mask, frozen):
    opt.step()
    with torch.no_grad():
        p.view(-1)[~mask] = frozen


def test_compact_adamw_same_bits_as_dense_masked_adamw_with_warmup_and_state_dict():
    """Unit level: 3 dense warm-up steps, then the mask; wd>0; a state_dict round trip mid-way."""
    g = torch.Generator().manual_seed(0)
    n = 5003
    init = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.1
    idx = mask.nonzero().reshape(-1)
    grads = [torch.randn(n, generator=g) * 10 ** torch.randn(n, generator=g) for _ in range(9)]
    pd, pc = init.clone().requires_grad_(), init.clone().requires_grad_()
    dense, comp = (torch.optim.AdamW([pd], lr=0.01, weight_decay=0.1), CompactAdamW([pc], lr=0.01, weight_decay=0.1))
    for step, gr in enumerate(grads):
        if step == 3:
            frozen = pd.detach()[~mask].clone()
            comp.select(pc, idx)
            assert comp.state[pc]["exp_avg"].numel() == idx.numel()
        if step == 6:  # checkpoint round trip into a fresh optimizer
            sd = comp.state_dict()
            comp = CompactAdamW([pc], lr=0.01, weight_decay=0.1)
            comp.load_state_dict(sd)
            comp.select(pc, idx)  # same mask: state kept
        pd.grad = gr.masked_fill(~mask, 0) if step >= 3 else gr.clone()
        pc.grad = pd.grad.clone()
        if step >= 3:
            _dense_masked_step(pd, dense, mask, frozen)
        else:
            dense.step()
        comp.step()
        assert torch.equal(pd, pc), f"step {step}"
    st = comp.state[pc]
    assert torch.equal(st["exp_avg"], dense.state[pd]["exp_avg"][idx])
    assert torch.equal(st["exp_avg_sq"], dense.state[pd]["exp_avg_sq"][idx])
    with pytest.raises(RuntimeError, match="another mask"):
        comp.select(pc, idx[1:])


@pytest.mark.parametrize(
    "extra,ds_opt,needle",
    [
        ({"train.optimizer": "sgd"}, False, "train.optimizer=sgd"),
        ({"fish.selection": "dense"}, False, "fish.selection=dense"),
        ({}, True, "optimizer section"),
    ],
)
def test_compact_refused_where_it_cannot_work(toy, tmp_path, extra, ds_opt, needle):
    cfg = load_config(None, base_overrides(toy, tmp_path, **{"fish.compact_optimizer": "true", **extra}))
    path = None
    if ds_opt:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match=needle):
        check_config(cfg, resolve_ds_config(cfg, str(path) if path else None, 1))


def test_compact_checkpoint_refused_by_a_dense_resume():
    from types import SimpleNamespace

    from fishds.fish.compact import check_resumed_state

    p = torch.zeros(10, requires_grad=True)
    opt = CompactAdamW([p], lr=0.1)
    opt.select(p, torch.tensor([1, 4]))
    engine = SimpleNamespace(basic_optimizer=opt)
    check_resumed_state(engine, True)
    with pytest.raises(ConfigError, match="fish.compact_optimizer=true"):
        check_resumed_state(engine, False)


def _adapters_equal(a, b):
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k} differs between dense masked AdamW and compact"


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_compact_matches_dense_masked_adamw_two_ranks(toy, tmp_path, ds_config):
    """2 ranks, wd 0.1, clipping; ZeRO-3 also: 1 dense warm-up step, and a resume from a compact checkpoint."""
    extra = {
        "train.weight_decay": 0.1,
        "train.grad_clip": 0.5,
        "train.max_steps": 5,
        "fish.keep_ratio": 0.1,
        "data.max_eval_examples": 4,
    }
    if ds_config == "zero3.json":
        extra.update({"fish.dense_steps": 1, "train.save_every": 2})
    dense, comp = tmp_path / "dense", tmp_path / "compact"
    compact = {**extra, "fish.compact_optimizer": "true"}
    launch(2, base_overrides(toy, dense, **extra), ds_config)
    launch(2, base_overrides(toy, comp, **compact), ds_config)
    _adapters_equal(dense, comp)
    k = int(0.1 * 896)
    _, _, rep = assert_mask_enforced(comp, k)
    _, _, rep_dense = assert_mask_enforced(dense, k)
    mem_c, mem_d = rep["memory_per_rank"], rep_dense["memory_per_rank"]
    assert len(mem_c) == len(mem_d) == 2
    assert sum(r["updated_entries"] for r in mem_c) == k  # each selected entry lives on exactly one rank
    for c, d in zip(mem_c, mem_d):
        assert c["optimizer_masters"] == d["optimizer_masters"] and c["local_entries"] == d["local_entries"]
        assert c["mask_restore_copies"] == 0 and d["mask_restore_copies"] > 0
        # exp_avg + exp_avg_sq + int32 index per selected local entry, plus one step counter per tensor
        assert 12 * c["updated_entries"] <= c["optimizer_state"] <= 12 * c["updated_entries"] + 4 * 8
        assert d["optimizer_state"] >= 8 * d["local_entries"]
    ratio = sum(r["optimizer_state"] for r in mem_c) / sum(r["optimizer_state"] for r in mem_d)
    assert ratio < 0.2, ratio  # about 1.5 x keep ratio
    if ds_config == "zero3.json":  # crash after the run: resume=auto continues from the step-4 checkpoint
        (comp / "fish_report.json").unlink()
        proc = launch(2, base_overrides(toy, comp, **compact), ds_config)
        assert "resumed from" in proc.stdout and "(step 4)" in proc.stdout, proc.stdout[-2000:]
        _adapters_equal(dense, comp)
