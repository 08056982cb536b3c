"""Checkpoints that are complete or absent, and `resume` that finds the latest complete one.

Layout: output_dir/checkpoints/step-00000040/ holding
- ds/state/...         DeepSpeed engine state of every rank (adapter, fp32 masters, optimizer, scheduler;
                       frozen base weights excluded)
- adapter_model.safetensors + adapter_config.json: the adapter at this step, a normal PEFT adapter
                       (peft.PeftModel.from_pretrained loads it: evaluate or ship checkpoint-N without resuming)
- fish_mask.safetensors the mask (fishds-packbits-v1, keyed like the adapter, as in output_dir)
- rng-rank<R>.safetensors each rank's torch RNG states
- regrow-rank<R>.safetensors with fish.regrow_every: each rank's gradient sums and values at growth
                       (fishds/fish/regrow.py); fishds_state.json then holds the regrowth history
- world_state.safetensors + world_state.json  the adapter's fp32 masters, optimizer moments and step, the LR
                       scheduler and DeepSpeed's counters, whole (run/reshard.py: what a resume restores, on any
                       number of ranks, without unpickling; optimizer-rank<R>.safetensors for a compact optimizer)
- fishds_state.json     step, data position, world size, ZeRO stage, library versions, the best-metric state
                       (run/best.py), the count of skipped non-finite steps (run/guard.py) and `files`: size and
                       sha256 of every other file; written last: the completion marker
Every rank writes into a temporary folder `.tmp-step-...`; after a barrier rank 0 writes the marker and
renames the folder into place, so a rank killed mid-write leaves only a `.tmp-` folder, which resume
ignores and the next save removes. Older checkpoints are pruned only after a new one is complete. A write that
fails on any rank stops every rank (run/guard.py WriteFailed, exit code 74) and removes the `.tmp-` folder.
`resume=auto` takes the newest complete checkpoint whose files match their record (`verify`), saying which
damaged ones it passed over. DeepSpeed's pickled ds/ files are loaded only with train.resume_trust_pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import cache
from .. import dist as fdist
from ..files import CHECKPOINT_STATE, CHECKPOINTS_DIR, MASK_FILE, REGROW_RANK_FILE
from ..fish.adapter import gather_adapter, key_map, save_mask_file
from ..fish.mask import load_masks, save_masks
from . import guard, reshard
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
    """The checkpoint folder to resume from: `auto` = latest complete one that verifies (or none), `none`, or a path.

    A damaged checkpoint (a file missing, truncated or changed after it was written, see `verify`) is never
    resumed from: `auto` falls back to the previous complete one, printing a line naming the file; an explicit
    path raises FileNotFoundError naming it."""
    if resume == "none":
        return None
    if resume == "auto":
        for folder in reversed(complete_checkpoints(output_dir)):
            problem = verify(folder)
            if problem is None:
                return folder
            if os.environ.get("RANK", "0") == "0":
                print(
                    f"[fishds] resume: checkpoint {folder} is damaged ({problem}); not resuming from it, "
                    "trying the previous complete one",
                    flush=True,
                )
        return None
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise FileNotFoundError(
            f"resume={resume!r} is not a complete fishds checkpoint (no {MARKER}); use "
            "resume=auto or a folder under output_dir/checkpoints"
        )
    problem = verify(p)
    if problem is not None:
        raise FileNotFoundError(f"resume={resume!r}: the checkpoint is damaged ({problem}); use another checkpoint")
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
    frozen=None,
    rank_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` (all ranks call this), then prune to the newest `keep`.

    trainable (a Pool of every trainable tensor): also write the PEFT adapter at this step (a collective under
    ZeRO-3); frozen (a Pool or None): fish.freeze's tensors, written into that adapter too (not into the DeepSpeed
    state, which excludes frozen parameters: a resumed run rebuilds them from train.seed, as it built them).
    extra: more fields for fishds_state.json. protect: a step whose checkpoint pruning keeps (the best).
    rank_tensors: this rank's tensors for REGROW_RANK_FILE (fish.regrow_every, fishds/fish/regrow.py).
    A write that fails on any rank (a full disk, a read-only folder) stops the run on every rank with
    guard.WriteFailed; the temporary folder is removed and the complete checkpoints are left as they were.
    fishds_state.json records the size and sha256 of every file of the checkpoint (`files`), checked at resume
    (hashing reads the checkpoint once more: the adapter's state, tens of MB for a 7B LoRA).
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    what = f"the checkpoint {final}"
    guard.fault_file_size_limit(step)
    failure = None
    if fdist.is_main():
        for stale in root.glob(".tmp-step-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            failure = guard.write_error(e)
    _agree(failure, what, tmp)  # in place of a barrier
    try:
        engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError for a failed write
        failure = guard.write_error(e)
        fdist.barrier()  # the one DeepSpeed's save ends with, which the other ranks wait in
    if failure is None:
        try:
            save_file(_rng_state(), str(tmp / f"rng-rank{fdist.rank()}.safetensors"))
            if rank_tensors is not None:
                save_file(rank_tensors, str(tmp / REGROW_RANK_FILE.format(rank=fdist.rank())))
            if trainable is not None:
                reshard.save_rank(engine, tmp)
        except (OSError, RuntimeError, SafetensorError) as e:
            failure = guard.write_error(e)
    adapter = gather_adapter(trainable) if trainable is not None else None
    if adapter is not None and frozen is not None:  # fish.freeze's tensors: saved so that the adapter loads
        adapter.update(gather_adapter(frozen))
    whole = reshard.gather_state(engine, trainable) if trainable is not None else None  # world-size independent
    if os.environ.get("FISHDS_FAULT_KILL_IN_CHECKPOINT") == f"{step}:{fdist.rank()}":
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-while-saving test
    _agree(failure, what, tmp)
    if fdist.is_main():
        try:
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
                "files": cache.seal(tmp, skip=(MARKER,))["files"],
            }
            marker = tmp / f".{MARKER}.tmp"
            marker.write_text(json.dumps(state) + "\n")
            os.replace(marker, tmp / MARKER)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, RuntimeError, SafetensorError, ValueError) as e:
            failure = guard.write_error(e)
        if failure is None:
            for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
                if protect is None or old.name != f"step-{protect:08d}":
                    shutil.rmtree(old, ignore_errors=True)
    _agree(failure, what, tmp)
    return final


def _agree(failure: str | None, what: str, tmp: Path) -> None:
    try:
        guard.agree_writes(failure, what)
    except guard.WriteFailed:
        if fdist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint (None when nothing): every file its fishds_state.json records is
    present with its size and sha256, and every .safetensors header covers its data. A checkpoint written before
    the record existed: the safetensors headers only."""
    try:
        state = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as e:
        return f"{MARKER}: {e}"
    files = state.get("files")
    if files is None:
        return cache.check(folder, None)
    problem = cache.check(folder, {"files": files})
    if problem:
        return problem
    for name, rec in files.items():
        if cache.sha256_file(folder / name) != rec["sha256"]:
            return f"{name} does not hold the bytes that were written (sha256 differs)"
    return None


def load_checkpoint(
    engine, folder: Path, trainable=None, trust_pickle: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore engine, RNG and return (state, masks). All ranks call this.

    By default nothing is unpickled: the adapter's fp32 masters, optimizer moments and step, the LR scheduler and
    the engine counters come from world_state.safetensors + world_state.json (run/reshard.py, on any number of
    ranks), the RNG from rng-rank<R>.safetensors, the mask from fish_mask.safetensors, the step, data position and
    best-metric state from fishds_state.json. DeepSpeed's engine files (ds/, pickled: loading them runs whatever
    code their writer put there) are read only with trust_pickle (train.resume_trust_pickle), and only on the
    number of ranks that wrote them."""
    state = json.loads((folder / MARKER).read_text())
    same_world = state.get("world_size", fdist.world_size()) == fdist.world_size()
    if (trust_pickle and same_world) or trainable is None:
        engine.load_checkpoint(str(folder / "ds"), tag="state", load_module_strict=False)
    else:
        reshard.load_state(engine, trainable, folder, same_world)
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
