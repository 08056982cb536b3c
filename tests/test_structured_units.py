"""Structured allocations (fish.allocation rank and row), the grad score, the bottom control and fish.freeze, single
process: exact quotas, choices against plain Python sorts, cut rows decided the same for any split of the pool, the
rank-sliced adapter, and the config checks."""

from __future__ import annotations

import math

import pytest
import torch
from test_rules_units import BASE, lora_pool

from fishds.config import ConfigError, load_config
from fishds.fish.adapter import rank_sliced
from fishds.fish.allocation import (
    ALLOCATIONS,
    AllocationContext,
    exact_group_sums,
    rank_keep,
    row_cut,
    row_keep,
    row_local,
)
from fishds.fish.config import check_run
from fishds.fish.pool import Pool
from fishds.fish.select import float_keys, random_keys


def b_pool(r: int = 6) -> Pool:
    return Pool([(t.name, t.param) for t in lora_pool(r).tensors if ".lora_B." in t.name])


def _ctx(pool, values, k, reverse=False, power=1, random=False, seed=0):
    fish = load_config(None, BASE + [f"fish.seed={seed}"]).fish
    keys = random_keys(0, pool.size, seed) if random else float_keys(values)
    if reverse:
        keys = -keys - 1
    vals = None if random else values
    return AllocationContext(pool, k, 0, pool.size, vals, keys, fish, {}, reverse=reverse, component_power=power)


def _components(pool: Pool, sel: torch.Tensor) -> dict[str, list[int]]:
    """Module -> the component indices whose lora_B column is selected; asserts whole components."""
    masks = pool.split(sel)
    out = {}
    for t in pool.tensors:
        if ".lora_B." not in t.name:
            continue
        m = masks[t.name]
        cols = m.any(0)
        assert bool((m.all(0) == cols).all()), f"{t.name}: a component's lora_B column is not whole"
        a = t.name.replace(".lora_B.", ".lora_A.")
        if a in masks:
            assert torch.equal(masks[a].all(1), cols) and torch.equal(masks[a].any(1), cols), "lora_A rows not whole"
        out[t.name.split(".lora_B.")[0]] = cols.nonzero().view(-1).tolist()
    return out


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_rank_keeps_the_best_whole_components_per_module(power, reverse):
    r = 6
    pool = lora_pool(r)
    g = torch.Generator().manual_seed(power + 2 * reverse)
    values = torch.rand(pool.size, generator=g)
    values[:40] = 0.0  # ties at 0 break to the lowest component index
    per = sum(t.shape[0] if ".lora_B." in t.name else t.shape[1] for t in pool.tensors)
    k = 2 * per
    assert rank_keep(pool, k) == 2
    ctx = _ctx(pool, values, k, reverse=reverse, power=power)
    sel = ALLOCATIONS["rank"].local_selection(ctx)[0]
    assert int(sel.sum()) == k
    got = _components(pool, sel)
    split = pool.split(values)
    for t in pool.tensors:
        if ".lora_B." not in t.name:
            continue
        col = [math.fsum(float(v) ** power for v in split[t.name][:, j].double()) for j in range(r)]
        order = sorted(range(r), key=lambda j: ((col[j] if reverse else -col[j]), j))
        assert got[t.name.split(".lora_B.")[0]] == sorted(order[:2])
    assert ctx.info["r_keep"] == 2 and ctx.info["components"] == {m: c for m, c in got.items()}


def test_rank_sums_are_exact_and_random_components_are_seeded():
    pool = lora_pool(6)
    per = sum(t.shape[0] if ".lora_B." in t.name else t.shape[1] for t in pool.tensors)
    a = ALLOCATIONS["rank"].local_selection(_ctx(pool, None, 3 * per, random=True, seed=1))[0]
    b = ALLOCATIONS["rank"].local_selection(_ctx(pool, None, 3 * per, random=True, seed=1))[0]
    c = ALLOCATIONS["rank"].local_selection(_ctx(pool, None, 3 * per, random=True, seed=2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(v) == 3 for v in _components(pool, a).values())
    v = torch.tensor([1e-30, 1.0, 1e-30, 3.0])  # exact sums: 1 + 1e-30 > 1 is kept, as in Python integers
    sums = exact_group_sums(v, torch.tensor([0, 0, 1, 1]), 2)
    assert sums[0] > 1 << 149 and sums[1] > sums[0]


def test_rank_and_row_refuse_budgets_that_do_not_fit():
    pool = lora_pool(4)
    with pytest.raises(ConfigError, match="r_keep"):
        rank_keep(pool, 7)
    with pytest.raises(ConfigError, match="fish.freeze"):
        row_keep(pool, 10)  # lora_A in the pool
    bp = b_pool(4)
    rows = sum(t.shape[0] for t in bp.tensors)
    assert row_keep(bp, 3 * rows) == 3
    with pytest.raises(ConfigError, match="m entries"):
        row_keep(bp, 3 * rows + 1)
    with pytest.raises(ConfigError, match="LoRA factors only"):
        rank_keep(Pool([("model.layers.0.mlp.ia3_l.default", torch.nn.Parameter(torch.zeros(8)))]), 4)


@pytest.mark.parametrize("random", [False, True])
def test_row_keeps_m_per_row_and_any_split_of_the_pool_gives_the_same_mask(random):
    r, m = 6, 2
    pool = b_pool(r)
    g = torch.Generator().manual_seed(5)
    values = (torch.rand(pool.size, generator=g) * 4).floor()  # many ties: lowest index wins
    ctx = _ctx(pool, values, m * pool.size // r, random=random)
    whole = ALLOCATIONS["row"].local_selection(ctx)[0]
    keys = ctx.keys
    for t, mask in zip(pool.tensors, pool.split(whole).values()):
        assert bool((mask.sum(1) == m).all())
        rows = keys[t.offset : t.offset + t.numel].view(-1, r)
        for i, row in enumerate(rows.tolist()):
            best = sorted(range(r), key=lambda j: (-row[j], j))[:m]
            assert mask[i].nonzero().view(-1).tolist() == sorted(best)
    for bounds in ([0, 7, pool.size], [0, 5, 6, 13, 100, pool.size], [0, 1, 2, 3, pool.size]):
        chunks = list(zip(bounds[:-1], bounds[1:]))
        local = [row_local(pool, keys[a:b], a, b, m) for a, b in chunks]
        parts = [cut for _, cut in local]
        for (a, b), (sel, _) in zip(chunks, local):
            row_cut(pool, parts, a, b, sel, m)
            assert torch.equal(sel, whole[a:b]), (bounds, a, b)


def test_rank_sliced_adapter_keeps_the_function_and_refuses_live_components():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    for rslora in (False, True):
        model = get_peft_model(
            LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=rslora)
        )
        names = [n for n, _ in model.named_parameters() if "lora_" in n]
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
        masks = {}
        for n, v in adapter.items():
            mk = torch.zeros_like(v, dtype=torch.bool)
            if ".lora_B." in n:
                v[:, [0, 2]] = torch.randn(v.shape[0], 2)  # components 0 and 2 trained, 1 and 3 stay 0
                mk[:, [0, 2]] = True
            else:
                mk[[0, 2]] = True
            masks[n] = mk
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in adapter:
                    p.copy_(adapter[n])
        x = torch.randint(0, 40, (2, 5))
        with torch.no_grad():
            want = model(input_ids=x).logits
        sliced, r_keep = rank_sliced(model, adapter, masks)
        assert r_keep == 2 and all(v.shape[0 if ".lora_A." in n else 1] == 2 for n, v in sliced.items())
        small = get_peft_model(
            LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], use_rslora=rslora)
        )
        with torch.no_grad():
            for n, p in small.named_parameters():
                if n in sliced:
                    p.copy_(sliced[n])
                elif "lora_" not in n:
                    p.copy_(dict(model.named_parameters())[n])
            torch.testing.assert_close(small(input_ids=x).logits, want, atol=1e-6, rtol=1e-5)
        live = dict(adapter)
        b = next(n for n in live if ".lora_B." in n)
        live[b] = live[b].clone()
        live[b][:, 1] = 1.0
        with pytest.raises(ValueError, match="not 0"):
            rank_sliced(model, live, masks)


def test_freeze_matching_and_named_pool():
    model = torch.nn.ModuleDict({"q": torch.nn.Linear(2, 2)})
    model.q.lora_A = torch.nn.Linear(2, 1)
    frozen = Pool.freeze_matching(model, ["lora_A"])
    assert frozen == ["q.lora_A.weight", "q.lora_A.bias"]
    assert not model.q.lora_A.weight.requires_grad and model.q.weight.requires_grad
    assert [t.name for t in Pool.named(model, frozen).tensors] == sorted(frozen)
    assert Pool.named(model, []) is None


def _cfg(*extra):
    return load_config(None, BASE + list(extra))


def test_config_checks_of_the_structured_rules():
    ds: dict = {}
    with pytest.raises(ConfigError, match="fish.freeze"):
        check_run(_cfg("fish.allocation=row", "fish.keep_ratio=0.5"), ds)
    check_run(_cfg("fish.allocation=row", "fish.keep_ratio=0.5", "fish.freeze=[lora_A]", "peft.r=8"), ds)
    with pytest.raises(ConfigError, match="whole number"):
        check_run(_cfg("fish.allocation=rank", "fish.keep_ratio=0.3", "peft.r=8"), ds)
    with pytest.raises(ConfigError, match="peft.method=pissa"):
        check_run(_cfg("fish.allocation=rank", "fish.keep_ratio=0.5", "peft.method=pissa"), ds)
    with pytest.raises(ConfigError, match="reset_unselected"):
        _cfg("fish.allocation=rank", "fish.dense_steps=3", "fish.reset_unselected=false")
    with pytest.raises(ConfigError, match="structure of fish.allocation=row"):
        _cfg("fish.allocation=row", "fish.regrow_every=2")
    with pytest.raises(ConfigError, match="fish.control=bottom"):
        _cfg("fish.score=random", "fish.control=bottom")
    # scored at initialisation by default (no dense steps); the global Fisher rule keeps its dense steps
    assert _cfg("fish.allocation=rank", "fish.score=grad").fish.dense_steps_for(100) == 0
    assert _cfg("fish.allocation=row", "fish.score=grad").fish.dense_steps_for(100) == 0
    assert _cfg("fish.score=grad").fish.dense_steps_for(100) == 20
