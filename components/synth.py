"""The synthetic world: one coloured shape per clip, moving (or not) over a simple background.

Every clip is a pure function of (seed, clip index), so the data set is reproducible whatever the
number of worker processes. Attributes are drawn balanced: each attribute's values are tiled to
`num_videos` and shuffled independently, so every value appears equally often. Clips whose
colour-shape-motion triple is held out (`world.heldout_triples`) form the "heldout" split.

Shapes are drawn from signed distance functions with a one-pixel soft edge (analytic
anti-aliasing), and each trajectory is chosen so the whole object stays inside the frame.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from components import world
from components.config import DataConfig
from components.video_io import write_video

# Half-extent of each shape relative to its `world.SIZES` radius, chosen for similar areas.
SHAPE_EXTENT: dict[str, float] = {"circle": 1.0, "square": 0.89, "triangle": 1.25}
MARGIN = 0.02  # share of the side kept clear between the object and the frame edge
GREY = 128.0
NOISE_LEVEL, NOISE_AMPLITUDE, NOISE_CELLS = 80.0, 22.0, 6  # static, low-frequency texture
GRADIENT_RANGE = (25.0, 165.0)


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) from offsets (dx right, dy down) to the shape."""
    if shape == "circle":
        return np.sqrt(dx**2 + dy**2) - r
    if shape == "square":
        h = SHAPE_EXTENT["square"] * r
        qx, qy = np.abs(dx) - h, np.abs(dy) - h
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0)
    if shape == "triangle":
        # Equilateral triangle pointing up (Inigo Quilez, "2D distance functions").
        k = np.sqrt(3.0)
        half = SHAPE_EXTENT["triangle"] * r * k / 2  # half the side, from the circumradius
        px, py = np.abs(dx) - half, -dy + half / k
        fold = px + k * py > 0
        px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
        px = px - np.clip(px, -2 * half, 0)
        return -np.sqrt(px**2 + py**2) * np.sign(py)
    raise ValueError(f"unknown shape {shape!r}: use one of {world.SHAPES}")


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float background, static across the clip."""
    if kind == "black":
        plane = np.zeros((size, size))
    elif kind == "grey":
        plane = np.full((size, size), GREY)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / np.sqrt(0.5) + 0.5  # in [0, 1]
        lo, hi = GRADIENT_RANGE
        plane = lo + (hi - lo) * np.clip(ramp, 0, 1)
    elif kind == "noise":
        cells = rng.normal(size=(NOISE_CELLS, NOISE_CELLS)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(cells, mode="F").resize((size, size), Image.BICUBIC))
        plane = NOISE_LEVEL + NOISE_AMPLITUDE * np.clip(smooth, -2, 2)
    else:
        raise ValueError(f"unknown background {kind!r}: use one of {world.BACKGROUNDS}")
    return np.repeat(plane[:, :, None], 3, axis=2)


def render(attrs: dict[str, str], size: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """One clip as uint8 (T, H, W, 3)."""
    radius = world.SIZES[attrs["size"]]
    reach = SHAPE_EXTENT[attrs["shape"]] * radius + MARGIN  # centre-to-edge clearance
    lo, hi = reach, 1.0 - reach
    direction = np.array(world.MOTIONS[attrs["motion"]])
    travel = world.SPEEDS[attrs["speed"]] * (hi - lo) * direction  # (2,) over the whole clip
    # Choose the start so the whole trajectory stays in [lo, hi] on both axes.
    first, last = lo - np.minimum(travel, 0), hi - np.maximum(travel, 0)
    start = first + rng.uniform(size=2) * np.maximum(last - first, 0)
    progress = np.linspace(0.0, 1.0, frames)[:, None]
    centres = ((start + progress * travel) * size - 0.5).astype(np.float32)  # (T, 2) pixels

    pix = np.arange(size, dtype=np.float32)
    dx = pix[None, None, :] - centres[:, 0, None, None]  # (T, 1, W)
    dy = pix[None, :, None] - centres[:, 1, None, None]  # (T, H, 1)
    dist = _shape_sdf(attrs["shape"], dx, dy, radius * size)  # (T, H, W)
    alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # one-pixel soft edge

    colour = np.array(world.COLORS[attrs["color"]], dtype=np.float32)
    background = _background(attrs["background"], size, rng).astype(np.float32)
    video = background[None] * (1 - alpha) + colour * alpha
    return np.clip(video + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------


def _plan(cfg: DataConfig, seed: int) -> list[dict]:
    """Metadata records (no files yet): balanced attributes, splits and caption visibility."""
    rng = random.Random(seed)
    n = cfg.num_videos
    columns = {}
    for name, values in world.ATTRIBUTES.items():
        tiled = [values[i % len(values)] for i in range(n)]
        rng.shuffle(tiled)
        columns[name] = tiled
    held = world.heldout_triples(cfg.heldout_fraction, seed)
    records = []
    for i in range(n):
        attrs = {name: columns[name][i] for name in world.ATTRIBUTES}
        triple = (attrs["color"], attrs["shape"], attrs["motion"])
        clip_id = f"v{i:06d}"
        records.append({
            "id": clip_id,
            "file": f"videos/{clip_id}.mp4",
            **attrs,
            "caption": world.caption(attrs),
            "split": "heldout" if triple in held else "train",
            "caption_visible": False,
            "fps": cfg.fps,
            "frames": cfg.frames,
            "width": cfg.raw_size,
            "height": cfg.raw_size,
        })
    train = [r for r in records if r["split"] == "train"]
    for r in rng.sample(train, int(round(cfg.caption_fraction * len(train)))):
        r["caption_visible"] = True
    return records


def _write_clips(job: tuple[str, list[dict], int, int]) -> int:
    """Worker: render and encode the given records. Top level so process pools can pickle it."""
    out_dir, records, seed, size = job
    for rec in records:
        rng = np.random.default_rng([seed, int(rec["id"][1:])])
        video = render(rec, size, rec["frames"], rng)
        write_video(Path(out_dir) / rec["file"], video, rec["fps"], threads=1)
    return len(records)


def generate(out_dir: Path, cfg: DataConfig, seed: int) -> dict:
    """Write `out_dir/videos/*.mp4` and `out_dir/metadata.jsonl`; return a summary."""
    # Imported here: spawned workers import this module, and checkpoint pulls in torch (~3 s).
    from components.checkpoint import atomic_write_text

    t0 = time.time()
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    records = _plan(cfg, seed)
    chunk = max(1, -(-len(records) // (4 * max(1, cfg.workers))))
    jobs = [(str(out_dir), records[i : i + chunk], seed, cfg.raw_size) for i in range(0, len(records), chunk)]
    if cfg.workers > 1:
        # spawn, not fork: the calling process may hold threads (MLflow, torch) that fork would copy.
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            written = sum(pool.map(_write_clips, jobs))
    else:
        written = sum(map(_write_clips, jobs))
    assert written == len(records)
    atomic_write_text(out_dir / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    seconds = time.time() - t0
    return {
        "videos": len(records),
        "train": sum(r["split"] == "train" for r in records),
        "heldout": sum(r["split"] == "heldout" for r in records),
        "caption_visible": sum(r["caption_visible"] for r in records),
        "seconds": round(seconds, 2),
        "videos_per_s": round(len(records) / seconds, 1),
    }
