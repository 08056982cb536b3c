"""Selection rules, single process: quotas, exact group sums, module names, the tables, config checks, and every
allocation / control on a pool of PEFT-named tensors against a plain sort."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fishds import config as fconfig
from fishds.config import ConfigError, load_config
from fishds.fish.allocation import (
    ALLOCATIONS,
    AllocationContext,
    allocation_report,
    exact_group_sums,
    layer_of,
    module_of,
    proportional_quotas,
    tensor_groups,
)
from fishds.fish.pool import Pool
from fishds.fish.rules import CONTROLS, label
from fishds.fish.scores import SCORES
from fishds.fish.select import exact_topk_grouped, float_keys

BASE = ["model.name_or_path=m", "data.path=d", "output_dir=o"]


def lora_pool(r: int = 4) -> Pool:
    """Two layers x (q: 12x10, v: 6x10) LoRA tensors with PEFT's names (unsorted on purpose)."""
    named = []
    for layer in (1, 0):
        for mod, out in (("v_proj", 6), ("q_proj", 12)):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            named.append((f"{pre}.lora_B.default.weight", torch.nn.Parameter(torch.zeros(out, r))))
            named.append((f"{pre}.lora_A.default.weight", torch.nn.Parameter(torch.zeros(r, 10))))
    return Pool(named)


def test_tables_match_the_config_choices():
    assert set(SCORES) == set(fconfig.SCORES)
    assert set(ALLOCATIONS) == set(fconfig.ALLOCATIONS)
    assert set(CONTROLS) == set(fconfig.CONTROLS)


@pytest.mark.parametrize("seed", range(30))
def test_proportional_quotas_sum_respect_bounds_and_follow_weights(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    caps = [rng.randint(0, 50) for _ in range(n)]
    floors = [rng.randint(0, c) for c in caps] if seed % 2 else None
    weights = [rng.choice([0, 0, rng.randint(1, 10**30)]) for _ in range(n)]
    lo = sum(floors or [0])
    total = rng.randint(lo, sum(caps))
    q = proportional_quotas(total, weights, caps, floors)
    assert sum(q) == total
    assert all((f if floors else 0) <= x <= c for x, c, f in zip(q, caps, floors or [0] * n))
    # water-filling: a group below its cap gets within 1 of its exact proportional share of what is not capped
    f = floors or [0] * n
    above = [x - fi for x, fi in zip(q, f)]
    open_ = [i for i in range(n) if q[i] < caps[i]]
    if any(weights[i] for i in open_) and open_:
        rest = sum(above[i] for i in open_)
        w = sum(weights[i] for i in open_)
        for i in open_:
            assert abs(above[i] - rest * weights[i] / w) < 1 + 1e-9


def test_proportional_quotas_exact_cases():
    assert proportional_quotas(10, [1, 1], [100, 100]) == [5, 5]
    assert proportional_quotas(11, [1, 1], [100, 100]) == [6, 5]  # remainder tie to the lower index
    assert proportional_quotas(10, [9, 1], [3, 100]) == [3, 7]  # capped group filled, the rest re-shared
    assert proportional_quotas(6, [0, 0, 0], [2, 4, 0]) == [2, 4, 0]  # no weight: by the room left
    assert proportional_quotas(5, [0, 1], [10, 10], [2, 0]) == [2, 3]
    with pytest.raises(ValueError):
        proportional_quotas(30, [1, 1], [10, 10])


def test_exact_group_sums_are_exact_and_split_free():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(5000, generator=g) ** 8 * torch.logspace(-30, 10, 5000)  # wide exponent range
    values[::17] = 0.0
    values[3] = 1e-44  # a subnormal
    groups = torch.randint(0, 7, (5000,), generator=g)
    whole = exact_group_sums(values, groups, 7)
    for cut in (1, 1234, 4999):  # as if two ranks held [0, cut) and [cut, end): integer parts add exactly
        parts = [exact_group_sums(values[a:b], groups[a:b], 7) for a, b in ((0, cut), (cut, 5000))]
        assert [x + y for x, y in zip(*parts)] == whole
    for i in range(7):
        ref = math.fsum(float(v) for v in values[groups == i].double())
        assert math.ldexp(float(whole[i]), -149) == pytest.approx(ref, rel=1e-15)


def test_module_and_layer_names():
    a = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert module_of(a) == "base_model.model.model.layers.3.self_attn.q_proj" and layer_of(a) == "3"
    bert = "base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.default.weight"
    assert module_of(bert).endswith("attention.self.value") and layer_of(bert) == "5"
    assert module_of("base_model.model.model.layers.0.mlp.ia3_l.default") == "base_model.model.model.layers.0.mlp"
    assert module_of("model.layers.1.mlp.down_proj.adapter.up.weight") == "model.layers.1.mlp.down_proj.adapter"
    assert layer_of("base_model.model.classifier.weight") == "other"


def _select(pool: Pool, values: torch.Tensor, k: int, allocation: str, min_density: float = 0.25):
    keys = float_keys(values)
    fish = load_config(None, BASE + [f"fish.min_density={min_density}"]).fish
    ctx = AllocationContext(pool, k, 0, pool.size, values, keys, fish, {})
    groups, quotas = ALLOCATIONS[allocation].groups_and_quotas(ctx)
    return exact_topk_grouped(keys, groups, quotas)[0], groups, quotas, ctx.info


def _sorted_topk(values: torch.Tensor, idx: torch.Tensor, q: int) -> set[int]:
    order = sorted(idx.tolist(), key=lambda i: (-values[i].item(), i))
    return set(order[:q])


@pytest.mark.parametrize("allocation", [a for a, entry in ALLOCATIONS.items() if entry.select is None])
@pytest.mark.parametrize("k", [1, 57, 300])
def test_allocations_exact_k_quotas_follow_their_rule(allocation, k):
    """The quota allocations; the structured ones (rank, row): tests/test_structured_units.py."""
    pool = lora_pool()
    g = torch.Generator().manual_seed(k)
    values = torch.rand(pool.size, generator=g)
    values[tensor_groups(pool, 0, pool.size) == 0] *= 100  # one tensor dominates the scores
    sel, groups, quotas, info = _select(pool, values, k, allocation)
    assert int(sel.sum()) == k == sum(quotas)
    tg = tensor_groups(pool, 0, pool.size)
    sizes = [t.numel for t in pool.tensors]
    per_tensor = [int(sel[tg == i].sum()) for i in range(len(sizes))]
    if allocation == "global":
        assert set(sel.nonzero().view(-1).tolist()) == _sorted_topk(values, torch.arange(pool.size), k)
        return
    for gid, q in enumerate(quotas):  # inside each group: that group's top-q by score, ties to the lower index
        idx = (groups == gid).nonzero().view(-1)
        assert set(idx[sel[idx]].tolist()) == _sorted_topk(values, idx, q)
    if allocation == "tensor":
        assert all(abs(n - k * s / pool.size) < 1 for n, s in zip(per_tensor, sizes))
    if allocation == "module":
        names = list(dict.fromkeys(module_of(t.name) for t in pool.tensors))
        msize = [sum(t.numel for t in pool.tensors if module_of(t.name) == m) for m in names]
        floor = [math.floor(0.25 * k / pool.size * s) for s in msize]
        assert all(q >= f for q, f in zip(quotas, floor))
        top = names.index(module_of(pool.tensors[0].name))
        assert quotas[top] == max(quotas) and abs(sum(info["module_importance"].values()) - 1) < 1e-9
    if allocation == "ab_balanced":  # per module: the global top-k count, at equal density over A and B
        glob = _select(pool, values, k, "global")[0]
        for m in dict.fromkeys(module_of(t.name) for t in pool.tensors):
            members = [i for i, t in enumerate(pool.tensors) if module_of(t.name) == m]
            assert sum(per_tensor[i] for i in members) == sum(int(glob[tg == i].sum()) for i in members)
            total = sum(per_tensor[i] for i in members)
            msize = sum(sizes[i] for i in members)
            assert all(abs(per_tensor[i] - total * sizes[i] / msize) < 1 for i in members)


def test_module_allocation_min_density_floor():
    pool = lora_pool()
    values = torch.zeros(pool.size)
    values[:10] = 1.0  # all importance in the first tensor's module
    k = 60  # below the top module's size: it takes everything above the other modules' floors
    _, _, quotas, _ = _select(pool, values, k, "module", min_density=0.5)
    names = list(dict.fromkeys(module_of(t.name) for t in pool.tensors))
    msize = [sum(t.numel for t in pool.tensors if module_of(t.name) == m) for m in names]
    floors = [math.floor(0.5 * k * s / pool.size) for s in msize]
    top = names.index(module_of(pool.tensors[0].name))
    assert all(q == f for i, (q, f) in enumerate(zip(quotas, floors)) if i != top)
    assert quotas[top] == k - sum(f for i, f in enumerate(floors) if i != top)


def test_allocation_report_coverage_and_layers():
    pool = lora_pool()
    masks = {t.name: torch.zeros(t.shape, dtype=torch.bool) for t in pool.tensors}
    b = next(t for t in pool.tensors if "layers.0.self_attn.q_proj.lora_B" in t.name)
    masks[b.name][:3, :] = True  # 3 whole rows of a 12 x 4 B
    rep = allocation_report(pool, masks)
    assert rep["per_layer"]["0"]["selected"] == 12 and rep["per_layer"]["1"]["selected"] == 0
    assert rep["coverage_per_tensor"][b.name] == {"rows_covered": 3, "rows": 12, "cols_covered": 4, "cols": 4}
    cov = rep["coverage"]["lora_B"]
    assert cov["rows"] == 2 * (12 + 6) and cov["rows_covered"] == 3 and cov["cols_covered"] == 4
    assert rep["per_adapted_module"]["base_model.model.model.layers.0.self_attn.q_proj"]["selected"] == 12


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["fish.score=adam_v", "fish.dense_steps=0"], "fish.dense_steps"),
        (["fish.score=movement", "fish.dense_steps=0"], "fish.dense_steps"),
        (["fish.score=random", "fish.allocation=module"], "fish.allocation=module"),
        (["fish.selection=random", "fish.score=saliency"], "fish.score"),
        (["fish.score=random", "fish.control=random_matched"], "fish.control=random_matched"),
        (["fish.allocation=layer"], "fish.allocation"),
        (["fish.min_density=2"], "fish.min_density"),
    ],
)
def test_bad_rule_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, BASE + overrides)


def test_selection_is_the_shorthand_for_score_and_labels():
    f = load_config(None, BASE + ["fish.selection=lowest"]).fish
    assert f.score == "lowest" and label(f) == "lowest"
    f = load_config(None, BASE + ["fish.score=saliency", "fish.allocation=module"]).fish
    assert label(f) == "saliency/module"
    f = load_config(None, BASE + ["fish.score=snr", "fish.control=random_matched"]).fish
    assert label(f) == "snr+random_matched"
    f = load_config(None, BASE + ["fish.selection=dense"]).fish
    assert f.score is None and label(f) == "dense"
    assert load_config(None, BASE).fish.score == "fisher"


def test_default_rule_never_scores_at_init_and_the_paper_is_one_switch_away():
    """Defaults (chosen from bench/results/compare-*): Fisher, global top-k, scored after min(20, steps // 5)
    dense steps (at least 1); fish.dense_steps=0 is the paper's exact rule. Resolved once per run by total_steps."""
    from fishds.config import DEFAULT_DENSE_STEPS
    from fishds.run.schedule import total_steps

    f = load_config(None, BASE).fish
    assert (f.score, f.allocation, f.control, f.dense_steps) == ("fisher", "global", "none", None)
    assert [f.dense_steps_for(n) for n in (1, 2, 4, 10, 60, 100, 5000)] == [0, 1, 1, 2, 12, 20, DEFAULT_DENSE_STEPS]
    assert load_config(None, BASE + ["fish.dense_steps=0"]).fish.dense_steps_for(100) == 0  # the paper
    assert load_config(None, BASE + ["fish.dense_steps=7"]).fish.dense_steps_for(100) == 7
    assert load_config(None, BASE + ["fish.selection=dense"]).fish.dense_steps_for(100) == 0
    for rule in (["fish.selection=random"], ["fish.control=random_b_only"], ["fish.mask_path=m.safetensors"]):
        assert load_config(None, BASE + rule).fish.dense_steps_for(100) == 0, rule  # nothing read from training
    assert load_config(None, BASE + ["fish.control=random_matched"]).fish.dense_steps_for(100) == 20
    for steps, dense in ((100, 20), (30, 6)):
        cfg = load_config(None, BASE + [f"train.max_steps={steps}"])
        assert total_steps(cfg, 1000, 1) == steps and cfg.fish.dense_steps == dense  # an int from here on
    # adam_v and movement are read after the dense steps: valid with the default, refused with 0 (above)
    assert load_config(None, BASE + ["fish.score=adam_v"]).fish.dense_steps_for(100) == 20
