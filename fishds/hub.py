"""Hugging Face Hub names (org/name) for models and datasets, resolved to local folders with huggingface_hub.

A name that is not an existing local path and looks like `org/name` is fetched with
huggingface_hub.snapshot_download (the model or dataset repository), which with HF_HUB_OFFLINE=1 (or no network)
answers from the local Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) and fails when the
snapshot is not there. A dataset repository gives the data file of the wanted split: a folder saved by datasets
(save_to_disk) as is, else the one .jsonl / .json / .csv / .parquet file whose name holds the split
(train, validation, test), or the only data file.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ConfigError

HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_hub_name(name: str) -> bool:
    """org/name that is not an existing local path."""
    return bool(HUB_NAME.match(name)) and not Path(name).exists()


def _snapshot(name: str, repo_type: str, key: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, repo_type=repo_type))
    except Exception as e:  # noqa: BLE001 - offline cache miss, unknown repo, no network: all mean "not available"
        from huggingface_hub import constants

        raise ConfigError(
            f"{key}={name!r} is not a local path, and the Hugging Face Hub {repo_type} {name!r} is not "
            f"available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the local "
            f"cache is {constants.HF_HUB_CACHE} (HF_HUB_CACHE), offline={constants.HF_HUB_OFFLINE} "
            "(HF_HUB_OFFLINE). Download it (huggingface-cli download) or give a local path"
        ) from None


def given_name(name: str, resolved: str) -> str:
    """What an adapter records as its base (adapter_config.json base_model_name_or_path): a Hub id stays the Hub
    id (loadable anywhere), not the snapshot folder it was read from here; a local path stays the path."""
    return name if is_hub_name(name) else resolved


def resolve_model(name: str, key: str = "model.name_or_path") -> str:
    """A local model folder: the name itself, or the Hub snapshot of org/name."""
    return str(_snapshot(name, "model", key)) if is_hub_name(name) else name


def resolve_dataset(name: str, key: str) -> str:
    """A local data file or datasets folder: the name itself, or the wanted split of the Hub dataset org/name."""
    if not is_hub_name(name):
        return name
    root = _snapshot(name, "dataset", key)
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        return str(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    split = (
        "train"
        if key != "data.eval_path" and key != "data.test_path"
        else ("validation" if key == "data.eval_path" else "test")
    )
    wanted = [p for p in files if split in p.relative_to(root).as_posix().lower()]
    if split == "validation" and not wanted:
        wanted = [p for p in files if "test" in p.relative_to(root).as_posix().lower()]
    chosen = wanted if wanted else files if len(files) == 1 else []
    if len(chosen) != 1:
        raise ConfigError(
            f"{key}={name!r}: the Hub dataset snapshot {root} holds {len(files)} data files "
            f"({[p.name for p in files[:6]]}), not one for the {split!r} split; give the file's "
            "local path instead"
        )
    return str(chosen[0])
