"""Checkpoints that are complete or absent, and `resume` that finds the latest complete one.

Layout: output_dir/checkpoints/step-00000040/ holding
- ds/state/...         DeepSpeed engine state of every rank (adapter, fp32 masters, optimizer, scheduler;
                       frozen base weights excluded)
- adapter_model.safetensors + adapter_config.json: the adapter at this step, a normal PEFT adapter
                       (peft.PeftModel.from_pretrained loads it: evaluate or ship checkpoint-N without resuming)
- fish_mask.safetensors the mask (fishds-packbits-v1, keyed like the adapter, as in output_dir)
- rng-rank<R>.safetensors each rank's torch RNG states
- fishds_state.json     step, data position, world size, ZeRO stage, library versions and the best-metric
                       state (run/best.py), written last: the completion marker
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
from ..fish.adapter import gather_adapter, key_map, save_mask_file
from ..fish.mask import load_masks, save_masks
from . import reshard
from .outputs import save_adapter

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
        raise FileNotFoundError(
            f"resume={resume!r} is not a complete fishds checkpoint (no {MARKER}); use "
            "resume=auto or a folder under output_dir/checkpoints"
        )
    return p


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def versions() -> dict[str, str]:
    import deepspeed
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def save_checkpoint(
    engine,
    output_dir: str | Path,
    step: int,
    position: int,
    masks: dict[str, torch.Tensor],
    keep: int,
    trainable=None,
    extra: dict | None = None,
    protect: int | None = None,
) -> Path:
    """Write a complete checkpoint for `step` (all ranks call this), then prune to the newest `keep`.

    trainable (a Pool of every trainable tensor): also write the PEFT adapter at this step (a collective under
    ZeRO-3). extra: more fields for fishds_state.json. protect: a step whose checkpoint pruning keeps (the best).
    """
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
    adapter = gather_adapter(trainable) if trainable is not None else None
    whole = reshard.gather_state(engine, trainable) if trainable is not None else None  # world-size independent
    if os.environ.get("FISHDS_FAULT_KILL_IN_CHECKPOINT") == f"{step}:{fdist.rank()}":
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-while-saving test
    fdist.barrier()
    if fdist.is_main():
        if adapter is not None:
            save_adapter(engine.module, tmp, adapter)
            reshard.save(tmp, *whole)
            save_mask_file(engine.module, tmp, masks)  # keyed like the adapter (load_checkpoint maps back)
        else:
            save_masks(tmp / MASK_FILE, masks)
        state = {
            "step": step,
            "data_position": position,
            "world_size": fdist.world_size(),
            "zero_stage": engine.zero_optimization_stage(),
            "versions": versions(),
            "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
            **(extra or {}),
        }
        (tmp / MARKER).write_text(json.dumps(state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            if protect is None or old.name != f"step-{protect:08d}":
                shutil.rmtree(old, ignore_errors=True)
    fdist.barrier()
    return final


def load_checkpoint(engine, folder: Path, trainable=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore engine, RNG and return (state, masks). All ranks call this.

    Written on another number of ranks: the adapter, optimizer and scheduler state come from world_state
    (run/reshard.py) and the data position is converted (preflight checked that it can be)."""
    state = json.loads((folder / MARKER).read_text())
    if state.get("world_size", fdist.world_size()) != fdist.world_size() and trainable is not None:
        reshard.load_state(engine, trainable, folder)
    else:
        engine.load_checkpoint(str(folder / "ds"), tag="state", load_module_strict=False)
    rng = folder / f"rng-rank{fdist.rank()}.safetensors"
    if rng.is_file():
        rng_state = load_file(str(rng))
        torch.set_rng_state(rng_state["cpu"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_state["cuda"])
    return state, _masks_by_param(engine.module, folder / MASK_FILE)


def _masks_by_param(model, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's masks keyed by parameter name (files keyed like the adapter, or by name in older ones)."""
    masks = load_masks(path)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if set(names) <= set(masks):
        return masks
    return {name: masks[key] for name, key in key_map(model, names).items() if key in masks}
