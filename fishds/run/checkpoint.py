"""Checkpoints that are complete or absent, and `resume` that finds the latest complete one.

Layout: output_dir/checkpoints/step-00000040/ holding
- ds/state/...         DeepSpeed engine state of every rank (adapter, fp32 masters, optimizer, scheduler;
                       frozen base weights excluded)
- fish_mask.safetensors the mask (fishds-packbits-v1, keyed by parameter name)
- rng-rank<R>.safetensors each rank's torch RNG states
- fishds_state.json     step and data position, written last: the completion marker
Every rank writes into a temporary folder `.tmp-step-...`; after a barrier rank 0 writes the marker and
renames the folder into place, so a rank killed mid-write leaves only a `.tmp-` folder, which resume
ignores and the next save removes. Older checkpoints are pruned only after a new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import dist as fdist
from ..files import CHECKPOINT_STATE, CHECKPOINTS_DIR, MASK_FILE
from ..fish.mask import load_masks, save_masks

MARKER = CHECKPOINT_STATE  # written last: a complete checkpoint


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / MARKER).is_file())


def find_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: `auto` = latest complete one (or none), `none`, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a complete fishds checkpoint (no {MARKER}); use "
                                "resume=auto or a folder under output_dir/checkpoints")
    return p


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(engine, output_dir: str | Path, step: int, position: int, masks: dict[str, torch.Tensor],
                    keep: int) -> Path:
    """Write a complete checkpoint for `step` (all ranks call this), then prune to the newest `keep`."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if fdist.is_main():
        for stale in root.glob(".tmp-step-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    fdist.barrier()
    engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False, exclude_frozen_parameters=True)
    save_file(_rng_state(), str(tmp / f"rng-rank{fdist.rank()}.safetensors"))
    if os.environ.get("FISHDS_FAULT_KILL_IN_CHECKPOINT") == f"{step}:{fdist.rank()}":
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-while-saving test
    fdist.barrier()
    if fdist.is_main():
        save_masks(tmp / MASK_FILE, masks)
        (tmp / MARKER).write_text(json.dumps({"step": step, "data_position": position}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    fdist.barrier()
    return final


def load_checkpoint(engine, folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore engine, RNG and return (state, masks). All ranks call this."""
    engine.load_checkpoint(str(folder / "ds"), tag="state", load_module_strict=False)
    rng = folder / f"rng-rank{fdist.rank()}.safetensors"
    if rng.is_file():
        state = load_file(str(rng))
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    return json.loads((folder / MARKER).read_text()), load_masks(folder / MASK_FILE)
