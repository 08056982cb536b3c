"""The name of every file fishds writes, in one place, and the atomic write they all go through.

output_dir of a run (`fishds train`) or of a FishCallback:
- adapter_model.safetensors + adapter_config.json: a normal PEFT adapter (written by PEFT's save_pretrained)
- MASK_FILE: masks in fishds-packbits-v1 (fishds/fish/mask.py), keyed like the adapter
- INIT_ADAPTER_FILE: the adapter when the mask was fixed (save_initial_adapter)
- SELECTION_REPORT: the report when the mask was fixed (read back on resume)
- REPORT_FILE: the final report, written last by a finished `fishds train` run (its completion marker)
- METRICS_FILE, TENSORBOARD_DIR: one JSON object per optimizer step; the same as TensorBoard scalars
- SCORES_FILE: the Fisher scores (fish.save_scores)
- REPORT_PNG: the picture `fishds report` draws
- CHECKPOINTS_DIR/step-N/ with CHECKPOINT_STATE written last (its completion marker); each also holds a PEFT
  adapter, MASK_FILE and WORLD_STATE_FILE + WORLD_STATE_EXTRA (the state for another number of ranks), and with
  fish.regrow_every one REGROW_RANK_FILE per rank (its gradient sums and values at growth, fishds/fish/regrow.py)
- RUN_CONFIG, RUN_DS_CONFIG: the resolved fishds config and DeepSpeed config, written when a run starts
- TRACKER_IDS: the wandb / mlflow run ids (train.report_to); LAST_DIR: the last adapter with train.save_best
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

MASK_FILE = "fish_mask.safetensors"
INIT_ADAPTER_FILE = "init_adapter_model.safetensors"
SELECTION_REPORT = "fish_selection.json"
REPORT_FILE = "fish_report.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SCORES_FILE = "fisher_scores.safetensors"
REPORT_PNG = "fish_mask_report.png"
MODEL_CARD = "README.md"  # the Hub model card (fishds/card.py)
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STATE = "fishds_state.json"
WORLD_STATE_FILE, WORLD_STATE_EXTRA = "world_state.safetensors", "world_state.json"  # in a checkpoint: run/reshard.py
WORLD_STATE_LEGACY_EXTRA = "world_state.pt"  # what fishds wrote before world_state.json (read weights-only)
RUN_CONFIG, RUN_DS_CONFIG = "fishds_config.yaml", "ds_config.json"  # the resolved configs, written at start
REGROW_RANK_FILE = "regrow-rank{rank}.safetensors"  # in a checkpoint, fish.regrow_every: str.format(rank=R)
TRACKER_IDS = "trackers.json"  # wandb / mlflow run ids, for a resumed run
# the files of a saved adapter (PEFT's save_pretrained, or fishds/bottleneck.py)
ADAPTER_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "bottleneck_adapter.safetensors",
    "bottleneck_config.json",
)
LAST_DIR = "last"  # train.save_best: the last step's adapter when output_dir holds the best one


def atomic(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj) -> None:
    atomic(path, lambda t: t.write_text(json.dumps(obj, indent=2) + "\n"))
