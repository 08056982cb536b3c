"""fish.head_steps: the refusals (single process, no weights read) and the default dense steps around them.

The run itself (head-only steps, then dense steps, then masked training) is checked in tests/test_classification.py.
"""

from __future__ import annotations

import pytest
from conftest import base_overrides
from test_bad_input import broken_weights_model, launch_train  # noqa: F401 - fixture reused
from test_bad_input_more import _isolated_process_group  # noqa: F401 - autouse fixture reused

from fishds.config import ConfigError, load_config

NEED = ["model.name_or_path=m", "data.path=d.jsonl", "output_dir=o"]
CLS = [*NEED, "data.format=classification"]


def test_head_steps_without_classification_data_is_refused_before_weights_load(
    toy, tmp_path, capsys, broken_weights_model
):
    ov = base_overrides(toy, tmp_path / "out", **{"model.name_or_path": broken_weights_model, "fish.head_steps": 2})
    assert launch_train.main(ov) == 2
    err = capsys.readouterr().err
    assert "fish.head_steps=2 trains only a classification head" in err and "data.format=alpaca" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="head_steps"):
        load_config(None, [*CLS, "fish.head_steps=-1"])


def test_head_steps_leaving_no_masked_step_are_refused():
    from fishds.run.schedule import total_steps

    def steps(*over):
        return total_steps(load_config(None, [*CLS, *over]), 1000, 2)

    with pytest.raises(ConfigError, match=r"fish\.head_steps=2 \+ fish\.dense_steps=2 leaves no masked step: "):
        steps("train.max_steps=4", "fish.head_steps=2", "fish.dense_steps=2")
    with pytest.raises(ConfigError, match=r"fish\.head_steps=4 leaves no masked step: train\.max_steps=4"):
        steps("train.max_steps=4", "fish.head_steps=4", "fish.dense_steps=0")
    with pytest.raises(ConfigError, match=r"fish\.head_steps=4 leaves no step that trains the adapter"):
        steps("train.max_steps=4", "fish.head_steps=4", "fish.selection=dense")
    assert steps("train.max_steps=5", "fish.head_steps=2", "fish.dense_steps=2") == 5
    assert steps("train.max_steps=3", "fish.head_steps=2", "fish.selection=dense") == 3


def test_default_dense_steps_count_the_steps_after_the_head_steps():
    from fishds.run.schedule import total_steps

    f = load_config(None, [*CLS, "fish.head_steps=10"]).fish
    assert [f.dense_steps_for(n) for n in (11, 12, 30, 110, 500)] == [0, 1, 4, 20, 20]
    cfg = load_config(None, [*CLS, "fish.head_steps=10", "train.max_steps=40"])
    assert total_steps(cfg, 1000, 1) == 40 and cfg.fish.dense_steps == 6  # (40 - 10) // 5
    assert load_config(None, CLS).fish.head_steps == 0  # the default: no head steps


def test_head_steps_with_a_mask_file_or_in_the_hf_callback_are_refused():
    from fishds.integrations.hf import FishError, fish_section

    with pytest.raises(ConfigError, match=r"fish\.mask_path='m\.safetensors' fixes the mask .* fish\.head_steps=3"):
        load_config(None, [*CLS, "fish.mask_path=m.safetensors", "fish.head_steps=3"])
    with pytest.raises(FishError, match=r"FishCallback: head_steps=2 \(fish\.head_steps\) is not supported"):
        fish_section(head_steps=2)
    assert fish_section(head_steps=0).head_steps == 0
