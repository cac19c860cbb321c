"""The BentoML model store entry that serving loads: one ONNX bundle folder, copied as is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bentoml

from components.onnx_runtime import BUNDLE_FILES, BundleInfo

MODEL_NAME = "zoetrope-t2v"


def import_bundle(bundle_dir: str | Path, labels: dict, metadata: dict) -> str:
    """Copy an exported bundle folder into the model store as `zoetrope-t2v:<new version>`; returns the tag.

    Labels are strings in BentoML; scalar values (a run id, a score) are written as text.
    `bundle.json` is added to the metadata under "bundle" unless the caller gave one. BentoML
    rejects None in metadata, so null entries (bundle.json's `"shift": null`) are left out.
    """
    bundle_dir = Path(bundle_dir)
    missing = [f for f in BUNDLE_FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{bundle_dir}: not an ONNX bundle, missing {', '.join(missing)}")
    BundleInfo.load(bundle_dir / "bundle.json")  # fail here, not at serve time, on bad metadata
    bad = {k: v for k, v in labels.items() if not isinstance(v, (str, int, float, bool))}
    if bad:
        key = next(iter(bad))
        raise ValueError(f"label {key}={bad[key]!r} is invalid: labels hold strings or scalars")
    labels = {str(k): str(v) for k, v in labels.items()}
    metadata = _without_none({"bundle": json.loads((bundle_dir / "bundle.json").read_text()), **metadata})

    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as model:
        for path in bundle_dir.iterdir():  # the whole folder: tokenizer side files included
            if path.is_file():
                shutil.copy2(path, Path(model.path) / path.name)
    return str(model.tag)


def _without_none(obj):
    if isinstance(obj, dict):
        return {k: _without_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_without_none(v) for v in obj if v is not None]
    return obj
