"""train.report_to: TensorBoard, wandb (offline) and mlflow (a file store) on 2 ranks, rank 0 only; the resolved
run config and DeepSpeed JSON in output_dir."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, base_overrides, launch

from fishds.config import ConfigError, load_config


def test_missing_client_names_report_to_and_pip(toy, tmp_path, monkeypatch):
    import importlib.util

    from fishds.run import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(None, base_overrides(toy, tmp_path, **{"train.report_to": "[tensorboard,wandb]"}))
    with pytest.raises(ConfigError, match=r"train\.report_to.*wandb.*pip install 'fishds\[trackers\]'"):
        trackers.check(cfg)
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, base_overrides(toy, tmp_path, **{"train.report_to": "[comet]"}))


def test_report_to_tensorboard_wandb_mlflow_offline_rank0(toy, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'fishds[trackers]'")
    pytest.importorskip("mlflow", reason="pip install 'fishds[trackers]'")
    out = tmp_path / "run"
    store = (tmp_path / "mlruns").as_uri()
    ov = base_overrides(toy, out, **{"train.report_to": "[tensorboard,wandb,mlflow]", "train.eval_every": 2})
    launch(
        2,
        ov,
        "zero2.json",
        env={
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp_path / "wb"),
            "WANDB_SILENT": "true",
            "MLFLOW_TRACKING_URI": store,
            "MLFLOW_ALLOW_FILE_STORE": "true",
        },
    )
    # the resolved run config (loads back to the same config) and DeepSpeed JSON, no "auto" left
    again = load_config(out / "fishds_config.yaml")
    assert again == load_config(None, ov)
    ds = json.loads((out / "ds_config.json").read_text())
    assert '"auto"' not in json.dumps(ds) and ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 2
    # TensorBoard: event files with the train scalars
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # mlflow: one run (rank 0 only) with the config as params, every train step, the mask summary
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.17 asks for this opt-in to read a file store
    client = MlflowClient(tracking_uri=store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.data.params["fishds.train.lr"] == "0.01" and run.data.params["deepspeed.zero_optimization.stage"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert "eval_eval_loss" in run.data.metrics
    local = client.download_artifacts(run.info.run_id, "fish_mask_summary.json", str(tmp_path / "art"))
    summary = json.loads(open(local).read())
    report = json.loads((out / "fish_report.json").read_text())
    assert summary["selected"] == report["selected"] and summary["k"] == report["k"]
    # wandb offline: one run (rank 0 only); its run file holds the config, the mask summary and the train loss
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    data = next(runs[0].glob("run-*.wandb")).read_bytes()  # protobuf records, values stored as JSON text
    assert b'"lr":0.01' in data and b"fish_mask" in data
    selected = re.search(rb"fish/selected\x82\x01.(\d+)", data)
    assert selected and int(selected.group(1)) == report["selected"]
    assert data.count(b"train/loss") >= 4
    assert json.loads((out / "trackers.json").read_text()).keys() == {"wandb", "mlflow"}
    assert ROOT  # launched from the repository root
