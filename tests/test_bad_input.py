"""Bad input fails before the model loads, with a message naming the key (run through launch/train.py's main)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from conftest import ROOT, base_overrides

spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
launch_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch_train)


@pytest.fixture
def broken_weights_model(toy, tmp_path) -> str:
    """The toy model with unreadable weights: any error other than the expected one means weights were loaded."""
    d = tmp_path / "model"
    shutil.copytree(toy["model"], d)
    (d / "model.safetensors").write_bytes(b"not weights")
    return str(d)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("fish.keep_ratio=0", "fish.keep_ratio=0.0 is outside (0, 1]"),
        ("fish.keep_ratio=1.5", "fish.keep_ratio=1.5 is outside (0, 1]"),
        ("fish.selection=best", "fish.selection"),
        ("data.path=/nonexistent/train.jsonl", "data.path='/nonexistent/train.jsonl': file not found"),
        ("peft.target_modules=[qq_proj]", "peft.target_modules: ['qq_proj'] match no linear module"),
        ("model.name_or_path=/nonexistent/model", "model.name_or_path='/nonexistent/model' is not a model folder"),
    ],
)
def test_bad_config_fails_before_model_loads(toy, tmp_path, capsys, broken_weights_model, override, expected):
    ov = base_overrides(toy, tmp_path / "out", **{"model.name_or_path": broken_weights_model}) + [override]
    assert launch_train.main(ov) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_finished_output_dir_is_refused_without_overwrite(toy, tmp_path, capsys, broken_weights_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fish_report.json").write_text("{}")
    assert launch_train.main(base_overrides(toy, out, **{"model.name_or_path": broken_weights_model})) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "fish_report.json").read_text() == "{}"


def test_contradicting_ds_config_is_refused(toy, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}')
    from fishds.config import ConfigError, load_config
    from fishds.dsconfig import resolve_ds_config

    cfg = load_config(None, base_overrides(toy, tmp_path / "o"))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 contradicts train.micro_batch_size"):
        resolve_ds_config(cfg, str(ds), world_size=2)
    ds.write_text("{not json")
    assert launch_train.main(["--ds_config", str(ds)] + base_overrides(toy, tmp_path / "o")) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_a_stopped_train_leaves_without_a_process_group(toy, tmp_path):
    """`fishds train` destroys its process group before it leaves with a guard's exit code (75 after a signal), so
    that the interpreter's teardown never meets live gloo / NCCL threads (one rank could abort there, SIGABRT,
    instead of exiting with the agreed code). In a child process: what is left of the group is read after main."""
    import json
    import os
    import subprocess
    import sys

    from fishds.run.guard import EXIT_PREEMPTED

    ov = base_overrides(toy, tmp_path / "stopped", **{"train.max_steps": 4})
    code = (
        "import json, sys, torch.distributed as dist\n"
        "from fishds import cli\n"
        "try:\n"
        f"    cli.main(['train', *{ov!r}])\n"
        "except SystemExit as e:\n"
        "    print('EXIT', json.dumps([e.code, dist.is_initialized()]))\n"
    )
    env = {**os.environ, "FISHDS_FAULT_SIGNAL": "1:0", "MASTER_PORT": "29731"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("EXIT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(line[-1][5:]) == [EXIT_PREEMPTED, False], line
