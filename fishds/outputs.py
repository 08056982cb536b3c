"""Everything fishds writes into output_dir, written atomically (temporary name, then rename).

- adapter_model.safetensors + adapter_config.json: a normal PEFT adapter, full shapes under ZeRO-3
- fish_mask.safetensors: masks in fishds-packbits-v1 (see mask.py), keyed like the adapter
- init_adapter_model.safetensors: the adapter when the mask was fixed (save_initial_adapter)
- fish_report.json: what was selected, where, and what it cost
- metrics.jsonl: one JSON object per optimizer step (rank 0 appends)
- fish_selection.json: the report when the mask was fixed (fish_report.json adds eval at the end)
- fishds_config.yaml + ds_config.json: the resolved run config and DeepSpeed config, written when the run starts
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import dist as fdist
from .mask import save_masks
from .pool import Pool

FINISHED_MARKER = "fish_report.json"
SELECTION_REPORT = "fish_selection.json"  # the report as of the mask being fixed (read back on resume)


def _atomic(path: Path, write) -> None:
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
    _atomic(path, lambda t: t.write_text(json.dumps(obj, indent=2) + "\n"))


RUN_CONFIG, RUN_DS_CONFIG = "fishds_config.yaml", "ds_config.json"


def write_run_config(out: Path, cfg, ds: dict) -> None:
    """Rank 0: the resolved run config (YAML, loadable with --config) and DeepSpeed JSON (every "auto" filled)."""
    if not fdist.is_main():
        return
    import yaml

    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    _atomic(out / RUN_CONFIG, lambda t: t.write_text("# the resolved fishds run config (written at start)\n" + text))
    write_json(out / RUN_DS_CONFIG, ds)


@torch.no_grad()
def gather_adapter(pool: Pool) -> dict[str, torch.Tensor]:
    """Full adapter tensors on every rank (gathers only the pool parameters under ZeRO-3)."""
    import deepspeed

    params = [t.param for t in pool.tensors]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {t.name: t.param.detach().to("cpu", copy=True).reshape(t.shape) for t in pool.tensors}


def _adapter_buffers(model) -> dict[str, torch.Tensor]:
    """Adapter buffers PEFT saves with the adapter (VeRA's shared projections); ZeRO never partitions buffers."""
    return {n: b.detach().cpu() for n, b in model.named_buffers(remove_duplicate=False) if n.endswith(".default")}


def key_map(model, names: list[str]) -> dict[str, str]:
    """Parameter name -> the key PEFT writes for it into adapter_model.safetensors."""
    from peft.utils import get_peft_model_state_dict

    if hasattr(model, "bottleneck_config"):
        return {n: n for n in names}  # bottleneck adapters are saved under their parameter names
    markers = {n: torch.tensor([i, -7], dtype=torch.int64) for i, n in enumerate(names)}
    renamed = get_peft_model_state_dict(model, state_dict={**_adapter_buffers(model), **markers})
    return {names[int(v[0])]: k for k, v in renamed.items()
            if v.dtype == torch.int64 and v.shape == (2,) and int(v[1]) == -7}


def adapter_keys(model, by_param_name: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename parameter-name keys to the keys PEFT writes into adapter_model.safetensors."""
    names = list(by_param_name)
    return {key: by_param_name[name] for name, key in key_map(model, names).items()}


def save_adapter(model, out: Path, adapter: dict[str, torch.Tensor]) -> None:
    """PEFT save_pretrained with the gathered tensors, into a temporary folder, then moved in place."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter."))
    try:
        if hasattr(model, "bottleneck_config"):
            from .bottleneck import save_bottleneck
            save_bottleneck(model, tmp, adapter)
        else:
            model.save_pretrained(str(tmp), state_dict={**_adapter_buffers(model), **adapter}, safe_serialization=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_mask_file(model, out: Path, masks: dict[str, torch.Tensor]) -> None:
    keyed = adapter_keys(model, masks)
    _atomic(out / "fish_mask.safetensors", lambda t: save_masks(t, keyed))


def save_initial_adapter(model, out: Path, adapter: dict[str, torch.Tensor]) -> None:
    keyed = {k: v.contiguous() for k, v in adapter_keys(model, adapter).items()}
    _atomic(out / "init_adapter_model.safetensors", lambda t: save_file(keyed, str(t), metadata={"format": "pt"}))


class MetricsLog:
    """Rank 0: one JSON line per record in metrics.jsonl, and the numeric fields to the trackers of
    train.report_to (fishds.trackers: TensorBoard in output_dir/tensorboard with tag = phase/field, wandb, mlflow)."""

    def __init__(self, path: Path, append: bool = False, report_to=("tensorboard",), config: dict | None = None):
        self.path = path
        self.trackers = []
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
            _atomic(self.path, lambda t: t.write_text("".join(line + "\n" for line in keep)))

    def write(self, record: dict) -> None:
        if fdist.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for tracker in self.trackers:
                tracker.log(record)

    def text(self, tag: str, value: str) -> None:
        """A text entry (TensorBoard)."""
        for tracker in self.trackers:
            tracker.text(tag, value)

    def mask_summary(self, summary: dict) -> None:
        """The mask statistics, once, to every tracker."""
        for tracker in self.trackers:
            tracker.mask_summary(summary)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def mask_report(pool: Pool, masks: dict[str, torch.Tensor]) -> dict:
    """Per-tensor and per-module counts and the lora_A / lora_B shares of the mask."""
    per_tensor, per_module, per_kind = {}, {}, {"lora_A": 0, "lora_B": 0, "other": 0}
    total = 0
    for t in pool.tensors:
        sel = int(masks[t.name].sum())
        total += sel
        per_tensor[t.name] = {"selected": sel, "numel": t.numel}
        parts = t.name.split(".")
        kind = next((p for p in parts if p in ("lora_A", "lora_B")), "other")
        module = parts[parts.index(kind) - 1] if kind != "other" else parts[-2]
        m = per_module.setdefault(module, {"selected": 0, "numel": 0})
        m["selected"] += sel
        m["numel"] += t.numel
        per_kind[kind] += sel
    share = {k: (v / total if total else 0.0) for k, v in per_kind.items() if k != "other" or v}
    return {"selected": total, "per_tensor": per_tensor, "per_module": per_module, "share": share}
