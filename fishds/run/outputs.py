"""What a `fishds train` run writes beside the method's files (fishds/fish/adapter.py), atomically: the PEFT
adapter (full shapes under ZeRO-3), the resolved configs (written at start) and the metrics log (metrics.jsonl +
the trackers of train.report_to). File names: fishds/files.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from .. import dist as fdist
from ..bottleneck import save_bottleneck
from ..files import RUN_CONFIG, RUN_DS_CONFIG, atomic, write_json
from ..fish.adapter import adapter_buffers


def save_adapter(model, out: Path, adapter: dict[str, torch.Tensor], r: int | None = None) -> None:
    """PEFT save_pretrained with the gathered tensors, into a temporary folder, then moved in place; `r`: the rank
    written into adapter_config.json instead of the model's (a rank-sliced adapter, fishds.fish.adapter.rank_sliced)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter."))
    try:
        if isinstance(model, PeftModel):
            cfg = model.peft_config["default"]
            r_model = getattr(cfg, "r", None)  # IA3 and others have no rank; only a LoRA is saved rank-sliced
            try:
                if r is not None:
                    cfg.r = r
                model.save_pretrained(
                    str(tmp), state_dict={**adapter_buffers(model), **adapter}, safe_serialization=True
                )
            finally:
                if r is not None:
                    cfg.r = r_model
        else:  # fishds' own adapters (PeftMethod.own_adapter): fishds/bottleneck.py writes them
            save_bottleneck(model, tmp, adapter)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_run_config(out: Path, cfg, ds: dict) -> None:
    """Rank 0: the resolved run config (YAML, loadable with --config) and DeepSpeed JSON (every "auto" filled)."""
    if not fdist.is_main():
        return
    import yaml

    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic(out / RUN_CONFIG, lambda t: t.write_text("# the resolved fishds run config (written at start)\n" + text))
    write_json(out / RUN_DS_CONFIG, ds)


class MetricsLog:
    """Rank 0: one JSON line per record in metrics.jsonl, and the numeric fields to the trackers of
    train.report_to (run/trackers.py: TensorBoard in output_dir/tensorboard with tag = phase/field, wandb, mlflow).
    Trackers are flushed at most every FLUSH_S seconds during training (a TensorBoard flush per step cost
    milliseconds), at every eval record and at close()."""

    FLUSH_S = 10.0

    def __init__(self, path: Path, append: bool = False, report_to=("tensorboard",), config: dict | None = None):
        self.path = path
        self.trackers = []
        self._flushed = time.monotonic()
        if fdist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                path.write_text("")
            from .trackers import open_trackers

            self.trackers = open_trackers(report_to, path.parent, config or {}, resumed=append)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run logs those steps again)."""
        if fdist.is_main() and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
            atomic(self.path, lambda t: t.write_text("".join(line + "\n" for line in keep)))

    def write(self, record: dict) -> None:
        if fdist.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for tracker in self.trackers:  # none once closed: the JSON line only
                tracker.log(record)
            training = record.get("phase", "eval") in ("train", "warmup", "dense")
            if not training or time.monotonic() - self._flushed > self.FLUSH_S:
                self.flush()

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        """Write out everything (the run's end)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def text(self, tag: str, value: str) -> None:
        """A text entry (TensorBoard)."""
        for tracker in self.trackers:
            tracker.text(tag, value)

    def mask_summary(self, summary: dict) -> None:
        """The mask statistics, once, to every tracker."""
        for tracker in self.trackers:
            tracker.mask_summary(summary)
