"""The prepared clips and their manifest rows (what `components.prepare` wrote), two ways.

Native sizes (`Clips.native`): each clip at its own (frames, height, width), grouped by shape, as
Sora trains. The VAE (training, latent statistics, reconstruction metrics) and encode, and so the
DiT, see these. The square view (`Clips.video`): every clip resized to `data.size` x `data.size`
and brought to `data.frames` frames in one uint8 tensor, for the fixed-size classifiers: the
captioner and the judge (and the evaluation's real-clip statistics beside the judge's square
generations). With one square clip size and one length, the square view is the native tensor itself.

A clip shorter than `data.frames` (`data.clip_frames`) is padded in the square view by repeating
its last frame: the object stops where the clip ends, nothing is invented (interpolating in time
would change its speed, looping would make it jump). The captioner trains on and captions these
views, so it learns that a motion may stop; the judge trains on and grades full-length clips only
(components/evaluation.py), because it grades generations of `data.frames` frames.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from components.buckets import Bucket

SPLITS = ("train", "val", "heldout")
SQUARE_CHUNK = 256  # clips resized at a time: bounds the float copy


def pad_frames(video: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, 3, T, H, W) -> (N, 3, frames, H, W): the last frame repeated (T <= frames)."""
    t = video.shape[2]
    if t > frames:
        raise ValueError(f"clips of {t} frames are longer than the square view's {frames}: "
                         f"make data.frames the longest of data.clip_frames")
    if t == frames:
        return video
    return torch.cat([video, video[:, :, -1:].expand(-1, -1, frames - t, -1, -1)], dim=2)


def to_square(video: torch.Tensor, size: int, frames: int | None = None) -> torch.Tensor:
    """uint8 (N, 3, T, H, W) -> uint8 (N, 3, frames, size, size): each frame resized (antialiased
    bilinear: area-like when shrinking, smooth when enlarging), aspect not kept, nothing cropped;
    a clip shorter than `frames` (default T) padded with its last frame (`pad_frames`)."""
    video = video if frames is None else pad_frames(video, frames)
    n, c, t, h, w = video.shape
    if (h, w) == (size, size):
        return video
    out = torch.empty((n, c, t, size, size), dtype=torch.uint8)
    for i in range(0, n, SQUARE_CHUNK):
        x = video[i:i + SQUARE_CHUNK].float().transpose(1, 2).flatten(0, 1)  # (n*T, 3, H, W)
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        y = y.round().clamp(0, 255).to(torch.uint8).unflatten(0, (-1, t)).transpose(1, 2)
        out[i:i + SQUARE_CHUNK] = y
    return out


def square_shard(video: torch.Tensor | list[torch.Tensor], size: int | None,
                 frames: int | None = None) -> torch.Tensor:
    """A shard's `video` (one tensor, or a list of clips of mixed shapes) as its square view of
    `frames` frames (`data.frames`; default the clips' own when they share one length); `size`
    None keeps a one-tensor shard as it is."""
    if torch.is_tensor(video):
        return video if size is None else to_square(video, size, frames)
    if size is None:
        raise ValueError("this shard holds clips of several shapes: pass the square view's side (data.size)")
    lengths = {clip.shape[1] for clip in video}
    if frames is None and len(lengths) > 1:
        raise ValueError(f"this shard holds clips of {sorted(lengths)} frames: pass the square view's "
                         f"length (data.frames)")
    return torch.cat([to_square(clip[None], size, frames) for clip in video])


@dataclass
class Clips:
    # Per clip shape (frames, height, width): manifest indices (ascending) and uint8 (n, 3, T, H, W).
    groups: dict[tuple[int, int, int], tuple[list[int], torch.Tensor]]
    rows: list[dict]  # manifest rows; `caption_visible` as bool, numbers as int / float
    size: int  # the square view's side (`data.size`)
    frames: int = 0  # the square view's length (`data.frames`); 0: the longest clip's
    _square: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.frames = self.frames or max(t for t, _, _ in self.groups)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def video(self) -> torch.Tensor:
        """The square view: uint8 (N, 3, frames, size, size), in manifest order (built once);
        shorter clips padded with their last frame."""
        if self._square is None:
            if len(self.groups) == 1:
                (_, video), = self.groups.values()
                self._square = to_square(video, self.size, self.frames)
            else:
                t = self.frames
                self._square = torch.empty((len(self), 3, t, self.size, self.size), dtype=torch.uint8)
                for idx, video in self.groups.values():
                    self._square[idx] = to_square(video, self.size, t)
        return self._square

    @property
    def shapes(self) -> list[Bucket]:
        return [Bucket(*shape) for shape in self.groups]

    def native(self, idx: list[int] | None = None) -> list[tuple[Bucket, list[int], torch.Tensor]]:
        """The clips `idx` (default all) at their native sizes: per shape, (its bucket, its manifest
        indices in `idx` order, uint8 (n, 3, T, H, W)), shapes in the order `idx` first meets them."""
        where = {i: (shape, k) for shape, (ids, _) in self.groups.items() for k, i in enumerate(ids)}
        picked: dict[tuple[int, int, int], list[int]] = {}
        for i in (range(len(self)) if idx is None else idx):
            picked.setdefault(where[int(i)][0], []).append(int(i))
        out = []
        for shape, ids in picked.items():
            all_ids, video = self.groups[shape]
            # The whole group in its order (encode, one-shape data): the tensor itself, no copy.
            out.append((Bucket(*shape), ids, video if ids == all_ids else video[[where[i][1] for i in ids]]))
        return out

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


def load_clips(clips_dir: Path, size: int | None = None, frames: int | None = None) -> Clips:
    """Group the shards' clips by shape, in manifest order, checking each row points at its clip.

    `size`: the square view's side (`data.size`); default the clips' side when they are all one
    square size (as before native sizes). `frames`: the square view's length (`data.frames`);
    default the longest clip's."""
    clips_dir = Path(clips_dir)
    rows = read_manifest(clips_dir / "manifest.csv")
    if not rows:
        raise ValueError(f"{clips_dir / 'manifest.csv'} lists no clips: rerun the prepare stage")
    shards: dict[str, dict] = {}
    for name in dict.fromkeys(r["shard"] for r in rows):
        shards[name] = torch.load(clips_dir / name, map_location="cpu", weights_only=True)
    parts: list[torch.Tensor | list[torch.Tensor]] = []
    for name, shard in shards.items():
        ids = [r["clip_id"] for r in rows if r["shard"] == name]
        if shard["clip_id"] != ids:
            raise ValueError(
                f"{clips_dir / name} holds other clips than manifest.csv lists for it: "
                f"the folder mixes two prepare runs; rerun the prepare stage"
            )
        parts.append(shard["video"])
    order = [r["clip_id"] for r in rows]
    if order != [cid for s in shards.values() for cid in s["clip_id"]]:
        raise ValueError(f"{clips_dir / 'manifest.csv'} is not in shard order: rerun the prepare stage")
    groups = _group(parts)
    if size is None:
        sides = {(h, w) for _, h, w in groups}  # lengths may differ: the square view pads them
        squares = {h for h, w in sides if h == w}
        if len(sides) > 1 or len(squares) != 1:
            raise ValueError(f"{clips_dir} holds clips of {len(sides)} sizes "
                             f"(shapes {', '.join(str(Bucket(*s)) for s in groups)}): pass the square view's "
                             f"side, load_clips(clips_dir, cfg.data.size)")
        size = squares.pop()
    return Clips(groups=groups, rows=rows, size=size, frames=frames or 0)


def _group(parts: list[torch.Tensor | list[torch.Tensor]]) -> dict[tuple[int, int, int], tuple[list[int], torch.Tensor]]:
    """Shards' videos (a (n, 3, T, H, W) tensor or a list of (3, T, H, W) clips each) -> per shape,
    manifest indices and the stacked clips. One shape concatenates the shards, as always."""
    if all(torch.is_tensor(p) for p in parts) and len({tuple(p.shape[2:]) for p in parts}) == 1:
        video = torch.cat(parts)
        return {tuple(video.shape[2:]): (list(range(len(video))), video)}
    clips = [c for p in parts for c in p]  # iterating a tensor yields its clips
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, c in enumerate(clips):
        groups.setdefault(tuple(c.shape[1:]), []).append(i)
    return {shape: (ids, torch.stack([clips[i] for i in ids])) for shape, ids in groups.items()}
