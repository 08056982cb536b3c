"""What every fishds cache shares: an inter-process lock per entry and a record of its files, checked on use.

fishds caches converted models and data splits (fishds/assets.py) and tokenised data (fishds/run/data.py) under
``$FISHDS_CACHE`` or ``~/.cache/fishds``. Any number of processes may start on an empty cache at once (ranks of
one job, independent jobs, nodes sharing a home folder):

- an entry is built only while holding its lock file beside it (:func:`lock`, ``filelock``: an OS lock, so a
  killed holder releases it); the others wait, then check again and reuse what the first one built;
- an entry is written under a temporary name, its files are verified and recorded (:func:`seal`: name, size,
  sha256, and the tensor count of a ``.safetensors`` after its header was parsed), and it is renamed into place;
- on every use, :func:`check` compares sizes against the record and parses the safetensors headers again, so a
  truncated file is found before it is loaded and the entry can be rebuilt.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator

RECORD_VERSION = 1


@contextlib.contextmanager
def lock(path: Path, what: str) -> Iterator[None]:
    """Hold the inter-process lock file ``path``; print one line if another process holds it first."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    held = FileLock(str(path))
    try:
        held.acquire(timeout=0)
    except Timeout:
        print(f"[fishds.cache] waiting for another process {what} (lock {path}) ...", flush=True)
        held.acquire()
    try:
        yield
    finally:
        held.release()


def lock_path(entry: Path) -> Path:
    """The lock file of a cache entry: ``<entry>.lock`` beside it."""
    return entry.with_name(entry.name + ".lock")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_hash_hex(value: str) -> str:
    """A wheel RECORD hash (urlsafe base64 without padding) as hex."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def safetensors_tensors(path: Path) -> int:
    """Number of tensors in a safetensors file whose header parses and whose data the file covers exactly.

    Raises ``ValueError`` naming what is wrong (a truncated file: its size against the size its header gives).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: {size} bytes, shorter than a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise ValueError(f"{path.name}: {size} bytes, its header alone needs {8 + n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path.name}: the safetensors header is not valid JSON ({e})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if size != 8 + n + max(ends, default=0):
        raise ValueError(f"{path.name}: {size} bytes, its safetensors header needs {8 + n + max(ends, default=0)}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as st:
            count = len(list(st.keys()))
    except Exception as e:  # noqa: BLE001 - any failure to open is a damaged file
        raise ValueError(f"{path.name}: {type(e).__name__}: {e}") from None
    if count != len(ends):
        raise ValueError(f"{path.name}: safetensors opens {count} tensors, its header lists {len(ends)}")
    return count


def file_record(path: Path) -> dict:
    """Size and sha256 of a file; for a ``.safetensors`` also its tensor count (after checking it)."""
    rec = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if path.suffix == ".safetensors":
        rec["tensors"] = safetensors_tensors(path)
    return rec


def seal(folder: Path, skip: tuple[str, ...] = ()) -> dict:
    """The record of every file under ``folder`` (see :func:`file_record`): checked, to be written last.

    Raises ``ValueError`` naming a ``.safetensors`` file whose header does not parse or whose data it does not
    cover.
    """
    files = {}
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if p.is_file() and name not in skip:
            files[name] = file_record(p)
    return {"version": RECORD_VERSION, "files": files}


def check(folder: Path, record: dict | None) -> str | None:
    """What is wrong with a cached folder against its record (None when nothing): the cheap check run on use.

    Sizes of every recorded file, and the header and tensor count of every ``.safetensors``. ``record`` None
    (an entry written by an older fishds, without a record) checks the safetensors headers only.
    """
    if record is None:
        for p in sorted(folder.glob("*.safetensors")):
            try:
                safetensors_tensors(p)
            except (OSError, ValueError) as e:
                return str(e)
        return None
    for name, rec in record.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != rec["size"]:
            return f"{name} is {p.stat().st_size} bytes, {rec['size']} were written"
        if "tensors" in rec:
            try:
                n = safetensors_tensors(p)
            except (OSError, ValueError) as e:
                return str(e)
            if n != rec["tensors"]:
                return f"{name} holds {n} tensors, {rec['tensors']} were written"
    return None


def write_json(path: Path, obj) -> None:
    """Write a JSON file under a temporary name and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
