"""More bad input: each fails before any model weight is read, with a message naming the key.

Like tests/test_bad_input.py, the cases run launch/train.py's main(argv) in-process with a model folder whose
model.safetensors is garbage: the expected message (and return code 2) proves the weights were never read.
Also: more ranks than Fisher samples (a real 2-rank launch), and the NaN/Inf check of the Fisher scores.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import base_overrides, launch
from test_bad_input import broken_weights_model, launch_train  # noqa: F401 - fixture reused


@pytest.fixture(autouse=True)
def _isolated_process_group():
    """Cases that get past preflight start a 1-rank process group in this pytest process (fishds.dist sets RANK,
    MASTER_PORT, ... in os.environ): end it and restore the environment so no later test inherits either."""
    env = dict(os.environ)
    had_group = torch.distributed.is_initialized()
    yield
    if torch.distributed.is_initialized() and not had_group:
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def _fails(argv: list[str], capsys, *expected: str) -> str:
    assert launch_train.main(argv) == 2
    err = capsys.readouterr().err
    for e in expected:
        assert e in err, err
    return err


def _overrides(toy, tmp_path, model: str, **extra) -> list[str]:
    return base_overrides(toy, tmp_path / "out", **{"model.name_or_path": model, **extra})


@pytest.mark.parametrize("key", ["data.path", "data.eval_path"])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_data_file(toy, tmp_path, capsys, broken_weights_model, key, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    _fails(
        _overrides(toy, tmp_path, broken_weights_model, **{key: str(empty)}),
        capsys,
        f"{key}={str(empty)!r}: the file is empty",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name,text,row,field",
    [
        # jsonl: the row number is the line number in the file (blank lines count)
        ("train.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "input": "x"}\n', 3, "output"),
        ("train.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "b"}\n', 2, "instruction"),
        ("train.jsonl", '{"instruction": "a", "output": 7}\n', 1, "output"),  # present but not text
        ("train.jsonl", '{"instruction": "a", "output": "b"}\n["a", "b"]\n', 2, "instruction"),  # not an object
        # json list: the row number is the position in the list (from 1)
        ("train.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', 2, "output"),
    ],
)
def test_row_missing_a_required_field_names_the_row(
    toy, tmp_path, capsys, broken_weights_model, name, text, row, field
):
    bad = tmp_path / name
    bad.write_text(text)
    _fails(
        _overrides(toy, tmp_path, broken_weights_model, **{"data.path": str(bad)}),
        capsys,
        f"data.path={str(bad)!r}: row {row} lacks the text field(s)",
        repr(field),
    )
    assert not (tmp_path / "out").exists()


def test_every_example_longer_than_max_length(toy, tmp_path, capsys, broken_weights_model):
    """The toy prompts are far longer than 9 tokens, so no response token survives truncation. This check needs the
    tokenizer (it runs in train.setup after the process group starts) but no weights."""
    _fails(
        _overrides(toy, tmp_path, broken_weights_model, **{"data.max_length": 9}),
        capsys,
        "data.max_length=9",
        "data.path=",
        "raise data.max_length",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("fish.num_samples=0", "fish.num_samples: Input should be greater than 0"),
        ("fish.num_samples=-3", "fish.num_samples: Input should be greater than 0"),
        ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("peft.r=2.5", "peft.r: Input should be a valid integer"),
        ("data.max_length=[64]", "data.max_length: Input should be a valid integer"),
        ("train.precision=fp16", "train.precision"),
    ],
)
def test_out_of_range_and_wrong_types(toy, tmp_path, capsys, broken_weights_model, override, expected):
    err = _fails(_overrides(toy, tmp_path, broken_weights_model) + [override], capsys, expected)
    assert "invalid configuration" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "ds,expected",
    [
        ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "fp16 is not supported"),
        ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage=5 must be 0, 1, 2 or 3"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            "zero_optimization.offload_param.device=nvme is not supported",
        ),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "remove the scheduler section"),
    ],
)
def test_refused_deepspeed_json(toy, tmp_path, capsys, broken_weights_model, ds, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    _fails(["--ds_config", str(path)] + _overrides(toy, tmp_path, broken_weights_model), capsys, f"{path}: ", expected)
    assert not (tmp_path / "out").exists()


def test_more_ranks_than_fisher_samples(toy, tmp_path, broken_weights_model):
    """2 ranks, fish.num_samples=1: every rank stops (before reading weights) with a message naming the key."""
    out = tmp_path / "out"
    proc = launch(
        2,
        base_overrides(toy, out, **{"model.name_or_path": broken_weights_model, "fish.num_samples": 1}),
        ds_config="zero2.json",
        script="launch/train.py",
        timeout=180,
        expect_ok=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert "fish.num_samples=1 is smaller than the 2 ranks" in text, text[-4000:]
    # the weights are garbage: a rank that read them would fail there (safetensors: "Error while deserializing")
    assert "deserializ" not in text.lower(), text[-4000:]
    assert not (out / "adapter_model.safetensors").exists()


def _tiny_pool():
    from fishds.fish.pool import Pool

    # sorted by name: a.weight holds global indices 0..3, b.weight 4..9, c.bias 10..11
    return Pool(
        [
            ("b.weight", torch.nn.Parameter(torch.zeros(2, 3))),
            ("a.weight", torch.nn.Parameter(torch.zeros(4))),
            ("c.bias", torch.nn.Parameter(torch.zeros(2))),
        ]
    )


@pytest.mark.parametrize(
    "start,bad_at,value,name",
    [
        (0, 5, float("nan"), "b.weight"),  # whole pool on one rank
        (0, 0, float("inf"), "a.weight"),
        (8, 3, float("-inf"), "c.bias"),  # a rank's chunk starting at global index 8: local 3 = global 11
        (8, 0, float("nan"), "b.weight"),  # local 0 = global 8
    ],
)
def test_fisher_scores_nan_or_inf_stop_with_the_parameter_name(start, bad_at, value, name):
    from fishds.fish.fisher import FisherError, check_finite

    pool = _tiny_pool()
    local = torch.rand(pool.size - start)
    check_finite(pool, local, start)  # finite: no error
    local[bad_at] = value
    with pytest.raises(FisherError, match=rf"Fisher scores of {name} contain NaN or Inf"):
        check_finite(pool, local, start)


def test_fisher_check_reports_the_first_bad_parameter_and_accepts_empty_chunks():
    from fishds.fish.fisher import FisherError, check_finite

    pool = _tiny_pool()
    check_finite(pool, torch.empty(0), pool.size)  # a rank that owns no entries
    local = torch.rand(pool.size)
    local[[1, 6, 11]] = float("nan")
    with pytest.raises(FisherError, match="Fisher scores of a.weight"):
        check_finite(pool, local, 0)


def _cls_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_label", ["data.path=", "row 2 lacks the label field 'label'"]),
        ("unseen_eval_label", ["data.eval_path=", "labels ['maybe']", "do not occur in the training file"]),
        ("one_class", ["data.path: the training rows have 1 distinct value(s)", "at least 2"]),
        ("bottleneck", ["peft.method=bottleneck does not train a classification head"]),
        ("packing", ["data.packing=true does not apply to data.format=classification"]),
        ("chat_no_assistant", ["data.path=", "row 1 has no assistant turn"]),
    ],
)
def test_bad_data_format_inputs(toy, tmp_path, capsys, broken_weights_model, case, expected):
    good = [{"text": "good movie", "label": "fresh"}, {"text": "awful", "label": "rotten"}]
    extra = {
        "data.format": "classification",
        "data.path": _cls_file(tmp_path / "train.jsonl", good),
        "data.eval_path": _cls_file(tmp_path / "eval.jsonl", good),
    }
    if case == "missing_label":
        extra["data.path"] = _cls_file(tmp_path / "bad.jsonl", [good[0], {"text": "no label"}])
    elif case == "unseen_eval_label":
        extra["data.eval_path"] = _cls_file(tmp_path / "e2.jsonl", [{"text": "hm", "label": "maybe"}])
    elif case == "one_class":
        extra["data.path"] = _cls_file(tmp_path / "one.jsonl", [good[0], good[0]])
    elif case == "bottleneck":
        extra["peft.method"] = "bottleneck"
    elif case == "packing":
        extra["data.packing"] = "true"
    elif case == "chat_no_assistant":
        extra = {
            "data.format": "chat",
            "data.eval_path": "null",
            "data.path": _cls_file(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
        }
    _fails(_overrides(toy, tmp_path, broken_weights_model, **extra), capsys, *expected)
    assert not (tmp_path / "out").exists()
