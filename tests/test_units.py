"""Single-process units: exact top-k with ties, random keys, packed-bit masks, pool chunks, config overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fishds.config import ConfigError, load_config
from fishds.fish.mask import FORMAT, load_masks, pack_bits, save_masks, unpack_bits
from fishds.fish.pool import Pool
from fishds.fish.select import exact_topk, float_keys, key_to_float, random_keys


def _reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(scores.numel()), key=lambda i: (-scores[i].item(), i))[:k]
    ref = torch.zeros(scores.numel(), dtype=torch.bool)
    ref[order] = True
    return ref


@pytest.mark.parametrize("seed", range(40))
def test_exact_topk_matches_sort_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 400, (1,), generator=g))
    scores = torch.randint(0, 5, (n,), generator=g).float() * 0.37 - (seed % 3)  # many ties, some negative
    if seed % 4 == 0:
        scores = torch.randn(n, generator=g)
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    sel, t = exact_topk(float_keys(scores), k)
    assert int(sel.sum()) == k
    assert torch.equal(sel, _reference(scores, k))
    assert key_to_float(t) == scores[sel].min().item()


def test_exact_topk_rejects_k_outside_pool():
    with pytest.raises(ValueError, match="between 1 and the pool size"):
        exact_topk(float_keys(torch.ones(5)), 6)


def test_random_keys_depend_on_global_index_and_seed_only():
    full = random_keys(0, 1000, seed=3)
    assert torch.equal(torch.cat([random_keys(0, 400, 3), random_keys(400, 1000, 3)]), full)
    assert not torch.equal(full, random_keys(0, 1000, seed=4))
    assert full.unique().numel() > 990


def test_packbits_matches_numpy_and_roundtrips(tmp_path):
    m = torch.rand(7, 13) > 0.5
    assert np.array_equal(pack_bits(m).numpy(), np.packbits(m.numpy().reshape(-1)))
    assert torch.equal(unpack_bits(pack_bits(m), m.numel()).view(7, 13), m)
    save_masks(tmp_path / "m.safetensors", {"a.lora_A.weight": m})
    assert torch.equal(load_masks(tmp_path / "m.safetensors")["a.lora_A.weight"], m)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == FORMAT and json.loads(meta["a.lora_A.weight"]) == [7, 13]
        assert f.get_tensor("a.lora_A.weight").dtype == torch.uint8


def test_load_masks_refuses_other_files(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a fishds mask file"):
        load_masks(tmp_path / "x.safetensors")


def test_pool_order_and_chunks():
    params = [("b.weight", torch.nn.Parameter(torch.zeros(3, 5))), ("a.weight", torch.nn.Parameter(torch.zeros(7)))]
    pool = Pool(params)
    assert [t.name for t in pool.tensors] == ["a.weight", "b.weight"] and pool.size == 22
    for world in (1, 2, 3, 4):
        chunks = [pool.chunk(r, world) for r in range(world)]
        assert chunks[0][0] == 0 and chunks[-1][1] == 22
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(s % 8 == 0 for s, e in chunks if e > s)
    assert pool.num_selected(0.5, None) == 11 and pool.num_selected(None, 22) == 22
    with pytest.raises(ValueError, match="num_selected"):
        pool.num_selected(None, 23)


def test_overrides_are_typed_and_unknown_keys_suggest(tmp_path):
    cfg = load_config(
        None,
        [
            "model.name_or_path=m",
            "data.path=d",
            "output_dir=o",
            "fish.keep_ratio=0.1",
            "peft.target_modules=[q_proj,v_proj]",
            "train.max_steps=7",
        ],
    )
    assert cfg.fish.keep_ratio == 0.1 and cfg.peft.target_modules == ["q_proj", "v_proj"] and cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="did you mean 'fish.keep_ratio'"):
        load_config(None, ["model.name_or_path=m", "data.path=d", "output_dir=o", "fish.keep_ratoi=0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_readme_config_reference_is_current():
    from pathlib import Path

    from fishds.config import config_reference

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert config_reference() in page, "regenerate docs/configuration.md's reference: fishds.config.config_reference()"
    assert "PydanticUndefined" not in page
