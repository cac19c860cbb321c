"""Raw videos -> training clips: decode, resample, resize, crop, shard, and quarantine the broken.

Reads `raw_dir/metadata.jsonl` and cuts it into shards of `data.shard_size` videos; each shard
(`prepare_shard`, the unit a Dask worker runs) decodes one clip from each of its videos, its length
drawn from `data.clip_frames` (balanced over all videos, seeded: `assign_clip_frames`; one length
`data.frames` when the list is empty) and its window drawn per video (seeded: `window_start`), resized to the clip size of
`data.aspects` nearest its aspect ratio (`nearest_size`; the small remainder centre-cropped, never
padded), and writes `shard-NNNNN.pt` (`{"video": uint8 (N, 3, T, H, W), "clip_id": [str]}`; a
shard whose clips differ in shape holds the list of its N (3, T, H, W) clips: `shard_video`),
`manifest.csv` (one row per clip, in shard order) and `quarantine.json` (each unusable file with
its reason) to `out_dir`. Splits: "heldout" stays; a `val_fraction` share of the train videos
becomes "val", drawn from the metadata (not from the files that decoded), so one broken file
never moves other clips between splits.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import random
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from PIL import Image

from components import world
from components.config import DataConfig
from components.video_io import read_clip

T = TypeVar("T")
# `map_shards(fn, calls)` -> `[fn(**kwargs) for kwargs in calls]`, wherever the calls run.
MapShards = Callable[[Callable[..., T], list[dict]], list[T]]

METADATA_KEYS = ("id", "file", "color", "shape", "motion", "speed", "size", "background",
                 "caption", "split", "caption_visible", "fps", "frames", "width", "height")
# Optional in metadata (older raw folders lack them): `objects` (default 1), `world.SECOND_KEYS`
# (default empty), `duration` (default frames / fps), `aspect` (the manifest's is the clip's own).
MANIFEST_COLUMNS = ("clip_id", "source", "shard", "index", "frames", "height", "width", "fps",
                    "split", "caption", "caption_visible", "color", "shape", "motion", "speed",
                    "size", "background", "motion_score", "mean", "std",
                    "objects", *world.SECOND_KEYS, "duration", "aspect")


class TooManyBadFiles(RuntimeError):
    """More input videos were unusable than `data.max_bad_fraction` allows."""


def check_bad_share(quarantine: list[dict], total: int, cfg: DataConfig, out_dir: Path, what: str,
                    fix: str) -> None:
    """Raise TooManyBadFiles, naming examples and the threshold, when the quarantined share of
    `total` input files passes `data.max_bad_fraction`."""
    bad_fraction = len(quarantine) / max(1, total)
    if bad_fraction > cfg.max_bad_fraction:
        examples = "; ".join(f"{q['path']}: {q['reason']}" for q in quarantine[:3])
        raise TooManyBadFiles(
            f"{len(quarantine)} of {total} {what} are unusable "
            f"({bad_fraction:.0%} > data.max_bad_fraction={cfg.max_bad_fraction}), e.g. {examples}. "
            f"See {Path(out_dir) / 'quarantine.json'}; {fix}, or raise data.max_bad_fraction"
        )


# ----------------------------------------------------------------------------------------------
# One clip (runs in worker processes: keep torch out of this module's imports)
# ----------------------------------------------------------------------------------------------


def resize_crop(frame: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) of `size` (a side or (height, width)): area-resize
    to cover it, aspect kept, and centre-crop the remainder."""
    height, width = (size, size) if isinstance(size, int) else size
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        # BOX averages every source pixel under a target pixel: area resampling, no aliasing.
        frame = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BOX))
    top, left = (nh - height) // 2, (nw - width) // 2
    return frame[top : top + height, left : left + width]


def nearest_size(height: int, width: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The clip size (of `data.clip_sizes`) whose aspect ratio is nearest a video's (on a log
    scale, so 2:1 and 1:2 are as far from square): only the small remainder is cropped."""
    ratio = np.log(height / width)
    return min(sizes, key=lambda s: abs(np.log(s[0] / s[1]) - ratio))


def aspect_of(height: int, width: int) -> str:
    return "square" if height == width else "landscape" if width > height else "portrait"


def window_start(rec: dict, frames: int, fps: int, seed: int) -> float:
    """Start (seconds) of the clip cut from a metadata record's video: a whole number of clip
    frames into it, drawn per video (seeded), so the clip lies anywhere within the video."""
    span = int(rec["frames"]) / float(rec["fps"]) - (frames - 1) / fps  # room beyond one clip, s
    last = max(0, int(np.floor(span * fps - 1e-6)))  # later starts could need a frame past the end
    return random.Random(f"{seed}:{rec['id']}").randint(0, last) / fps


def load_clip(path: Path, frames: int, fps: int, size: int | list[tuple[int, int]],
              start: float = 0.0) -> np.ndarray:
    """Decode `frames` frames at `fps` from `start` seconds on as uint8 (3, T, H, W); ValueError
    with the reason if unusable. Decoding stops at the clip's last frame. `size`: a square side,
    or the clip sizes (height, width) to choose from by the video's aspect ratio."""
    if not path.exists():
        raise ValueError("missing file")
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        # A target frame's slack past the clip's end covers rounding to the nearest source frame.
        video, src_fps = read_clip(path, end_time=start + frames / fps)
    except Exception as exc:  # PyAV raises many error types for corrupt input
        raise ValueError(f"undecodable: {type(exc).__name__}: {exc}") from None
    # The nearest source frame to each target time start + i / fps.
    index = np.round((start + np.arange(frames) / fps) * src_fps).astype(int)
    if index[-1] >= len(video):
        raise ValueError(f"too short: {len(video)} frames at {src_fps:g} fps, need "
                         f"{frames} frames at {fps} fps from {start:g} s")
    if not isinstance(size, int):
        size = nearest_size(*video[0].shape[:2], size)
    clip = np.stack([resize_crop(video[i], size) for i in index])  # (T, H, W, 3)
    return np.ascontiguousarray(clip.transpose(3, 0, 1, 2))


def _load_job(job: tuple[str, int, int, list[tuple[int, int]], float]) -> tuple[np.ndarray | None, str]:
    path, frames, fps, size, start = job
    try:
        return load_clip(Path(path), frames, fps, size, start), ""
    except ValueError as exc:
        return None, str(exc)


def clip_stats(clip: np.ndarray) -> dict[str, float]:
    """motion_score (mean absolute frame difference), mean and std, all on a [0, 1] scale."""
    x = clip.astype(np.float32) / 255.0  # (3, T, H, W)
    return {
        "motion_score": round(float(np.abs(np.diff(x, axis=1)).mean()), 6),
        "mean": round(float(x.mean()), 6),
        "std": round(float(x.std()), 6),
    }


# ----------------------------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------------------------


def read_metadata(raw_dir: Path) -> list[dict]:
    path = Path(raw_dir) / "metadata.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the synth stage first")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not valid JSON ({exc}): rerun the synth stage") from None
        missing = [k for k in METADATA_KEYS if k not in rec]
        if missing:
            raise ValueError(f"{path}:{n} lacks {', '.join(missing)}: rerun the synth stage")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} lists no videos: rerun the synth stage")
    return records


def assign_splits(records: list[dict], val_fraction: float, seed: int) -> dict[str, str]:
    """clip id -> train | val | heldout, deterministic in (ids, seed)."""
    train = sorted(r["id"] for r in records if r["split"] == "train")
    val = set(random.Random(seed + 1).sample(train, int(round(val_fraction * len(train)))))
    return {r["id"]: "val" if r["id"] in val else r["split"] for r in records}


def fits(rec: dict, frames: int, fps: int) -> bool:
    """Whether a metadata record's video holds a clip of `frames` frames at `fps`."""
    return round((frames - 1) / fps * float(rec["fps"])) < int(rec["frames"])


def assign_clip_frames(records: list[dict], cfg: DataConfig, seed: int) -> dict[str, int]:
    """clip id -> the length (frames) of the clip cut from its video: the `data.clip_frames`
    entries tiled over the videos and shuffled (its own seeded stream, over every video so a shard
    never changes another's draw), so each entry is drawn equally often; a video too short for its
    draw gets the longest length it holds (one too short for any is quarantined by `load_clip`)."""
    choices = list(cfg.clip_frames) or [cfg.frames]
    tiled = [choices[i % len(choices)] for i in range(len(records))]
    if len(set(choices)) > 1:  # one length draws nothing: the clips of before clip_frames
        random.Random(f"{seed}:clip_frames").shuffle(tiled)
    out = {}
    for rec, frames in zip(records, tiled):
        held = [n for n in cfg.clip_lengths if n <= frames and fits(rec, n, cfg.fps)]
        out[rec["id"]] = max(held) if held else frames
    return out


def _decode_all(jobs: list[tuple[str, int, int, list[tuple[int, int]], float]], workers: int) -> list[tuple[np.ndarray | None, str]]:
    if workers <= 1:
        return [_load_job(j) for j in jobs]
    # spawn, not fork: the calling process may hold threads (MLflow, torch) that fork would copy.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_load_job, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


def shard_video(clips: list[np.ndarray]):
    """A shard's `video`: one uint8 (N, 3, T, H, W) tensor when its clips share a shape (always,
    with one clip size), else the list of N (3, T, H, W) clips (native sizes, in manifest order)."""
    import torch

    if len({c.shape for c in clips}) == 1:
        return torch.from_numpy(np.stack(clips))
    return [torch.from_numpy(c) for c in clips]


def write_clips(out_dir: Path, items: list[tuple[dict, np.ndarray]], shard_size: int
                ) -> tuple[list[dict], list[str]]:
    """Write (manifest row without shard/index, uint8 (3, T, H, W) clip) pairs as shards plus
    `manifest.csv`, in order; remove shards left by an earlier, larger run. -> rows, shard names."""
    from components.checkpoint import atomic_torch_save, atomic_write_text

    rows, shards = [], []
    for start in range(0, len(items), shard_size):
        part = items[start : start + shard_size]
        name = f"shard-{len(shards):05d}.pt"
        atomic_torch_save({"video": shard_video([clip for _, clip in part]),
                           "clip_id": [r["clip_id"] for r, _ in part]}, out_dir / name)
        shards.append(name)
        for index, (row, _) in enumerate(part):
            rows.append({**row, "shard": name, "index": index})
    for stale in set(p.name for p in out_dir.glob("shard-*.pt")) - set(shards):
        (out_dir / stale).unlink()  # left by an earlier run with more clips
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "manifest.csv", buf.getvalue())
    return rows, shards


# ----------------------------------------------------------------------------------------------
# Per shard: what a Dask worker runs (flows/shards.py maps it; `prepare` loops over it)
# ----------------------------------------------------------------------------------------------


def plan_shards(raw_dir: Path, cfg: DataConfig) -> list[dict]:
    """The keyword arguments of `prepare_shard` for each shard: `data.shard_size` input videos
    each, in metadata order, named by their range (a few bytes to send to a remote worker)."""
    total = len(read_metadata(raw_dir))
    return [{"index": i, "start": start, "stop": min(start + cfg.shard_size, total)}
            for i, start in enumerate(range(0, total, cfg.shard_size))]


def prepare_shard(raw_dir: Path, out_dir: Path, cfg: DataConfig, seed: int, index: int, start: int,
                  stop: int, workers: int = 1) -> dict:
    """Decode videos `start:stop` of the metadata and write `shard-{index:05d}.pt` with the usable ones.

    Returns its manifest rows and quarantine entries (no tensors: the result crosses the network
    when the shard ran on a remote Dask worker). A shard whose every video is broken writes no file.
    """
    every = read_metadata(raw_dir)
    splits = assign_splits(every, cfg.val_fraction, seed)  # over all videos: a shard never moves a split
    lengths = assign_clip_frames(every, cfg, seed)
    records = every[start:stop]
    jobs = [(str(Path(raw_dir) / r["file"]), lengths[r["id"]], cfg.fps, cfg.clip_sizes,
             window_start(r, lengths[r["id"]], cfg.fps, seed)) for r in records]
    rows, clips, quarantine = [], [], []
    for rec, (clip, reason) in zip(records, _decode_all(jobs, workers)):
        if clip is None:
            quarantine.append({"id": rec["id"], "path": rec["file"], "reason": reason})
            continue
        visible = bool(rec["caption_visible"])
        rows.append({
            "clip_id": rec["id"], "source": rec["file"],
            "frames": clip.shape[1], "height": clip.shape[2], "width": clip.shape[3],
            "fps": cfg.fps, "split": splits[rec["id"]],
            "caption": rec["caption"] if visible else "", "caption_visible": visible,
            **{k: rec[k] for k in ("color", "shape", "motion", "speed", "size", "background")},
            **clip_stats(clip),
            "objects": int(rec.get("objects", 1)),
            **{k: rec.get(k, "") for k in world.SECOND_KEYS},
            "duration": float(rec.get("duration", int(rec["frames"]) / float(rec["fps"]))),
            "aspect": aspect_of(clip.shape[2], clip.shape[3]),  # the clip's, after resizing
        })
        clips.append(clip)
    name = f"shard-{index:05d}.pt"
    if clips:
        from components.checkpoint import atomic_torch_save

        atomic_torch_save({"video": shard_video(clips), "clip_id": [r["clip_id"] for r in rows]},
                          Path(out_dir) / name)
    for i, row in enumerate(rows):
        row.update(shard=name, index=i)
    return {"rows": rows, "quarantine": quarantine, "shard": name if clips else None}


def finish_prepare(raw_dir: Path, out_dir: Path, cfg: DataConfig, parts: list[dict], t0: float) -> dict:
    """Join the shards' results (in shard order): quarantine.json, the bad-share check,
    manifest.csv; remove shards an earlier, larger run left. Returns the stage summary."""
    from components.checkpoint import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    rows = [row for part in parts for row in part["rows"]]
    quarantine = [q for part in parts for q in part["quarantine"]]
    shards = [part["shard"] for part in parts if part["shard"]]
    atomic_write_json(out_dir / "quarantine.json", quarantine)
    check_bad_share(quarantine, len(rows) + len(quarantine), cfg, out_dir, f"videos in {raw_dir}",
                    "fix or regenerate the raw data")
    for stale in set(p.name for p in out_dir.glob("shard-*.pt")) - set(shards):
        (out_dir / stale).unlink()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "manifest.csv", buf.getvalue())
    seconds = time.time() - t0
    return {
        "clips": len(rows),
        "quarantined": len(quarantine),
        "shards": len(shards),
        **{f"clips_{s}": sum(r["split"] == s for r in rows) for s in ("train", "val", "heldout")},
        "seconds": round(seconds, 2),
        "clips_per_s": round(len(rows) / seconds, 1),
    }


def serial_map(fn: Callable[..., T], calls: list[dict]) -> list[T]:
    """`fn(**kwargs)` for each call, in order: what a `map_shards` argument must return."""
    return [fn(**kwargs) for kwargs in calls]


def prepare(raw_dir: Path, out_dir: Path, cfg: DataConfig, seed: int,
            map_shards: MapShards | None = None) -> dict:
    """Decode, normalise and shard every video in `raw_dir`; return a summary.

    `map_shards(prepare_shard, calls)` runs the shards (the stage passes a Dask map, see
    flows/shards.py); by default one after another, each decoding in `data.workers` processes.
    Either way the same files come out, byte for byte.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Under a map each shard is one worker's job: decoding pools inside it would oversubscribe.
    workers = cfg.workers if map_shards is None else 1
    calls = [{"raw_dir": Path(raw_dir), "out_dir": out_dir, "cfg": cfg, "seed": seed, "workers": workers, **kw}
             for kw in plan_shards(raw_dir, cfg)]
    parts = (map_shards or serial_map)(prepare_shard, calls)
    return finish_prepare(raw_dir, out_dir, cfg, parts, t0)
