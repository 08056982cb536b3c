"""Hugging Face Hub names (org/name) for models and datasets, resolved to local folders with huggingface_hub.

A name that is not an existing local path and looks like `org/name` is fetched with
huggingface_hub.snapshot_download (the model or dataset repository), which with HF_HUB_OFFLINE=1 (or no network)
answers from the local Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) and fails when the
snapshot is not there. Datasets are read by `datasets` (fishds/run/splits.py): online it resolves and downloads
only the wanted split's files, offline it reads the dataset's snapshot here.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ConfigError

HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_name(name: str) -> bool:
    """org/name that is not an existing local path."""
    return bool(HUB_NAME.match(name)) and not Path(name).exists()


def snapshot(name: str, repo_type: str, key: str) -> Path:
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
    return str(snapshot(name, "model", key)) if is_hub_name(name) else name
