"""Experiment trackers for train.report_to: tensorboard, wandb, mlflow, through the libraries' own clients.

Rank 0 only (run/outputs.MetricsLog creates them there). Each tracker gets the resolved run config once at start
(`config`), every metrics record (`log`), `flush` (MetricsLog decides when: at most every FLUSH_S seconds during
training), the mask summary once the mask is fixed (`mask_summary`) and `close` at the end.
wandb follows its own environment (WANDB_PROJECT, WANDB_MODE=offline, WANDB_DIR; default project "fishds",
files under output_dir); mlflow follows MLFLOW_TRACKING_URI (a `file:` URI for a local file store, which
mlflow >= 3.17 accepts with MLFLOW_ALLOW_FILE_STORE=true; default: a file store in output_dir/mlruns) and
MLFLOW_EXPERIMENT_NAME (default "fishds").
A resumed run continues the same wandb / mlflow run: their ids are kept in output_dir/trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..config import Config, ConfigError
from ..files import TENSORBOARD_DIR, TRACKER_IDS, write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def check(cfg: Config) -> None:
    """Preflight: every client named in train.report_to is installed (else a ConfigError with the pip command)."""
    for name in cfg.train.report_to:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"train.report_to includes {name!r} but the {name} package is not installed; run "
                f"`pip install 'fishds[trackers]'` (or `pip install {PACKAGES[name]}`), or remove "
                f"{name} from train.report_to"
            )


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def _scalars(record: dict) -> dict:
    phase = record.get("phase", "eval")
    return {
        f"{phase}/{k}": float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


class TensorBoard:
    def __init__(self, out: Path, config: dict, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / TENSORBOARD_DIR))
        if not resumed:
            self.w.add_text("fishds/config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, record: dict) -> None:
        for tag, value in _scalars(record).items():
            self.w.add_scalar(tag, value, record.get("step", 0))

    def flush(self) -> None:
        self.w.flush()

    def text(self, tag: str, value: str) -> None:
        self.w.add_text(tag, value)
        self.w.flush()

    def mask_summary(self, summary: dict) -> None:
        self.text("fish/mask", "```\n" + json.dumps(summary, indent=1) + "\n```")

    def close(self) -> None:
        self.w.close()


class WandB:
    def __init__(self, out: Path, config: dict, run_id: str | None):
        import os

        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fishds"),
            name=out.name,
            config=config,
            dir=os.environ.get("WANDB_DIR", str(out)),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.id = self.run.id

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=int(record.get("step", 0)))

    def flush(self) -> None:
        pass

    def text(self, tag: str, value: str) -> None:
        pass

    def mask_summary(self, summary: dict) -> None:
        self.run.config.update({"fish_mask": summary}, allow_val_change=True)
        self.run.summary.update({f"fish/{k}": v for k, v in flatten(summary).items()})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, config: dict, run_id: str | None):
        import os

        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # fishds' default: a file store in output_dir
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.17 asks for this opt-in
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fishds"))
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
        self.id = self.run.info.run_id
        if not run_id:
            params = flatten(config)
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            mlflow.log_dict(config, "fishds_config.json")

    def log(self, record: dict) -> None:
        self.mlflow.log_metrics(
            {k.replace("/", "_"): v for k, v in _scalars(record).items()}, step=int(record.get("step", 0))
        )

    def flush(self) -> None:
        pass

    def text(self, tag: str, value: str) -> None:
        pass

    def mask_summary(self, summary: dict) -> None:
        self.mlflow.log_dict(summary, "fish_mask_summary.json")

    def close(self) -> None:
        self.mlflow.end_run()


def open_trackers(report_to, out: Path, config: dict, resumed: bool) -> list:
    """The trackers of train.report_to (rank 0 calls this); wandb / mlflow ids are kept for a resumed run."""
    ids_path = out / TRACKER_IDS
    ids = json.loads(ids_path.read_text()) if resumed and ids_path.is_file() else {}
    made = []
    for name in report_to:
        if name == "tensorboard":
            made.append(TensorBoard(out, config, resumed))
        elif name == "wandb":
            made.append(WandB(out, config, ids.get("wandb")))
            ids["wandb"] = made[-1].id
        elif name == "mlflow":
            made.append(MLflow(out, config, ids.get("mlflow")))
            ids["mlflow"] = made[-1].id
    if ids:
        write_json(ids_path, ids)
    return made
