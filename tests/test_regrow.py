"""Mask regrowth (fish.regrow_every, fishds/fish/regrow.py): the drop/grow choice against a plain-Python reference,
the refusals, and real 2-rank runs: frozen entries bit-identical between steps, per-tensor counts constant, the mask
changing at each regrowth, 1 rank = 2 ranks, and a resume across a regrowth bit-exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file

from fishds.config import ConfigError
from fishds.fish.config import FishSection
from fishds.fish.mask import load_masks
from fishds.fish.pool import Pool
from fishds.fish.regrow import drop_grow, regrow_counts
from fishds.run.checkpoint import complete_checkpoints


def _reference(pool, active, movement, grads, counts):
    """Per tensor: the d active entries of least movement, the d inactive ones of largest |g|, ties to the lowest
    index (plain Python sorts)."""
    dropped, grown = set(), set()
    for t, d in zip(pool.tensors, counts):
        idx = range(t.offset, t.offset + t.numel)
        act = sorted((i for i in idx if active[i]), key=lambda i: (float(movement[i]), i))
        ina = sorted((i for i in idx if not active[i]), key=lambda i: (-abs(float(grads[i])), i))
        dropped |= set(act[:d])
        grown |= set(ina[:d])
    return dropped, grown


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drop_grow_matches_a_plain_reference(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 7), (8, 4), (5, 5), (2, 9)]
    pool = Pool([(f"t{i}", torch.nn.Parameter(torch.zeros(s))) for i, s in enumerate(shapes)])
    active = torch.rand(pool.size, generator=g) < 0.4
    active[pool.tensors[3].offset : pool.tensors[3].offset + 18] = True  # a fully selected tensor: nothing moves
    # coarse values: many exact ties, which must go to the lowest index
    movement = torch.randint(0, 4, (pool.size,), generator=g).float() * 0.25
    grads = (torch.randint(-3, 4, (pool.size,), generator=g).float() * 0.5).masked_fill(active, 99.0)
    selected = [int(active[t.offset : t.offset + t.numel].sum()) for t in pool.tensors]
    counts = regrow_counts(selected, [t.numel for t in pool.tensors], 0.3)
    assert counts[3] == 0
    dropped, grown = drop_grow(pool, 0, pool.size, active, movement, grads, counts)
    ref_drop, ref_grow = _reference(pool, active, movement, grads, counts)
    assert set(dropped.nonzero().view(-1).tolist()) == ref_drop
    assert set(grown.nonzero().view(-1).tolist()) == ref_grow
    new = (active & ~dropped) | grown
    for t, s in zip(pool.tensors, selected):
        assert int(new[t.offset : t.offset + t.numel].sum()) == s, "the per-tensor count changed"
    assert not bool((dropped & grown).any())
    none = drop_grow(pool, 0, pool.size, active, movement, grads, [0] * len(counts))
    assert not bool(none[0].any() or none[1].any()), "quotas of 0 everywhere: nothing changes"


def test_regrow_counts_round_half_up_and_cap():
    assert regrow_counts([10, 5, 15, 4, 0], [20, 6, 100, 4, 9], 0.1) == [1, 1, 2, 0, 0]
    assert regrow_counts([25], [30], 0.5) == [5]  # 12.5 -> 13, capped at the 5 unselected entries


def test_refusals():
    with pytest.raises(ValueError, match=r"fish\.regrow_every=2 and fish\.compact_optimizer"):
        FishSection(regrow_every=2, compact_optimizer=True)
    with pytest.raises(ValueError, match=r"fish\.selection=dense"):
        FishSection(regrow_every=2, selection="dense")
    with pytest.raises(ValueError):
        FishSection(regrow_every=2, regrow_fraction=1.0)
    from types import SimpleNamespace

    from fishds.fish.regrow import check_config
    from fishds.run.reshard import check

    cfg = SimpleNamespace(fish=FishSection(regrow_every=2), train=SimpleNamespace(save_best=True))
    with pytest.raises(ConfigError, match=r"fish\.regrow_every=2 with train\.save_best"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"written on 2 rank\(s\), this run has 1.*fish\.regrow_every"):
        check({"world_size": 2, "data_position": 2, "micro_batch_size": 4}, None, 1, False, 4, regrow=True)


def test_hf_callback_refuses_regrowth():
    from fishds.integrations.hf import FishCallback, FishError

    with pytest.raises(FishError, match="regrow_every=2"):
        FishCallback(regrow_every=2)


REGROW = {
    "fish.selection": "random",
    "fish.regrow_every": 2,
    "fish.regrow_fraction": 0.25,
    "train.max_steps": 8,
    "train.save_every": 1,
    "train.keep_checkpoints": 10,
    "train.weight_decay": 0.1,
    "data.max_eval_examples": 4,
}


def _counts(masks):
    return {k: int(m.sum()) for k, m in masks.items()}


@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json"])
def test_regrowth_run_frozen_entries_counts_world_sizes_and_resume(toy, tmp_path, ds):
    ref = tmp_path / "ref"
    launch(2, base_overrides(toy, ref, **REGROW), ds)
    ckpts = {int(p.name.split("-")[1]): p for p in complete_checkpoints(ref)}
    assert sorted(ckpts) == list(range(1, 8))
    adapters = {0: load_file(str(ref / "init_adapter_model.safetensors"))}
    adapters.update({s: load_file(str(p / "adapter_model.safetensors")) for s, p in ckpts.items()})
    adapters[8] = load_file(str(ref / "adapter_model.safetensors"))
    masks = {s: load_masks(p / "fish_mask.safetensors") for s, p in ckpts.items()}  # the mask after step s
    masks[8] = load_masks(ref / "fish_mask.safetensors")  # the final mask
    masks[0] = masks[1]  # no regrowth after step 1: the mask fixed before training
    counts = _counts(masks[0])
    for s in range(8):
        assert _counts(masks[s + 1]) == counts, f"per-tensor counts changed at step {s + 1}"
        for k, m in masks[s].items():  # entries frozen during step s + 1 did not move, bit for bit
            assert torch.equal(adapters[s + 1][k][~m], adapters[s][k][~m]), (k, s + 1)
    for s in range(1, 8):
        changed = any(not torch.equal(masks[s][k], masks[s - 1][k]) for k in masks[s])
        assert changed == (s in (2, 4, 6)), f"the mask {'did not change' if s in (2, 4, 6) else 'changed'} at {s}"
    assert all(torch.equal(masks[8][k], masks[7][k]) for k in masks[8]), "no regrowth after regrow_until"
    for s in (2, 4, 6):
        state = load_file(str(ckpts[s] / "world_state.safetensors"))
        for k, m in masks[s].items():
            grown = m & ~masks[s - 1][k]
            changed = m ^ masks[s - 1][k]
            name = k.replace(".weight", ".default.weight")
            for key in ("exp_avg", "exp_avg_sq"):  # the moments of dropped and grown entries start at 0
                assert not bool(state[f"{key}/{name}"][changed].any()), (s, k, key)
            still = grown & masks[8][k]  # grown entries train from their value at growth
            moved = adapters[8][k][still] != adapters[s][k][still]
            assert int(moved.sum()) >= 0.9 * int(still.sum()), (s, k, int(moved.sum()), int(still.sum()))
        assert (ckpts[s] / "regrow-rank1.safetensors").is_file()
    report = json.loads((ref / "fish_report.json").read_text())
    events = report["regrowth"]["events"]
    assert [e["step"] for e in events] == [2, 4, 6]
    for e in events:
        assert e["dropped"] == e["grown"] and sum(e["grown"].values()) > 0
        assert e["grown"].get("lora_A", 0) > 0 and e["grown"].get("lora_B", 0) > 0
    assert report["selected"] == sum(counts.values())

    # resume from the checkpoint after step 3: after the regrowth at 2, with step 3's gradients summed
    out = tmp_path / "resumed"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("fish_report.json", "adapter_*", "probe_logits*"))
    for s in range(4, 8):
        shutil.rmtree(out / "checkpoints" / f"step-{s:08d}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 3))
    launch(2, base_overrides(toy, out, **REGROW), ds)
    final = load_file(str(out / "adapter_model.safetensors"))
    for k, v in adapters[8].items():
        assert torch.equal(final[k], v), f"{k} differs after a resume across the regrowth at step 4"
    resumed_masks = load_masks(out / "fish_mask.safetensors")
    assert all(torch.equal(resumed_masks[k], masks[8][k]) for k in masks[8])
    assert json.loads((out / "fish_report.json").read_text())["regrowth"]["events"] == events

    if ds == "zero3.json":  # 1 rank with the same global batch: the same masks at every checkpoint (fp32)
        one = tmp_path / "one"
        launch(1, base_overrides(toy, one, **REGROW, **{"train.grad_accum": 2}), ds)
        for s, p in complete_checkpoints_by_step(one).items():
            m = load_masks(p / "fish_mask.safetensors")
            assert all(torch.equal(m[k], masks[s][k]) for k in m), f"1 rank and 2 ranks differ after step {s}"
        m = load_masks(one / "fish_mask.safetensors")
        assert all(torch.equal(m[k], masks[8][k]) for k in m)


def complete_checkpoints_by_step(out):
    return {int(p.name.split("-")[1]): p for p in complete_checkpoints(out)}
