"""The prepared clips as one tensor plus their manifest rows (what `components.prepare` wrote)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "val", "heldout")


@dataclass
class Clips:
    video: torch.Tensor  # uint8 (N, 3, T, H, W), in manifest order
    rows: list[dict]  # manifest rows; `caption_visible` as bool, numbers as int / float

    def __len__(self) -> int:
        return len(self.rows)

    def indices(self, split: str, caption_visible: bool | None = None) -> list[int]:
        """Row indices of a split (optionally only clips whose caption is or isn't visible)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return [
            i for i, r in enumerate(self.rows)
            if r["split"] == split and (caption_visible is None or r["caption_visible"] == caption_visible)
        ]

    def column(self, name: str, idx: list[int] | None = None) -> list:
        idx = range(len(self.rows)) if idx is None else idx
        return [self.rows[i][name] for i in idx]

    @property
    def clip_ids(self) -> list[str]:
        return self.column("clip_id")


_INT = ("index", "frames", "height", "width", "fps")
_FLOAT = ("motion_score", "mean", "std")


def read_manifest(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r.update({k: int(r[k]) for k in _INT})
        r.update({k: float(r[k]) for k in _FLOAT})
        r["caption_visible"] = r["caption_visible"] == "True"
        # Synthetic-world columns: empty for your own videos (and absent in older manifests).
        r["objects"] = int(r["objects"]) if r.get("objects") else None
        r["duration"] = float(r["duration"]) if r.get("duration") else None
    return rows


def load_clips(clips_dir: Path) -> Clips:
    """Concatenate the shards in manifest order, checking each row points at its clip."""
    clips_dir = Path(clips_dir)
    rows = read_manifest(clips_dir / "manifest.csv")
    if not rows:
        raise ValueError(f"{clips_dir / 'manifest.csv'} lists no clips: rerun the prepare stage")
    shards: dict[str, dict] = {}
    for name in dict.fromkeys(r["shard"] for r in rows):
        shards[name] = torch.load(clips_dir / name, map_location="cpu", weights_only=True)
    parts = []
    for name, shard in shards.items():
        ids = [r["clip_id"] for r in rows if r["shard"] == name]
        if shard["clip_id"] != ids:
            raise ValueError(
                f"{clips_dir / name} holds other clips than manifest.csv lists for it: "
                f"the folder mixes two prepare runs; rerun the prepare stage"
            )
        parts.append(shard["video"])
    video = torch.cat(parts)
    order = [r["clip_id"] for r in rows]
    if order != [cid for s in shards.values() for cid in s["clip_id"]]:
        raise ValueError(f"{clips_dir / 'manifest.csv'} is not in shard order: rerun the prepare stage")
    return Clips(video=video, rows=rows)
