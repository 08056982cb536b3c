"""Per-example Fisher in one batched pass (fish.per_example=batched) gives the loop's scores.

In one process (the toy Llama, adapters perturbed so that no score is trivially zero) and on 2 real ranks under
ZeRO-3 (tests/per_example_case.py: LoRA and bottleneck in one launch); padding and prompt tokens contribute
nothing; parameters without a batched rule are looped and named in the log; a rule that fails the first-batch
check against autograd's gradient falls back to the loop.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_overrides, launch

from fishds.config import load_config
from fishds.fish.fisher import collect_scores
from fishds.fish.pool import Pool
from fishds.integrations.hf import _TorchOptimizerEngine
from fishds.model import load_peft_model, load_tokenizer
from fishds.run.data import Collator, load_examples

REL = 1e-5  # max |batched - loop| / max score, fp32


def _setup(toy, tmp_path, method: str, n: int = 10):
    cfg = load_config(None, base_overrides(toy, tmp_path / "out", **{"peft.method": method}))
    tok = load_tokenizer(cfg.model.name_or_path)
    examples = load_examples(tok, cfg.data.path, "data.path", cfg.data, None, cache=tmp_path / "cache")[:n]
    model = load_peft_model(cfg, cfg.model.name_or_path, torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B (bottleneck's up) starts at zero: move every adapter tensor a little
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    engine = _TorchOptimizerEngine(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    return engine, Pool.from_model(model), examples, Collator(tok.pad_token_id)


def _scores(engine, pool, examples, collate, mode, mbs=4):
    return collect_scores(engine, pool, examples, "sample", mbs, collate, per_example=mode)


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("method", ["lora", "bottleneck", "ia3", "rslora"])
def test_batched_matches_loop_one_process(toy, tmp_path, method):
    engine, pool, examples, collate = _setup(toy, tmp_path, method)
    loop, st_loop = _scores(engine, pool, examples, collate, "loop")
    batched, st = _scores(engine, pool, examples, collate, "batched")
    assert _rel(loop, batched) <= REL
    assert int((loop > 0).sum()) > 0.9 * loop.numel()  # informative scores, not zeros compared with zeros
    assert st["looped_tensors"] == 0 and st["passes_per_rank"] == 3 and st_loop["passes_per_rank"] == 10


def test_padding_and_prompt_tokens_excluded(toy, tmp_path):
    """A short example batched with a longer one (so padded) scores as it does alone."""
    engine, pool, examples, collate = _setup(toy, tmp_path, "lora", n=64)
    lengths = [len(e["input_ids"]) for e in examples]
    short, long_ = examples[lengths.index(min(lengths))], examples[lengths.index(max(lengths))]
    assert len(long_["input_ids"]) > len(short["input_ids"]) and -100 in short["labels"]  # padding and a prompt
    pair, _ = _scores(engine, pool, [short, long_], collate, "batched", mbs=2)
    alone_long, _ = _scores(engine, pool, [long_], collate, "batched", mbs=2)
    alone_short, _ = _scores(engine, pool, [short], collate, "loop")
    assert _rel(alone_short, pair - alone_long) <= 1e-4  # a difference of sums: rounding of the larger sum
    assert _rel(alone_short, pair) > 1e-2  # the long example does contribute to the pair


def test_fallback_loops_and_names_uncovered_tensors(toy, tmp_path, capsys):
    """DoRA's layers read their weights outside the module forward: every DoRA tensor is looped, and named."""
    engine, pool, examples, collate = _setup(toy, tmp_path, "dora")
    loop, _ = _scores(engine, pool, examples, collate, "loop")
    capsys.readouterr()
    batched, st = _scores(engine, pool, examples, collate, "batched")
    log = capsys.readouterr().out
    assert _rel(loop, batched) <= REL
    assert st["looped_tensors"] == len(pool.tensors)
    assert log.count("[fishds] per-example Fisher: no batched rule") == 1
    assert all(t.name in log for t in pool.tensors), log


def test_first_batch_check_sends_a_wrong_rule_to_the_loop(toy, tmp_path, capsys, monkeypatch):
    """If a rule's summed per-example gradient disagrees with autograd's, its tensors are looped (same scores)."""
    from fishds.fish import per_example

    engine, pool, examples, collate = _setup(toy, tmp_path, "lora")
    loop, _ = _scores(engine, pool, examples, collate, "loop")
    real = per_example.BatchedFisher.summed

    def wrong(grads, spans, b):
        out = real(grads, spans, b)
        return {i: v * 2 if "lora_B" in pool.tensors[i].name else v for i, v in out.items()}

    monkeypatch.setattr(per_example.BatchedFisher, "summed", staticmethod(wrong))
    capsys.readouterr()
    batched, st = _scores(engine, pool, examples, collate, "batched")
    log = capsys.readouterr().out
    assert _rel(loop, batched) <= REL
    lora_b = [t.name for t in pool.tensors if "lora_B" in t.name]
    assert st["looped_tensors"] == len(lora_b) and all(n in log for n in lora_b)
    assert not any("lora_A" in part for part in log.split(": ")[-1].split(", "))


def test_batched_matches_loop_two_ranks_zero3(toy, tmp_path):
    """2 ranks, ZeRO-3, after 2 dense steps: LoRA and bottleneck, batched against loop on the same engine."""
    out = tmp_path / "z3"
    ov = base_overrides(toy, out, **{"fish.num_samples": 10, "overwrite": "true"})
    launch(2, ["--methods", "lora,bottleneck"] + ov, "zero3.json", script="tests/per_example_case.py")
    res = json.loads((out / "per_example.json").read_text())
    for method in ("lora", "bottleneck"):
        r = res[method]
        assert r["max_score"] > 0 and r["max_abs_diff"] <= REL * r["max_score"], (method, r)
        assert r["looped_tensors"] == 0 and r["passes_batched"] == 2 and r["passes_loop"] == 5, (method, r)
