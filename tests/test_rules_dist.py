"""Selection rules on real ranks (tests/rules_case.py: every rule on one engine per launch): exact k, the same masks
on 1 rank (ZeRO-0) and 2 ranks (ZeRO-3), every score against a plain PyTorch reference, masks that follow the
scores and their allocation, and the controls."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import base_overrides, launch
from reference import reference_moments, reference_warmup
from safetensors.torch import load_file

from fishds.config import load_config
from fishds.fish.allocation import module_of, proportional_quotas
from fishds.fish.scores import SNR_EPS

K = 224  # keep_ratio 0.25 of the toy pool (896)
PHASE_A = (
    "fisher",
    "lowest",
    "fisher_tensor",
    "saliency_module",
    "snr_ab",
    "saliency_matched",
    "random_tensor",
    "random_ab",
    "random_b_only",
)
PHASE_B = ("adam_v_tensor", "movement_module", "movement")
SCORE_FILE = {
    "fisher": "fisher",
    "lowest": "fisher",
    "fisher_tensor": "fisher",
    "saliency_module": "saliency",
    "snr_ab": "snr",
    "saliency_matched": "saliency",
    "adam_v_tensor": "adam_v",
    "movement_module": "movement",
    "movement": "movement",
}


@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    out = {}
    for ranks, ds in ((1, "zero0.json"), (2, "zero3.json")):
        d = root / f"w{ranks}"
        ov = base_overrides(toy, d, **{"train.grad_clip": 0, "train.weight_decay": 0.01})
        launch(ranks, [f"--out={d}"] + ov, ds, script="tests/rules_case.py")
        out[ranks] = (d, ov)
    return out


def masks_of(d, name):
    return {n: m.bool() for n, m in load_file(str(d / name / "masks.safetensors")).items()}


def scores_of(d, name):
    return load_file(str(d / name / f"{SCORE_FILE[name]}_scores.safetensors"))


def flat(by_name):
    return torch.cat([by_name[n].reshape(-1) for n in sorted(by_name)])


def test_every_rule_exact_k_and_same_masks_on_1_and_2_ranks(runs):
    (one, _), (two, _) = runs[1], runs[2]
    for name in PHASE_A + PHASE_B:
        for d in (one, two):
            m = masks_of(d, name)
            assert sum(int(v.sum()) for v in m.values()) == K, (name, d)
            report = json.loads((d / name / "report.json").read_text())
            assert report["k"] == K and report["score"] and report["allocation"]
    for name in PHASE_A:  # the same adapter state on both world sizes: the same mask bit for bit
        a, b = masks_of(one, name), masks_of(two, name)
        assert sorted(a) == sorted(b)
        for n in a:
            assert torch.equal(a[n], b[n]), (name, n)


@pytest.mark.parametrize("ranks", [1, 2])
def test_pass_scores_match_plain_pytorch(runs, ranks):
    d, ov = runs[ranks]
    cfg = load_config(None, ov)
    state = load_file(str(d / "state_a.safetensors"))
    sq, sm = reference_moments(cfg, state)
    fisher, saliency, snr = scores_of(d, "fisher"), scores_of(d, "saliency_module"), scores_of(d, "snr_ab")
    for n in sq:
        ref_sal = (state[n].double() * sm[n]).abs()
        ref_snr = sm[n].abs() / (sq[n] + SNR_EPS).sqrt()
        torch.testing.assert_close(fisher[n].double(), sq[n], rtol=1e-4, atol=1e-6 * float(sq[n].max()))
        torch.testing.assert_close(saliency[n].double(), ref_sal, rtol=1e-4, atol=1e-6 * float(ref_sal.max()))
        torch.testing.assert_close(snr[n].double(), ref_snr, rtol=1e-3, atol=1e-4)
    assert all(float(saliency[n].abs().sum()) > 0 for n in sq), "lora_B is non-zero: A and B both score"


@pytest.mark.parametrize("ranks", [1, 2])
def test_warmup_scores_match_plain_pytorch(runs, ranks):
    d, ov = runs[ranks]
    meta = json.loads((d / "meta.json").read_text())
    cfg = load_config(None, ov + [f"fish.dense_steps={meta['warmup']}"])
    state = load_file(str(d / "state_a.safetensors"))
    theta, v = reference_warmup(cfg, state, ranks, meta["warmup"])
    final = load_file(str(d / "final.safetensors"))
    adam_v, movement = scores_of(d, "adam_v_tensor"), scores_of(d, "movement")
    for n in theta:
        torch.testing.assert_close(final[n], theta[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(adam_v[n], v[n], rtol=1e-3, atol=1e-6 * float(v[n].max()))
        torch.testing.assert_close(movement[n], (final[n] - state[n]).abs(), rtol=0, atol=0)
        assert float(movement[n].sum()) > 0


def _top(values: torch.Tensor, q: int) -> torch.Tensor:
    order = sorted(range(values.numel()), key=lambda i: (-values[i].item(), i))[:q]
    sel = torch.zeros(values.numel(), dtype=torch.bool)
    sel[order] = True
    return sel


def test_masks_follow_their_scores_and_allocation(runs):
    d, _ = runs[2]
    names = sorted(masks_of(d, "fisher"))
    sizes = {n: m.numel() for n, m in masks_of(d, "fisher").items()}
    # global: the top-k of the whole pool; lowest: the bottom-k
    assert torch.equal(flat(masks_of(d, "fisher")), _top(flat(scores_of(d, "fisher")), K))
    assert torch.equal(flat(masks_of(d, "lowest")), _top(-flat(scores_of(d, "lowest")), K))
    assert torch.equal(flat(masks_of(d, "movement")), _top(flat(scores_of(d, "movement")), K))
    # tensor: k in proportion to size, the top of each tensor
    quotas = dict(zip(names, proportional_quotas(K, [sizes[n] for n in names], [sizes[n] for n in names])))
    for rule in ("fisher_tensor", "adam_v_tensor"):
        m, s = masks_of(d, rule), scores_of(d, rule)
        for n in names:
            assert torch.equal(m[n].reshape(-1), _top(s[n].reshape(-1), quotas[n])), (rule, n)
    # module: the top of each module (A and B together), every module at least 0.25 x uniform density
    for rule in ("saliency_module", "movement_module"):
        m, s = masks_of(d, rule), scores_of(d, rule)
        for mod in dict.fromkeys(module_of(n) for n in names):
            members = [n for n in names if module_of(n) == mod]
            got = torch.cat([m[n].reshape(-1) for n in members])
            assert torch.equal(got, _top(torch.cat([s[n].reshape(-1) for n in members]), int(got.sum())))
            assert int(got.sum()) >= math.floor(0.25 * K / 896 * got.numel())
    # ab_balanced: the global top-k's count per module, A and B at equal density (within one entry)
    m, s = masks_of(d, "snr_ab"), scores_of(d, "snr_ab")
    glob = _top(flat(s), K)
    offsets, at = {}, 0
    for n in names:
        offsets[n] = (at, at + sizes[n])
        at += sizes[n]
    for mod in dict.fromkeys(module_of(n) for n in names):
        members = [n for n in names if module_of(n) == mod]
        total = sum(int(m[n].sum()) for n in members)
        assert total == sum(int(glob[slice(*offsets[n])].sum()) for n in members)
        msize = sum(sizes[n] for n in members)
        for n in members:
            assert abs(int(m[n].sum()) - total * sizes[n] / msize) < 1
            assert torch.equal(m[n].reshape(-1), _top(s[n].reshape(-1), int(m[n].sum())))


def test_controls(runs):
    d, _ = runs[2]
    rule, matched = masks_of(d, "saliency_module"), masks_of(d, "saliency_matched")
    assert {n: int(v.sum()) for n, v in rule.items()} == {n: int(v.sum()) for n, v in matched.items()}
    assert any(not torch.equal(rule[n], matched[n]) for n in rule), "random entries, not the rule's"
    report = json.loads((d / "saliency_matched" / "report.json").read_text())
    assert report["selection"] == "saliency/module+random_matched" and "rule_share" in report
    b_only = masks_of(d, "random_b_only")
    assert all(int(v.sum()) == 0 for n, v in b_only.items() if ".lora_A." in n)
    b_sizes = {n: v.numel() for n, v in b_only.items() if ".lora_B." in n}
    for n, q in zip(
        sorted(b_sizes),
        proportional_quotas(K, [b_sizes[n] for n in sorted(b_sizes)], [b_sizes[n] for n in sorted(b_sizes)]),
    ):
        assert int(b_only[n].sum()) == q
