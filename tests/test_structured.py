"""Structured allocations on real ranks: fish.allocation=rank (score grad, A trained) and fish.allocation=row (score
fisher, fish.freeze: [lora_A]) on a toy Llama whose lora_B rows are cut by the 2-rank chunk boundary (hidden 40,
r 5: the pool is 2 x (40 + 20) rows of 5, chunks of 304 entries): exact quotas, the same masks on 1 rank (ZeRO-0)
and 2 ranks (ZeRO-2 / ZeRO-3), scores against a plain PyTorch reference, the rank-sliced adapter loading in peft
with the trained model's logits, and frozen lora_A saved at its initialisation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_overrides, launch
from reference import initial_model, reference_moments
from safetensors.torch import load_file
from test_distributed import assert_logits_reproduced
from toy import make_tiny_llama

from fishds.config import load_config
from fishds.fish.mask import load_masks

R, KEEP = 5, 2
RULES = {
    "rank": {"fish.allocation": "rank", "fish.score": "grad"},
    "row": {"fish.allocation": "row", "fish.score": "fisher", "fish.freeze": "[lora_A]"},
}
# frozen lora_A under ZeRO-3 (partitioned, gathered to be saved); the rank-sliced save under ZeRO-2
RANKS = {"rank": (("zero0.json", 1), ("zero2.json", 2)), "row": (("zero0.json", 1), ("zero3.json", 2))}


@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    model = make_tiny_llama(root / "model40", hidden=40)
    out = {}
    for name, rule in RULES.items():
        for ds, ranks in RANKS[name]:
            d = root / f"{name}-w{ranks}"
            ov = base_overrides(
                {**toy, "model": str(model)},
                d,
                **{"peft.r": R, "peft.alpha": 2 * R, "fish.keep_ratio": KEEP / R, "fish.save_scores": "true"},
                **rule,
            )
            launch(ranks, ov, ds)
            out[(name, ranks)] = (d, ov)
    return out


def _files(d):
    return (
        load_file(str(d / "adapter_model.safetensors")),
        load_masks(d / "fish_mask.safetensors"),
        json.loads((d / "fish_report.json").read_text()),
    )


def _reference(ov):
    cfg = load_config(None, ov)
    sq, sm = reference_moments(cfg, {})  # at initialisation (fish.dense_steps=0): the run's own seeded adapter
    return cfg, sq, sm


def test_rank_components_exact_same_on_1_and_2_ranks_and_chosen_by_the_grad_norm(runs):
    d2, ov = runs[("rank", 2)]
    d1, _ = runs[("rank", 1)]
    _, m1, _ = _files(d1)
    adapter, m2, report = _files(d2)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert report["budget"]["rank_keep"] == KEEP and report["saved_rank"] == KEEP
    assert report["selected"] == report["k"] == sum(int(m.sum()) for m in m2.values())
    cfg, _, sm = _reference(ov)
    scores = load_file(str(d2 / "grad_scores.safetensors"))
    for name, b in sm.items():
        if ".lora_B." not in name:
            continue
        torch.testing.assert_close(scores[name], b.abs().float(), rtol=1e-4, atol=1e-9)
        key = next(k for k in m2 if k.startswith(name.split(".lora_B.")[0].removesuffix(".default")) and "lora_B" in k)
        mb = m2[key]
        ma = m2[key.replace("lora_B", "lora_A")]
        cols = mb.any(0)
        assert int(cols.sum()) == KEEP and bool((mb.all(0) == cols).all()) and torch.equal(ma.all(1), cols)
        norms = (b**2).sum(0)
        want = sorted(sorted(range(R), key=lambda j: (-float(norms[j]), j))[:KEEP])
        assert cols.nonzero().view(-1).tolist() == want, name
    # the saved adapter: a plain LoRA of rank r_keep, reproducing the trained engine's logits in peft
    assert json.loads((d2 / "adapter_config.json").read_text())["r"] == KEEP
    assert all(v.shape[0 if "lora_A" in k else 1] == KEEP for k, v in adapter.items())
    assert_logits_reproduced(d2, ov)


def test_row_quota_exact_same_on_1_and_2_ranks_frozen_a_saved_and_fisher_reference(runs):
    d2, ov = runs[("row", 2)]
    d1, _ = runs[("row", 1)]
    _, m1, _ = _files(d1)
    adapter, m2, report = _files(d2)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert all("lora_B" in k for k in m2), "lora_A is frozen: outside the pool and the mask"
    assert all(bool((m.sum(1) == KEEP).all()) for m in m2.values())
    rows = sum(m.shape[0] for m in m2.values())
    assert rows == 2 * (40 + 20)
    assert report["budget"]["row_keep"] == KEEP and report["k"] == KEEP * rows == report["selected"]
    assert report["budget"]["baseline_trainable"] == KEEP * rows  # plain LoRA r=3 with lora_A frozen: same count
    cfg, sq, _ = _reference(ov)
    scores = load_file(str(d2 / "fisher_scores.safetensors"))
    init = {n: p.detach() for n, p in initial_model(cfg).named_parameters() if "lora_A" in n}
    for name, b in sq.items():
        if ".lora_B." in name:
            torch.testing.assert_close(scores[name], b.float(), rtol=1e-4, atol=1e-12)
    assert sum("lora_A" in key for key in adapter) == len(m2), "every frozen lora_A is saved with the adapter"
    for key, v in adapter.items():
        if "lora_A" in key:  # frozen at its initialisation, and saved
            tail = key.split("base_model.model.")[1]
            ref = next(p for n, p in init.items() if n.replace(".default", "").endswith(tail))
            assert torch.equal(v, ref), key
        else:  # unselected lora_B entries stayed 0, selected ones trained
            m = m2[key]
            assert bool((v[~m] == 0).all()) and bool((v[m] != 0).all()), key
    assert_logits_reproduced(d2, ov)
