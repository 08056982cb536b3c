"""What a `fishds train` run writes beside the method's files (fishds/fish/adapter.py), atomically: the PEFT
adapter (full shapes under ZeRO-3) and the metrics log (metrics.jsonl + TensorBoard). File names: fishds/files.py.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import dist as fdist
from ..files import TENSORBOARD_DIR, atomic
from ..fish.adapter import adapter_buffers


def save_adapter(model, out: Path, adapter: dict[str, torch.Tensor]) -> None:
    """PEFT save_pretrained with the gathered tensors, into a temporary folder, then moved in place."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter."))
    try:
        if hasattr(model, "bottleneck_config"):
            from ..bottleneck import save_bottleneck
            save_bottleneck(model, tmp, adapter)
        else:
            model.save_pretrained(str(tmp), state_dict={**adapter_buffers(model), **adapter}, safe_serialization=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class MetricsLog:
    """Rank 0: one JSON line per record in metrics.jsonl, and the numeric fields as TensorBoard scalars
    (output_dir/tensorboard, tag = phase/field). TensorBoard is flushed at most every FLUSH_S seconds during
    training (a flush per step cost milliseconds), at every eval record and at close()."""
    FLUSH_S = 10.0

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.tb = None
        self._flushed = time.monotonic()
        if fdist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                path.write_text("")
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / TENSORBOARD_DIR))

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run logs those steps again)."""
        if fdist.is_main() and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
            atomic(self.path, lambda t: t.write_text("".join(line + "\n" for line in keep)))

    def write(self, record: dict) -> None:
        if fdist.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            phase = record.get("phase", "eval")
            if self.tb is None:  # closed: the JSON line only
                return
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{phase}/{key}", value, record.get("step", 0))
            if phase not in ("train", "dense") or time.monotonic() - self._flushed > self.FLUSH_S:
                self.flush()

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        """Write out everything (the run's end)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def text(self, tag: str, value: str) -> None:
        """A text entry in TensorBoard (the mask statistics, once)."""
        if self.tb is not None:
            self.tb.add_text(tag, value)
            self.tb.flush()


