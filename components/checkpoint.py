"""The one owner of on-disk model and training-state formats.

Every file is written to a temporary sibling and renamed into place, so a killed process never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy `src` to `dst` through a temporary file in `dst`'s folder and a rename: a reader never
    sees half a file, and a failed copy leaves the old `dst`."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # Through a file object: torch.save names the zip records after a path it is given (here
        # the random temp name), so the same tensors would give different bytes (and DVC hashes)
        # on every write; a file object gets the fixed name "archive".
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(path: str | Path, kind: str, config: dict, state_dict: dict, **extra: Any) -> None:
    """A trained model: its kind, the config that builds it, its weights and measured extras.

    Weights are saved from the CPU, whatever device trained them, so any machine loads them."""
    state_dict = {k: v.cpu() for k, v in state_dict.items()}
    atomic_torch_save(
        {"format": FORMAT_VERSION, "kind": kind, "config": config, "state_dict": state_dict, **extra},
        path,
    )


def load_model(path: str | Path, kind: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that trains the {kind} first")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if obj.get("kind") != kind:
        raise ValueError(f"{path} holds a {obj.get('kind')!r} model, expected {kind!r}")
    if obj.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {obj.get('format')}, this code reads {FORMAT_VERSION}")
    return obj
