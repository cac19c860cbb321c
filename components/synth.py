"""The synthetic world: one or two coloured shapes per video, moving (or not) over a simple background.

Every video is a pure function of (seed, clip index), so the data set is reproducible whatever the
number of worker processes. The first object's attributes are drawn balanced: each attribute's
values are tiled to `num_videos` and shuffled independently, so every value appears equally
often. A `data.two_object_fraction` share of videos adds a second object with its own colour
(always later in `world.COLORS` than the first's: the caption names the objects in colour
order), shape, size, motion and speed; its colour-shape-motion triple is never a held-out one.
Videos whose first triple is held out (`world.heldout_triples`) form the "heldout" split, so no
training video shows a held-out triple in either object.

Videos last between `data.min_duration` and `data.max_duration` seconds (at least `data.frames`,
the longest training clip, so every video holds a clip of any `data.clip_frames` length); prepare
cuts one clip from each, its length drawn from `data.clip_frames`. Speeds are pixel rates defined
over one training clip of `data.frames` frames (a shorter clip shows the same rate for fewer
frames), so a moving object's video is no longer than it takes to cross the frame (`max_frames`:
fast objects' videos last one clip).

Each video's clip size is drawn from `data.aspects` (square, landscape, portrait: balanced like the
attributes, from its own seeded stream so one aspect leaves every other draw as it was) and the
MP4 is written at `data.raw_size / data.size` times it, so prepare really decodes and downsizes.
Object sizes, margins and speeds are shares of the short side: an object looks the same and moves
as many pixels per frame in a landscape clip as in a square one, and stays inside either.

Shapes are drawn from signed distance functions with a one-pixel soft edge (analytic
anti-aliasing), and each trajectory is chosen so the whole object stays inside the frame.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from components import world
from components.config import DataConfig
from components.prepare import aspect_of
from components.video_io import write_video

# Half-extent of each shape relative to its `world.SIZES` radius, chosen for similar areas.
SHAPE_EXTENT: dict[str, float] = {"circle": 1.0, "square": 0.89, "triangle": 1.25}
MARGIN = 0.02  # share of the side kept clear between the object and the frame edge
GREY = 128.0
NOISE_LEVEL, NOISE_AMPLITUDE, NOISE_CELLS = 80.0, 22.0, 6  # static, low-frequency texture
GRADIENT_RANGE = (25.0, 165.0)
PLACEMENT_TRIES = 16  # draws of a second object's start, to keep it clear of the first


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


def _background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float background, static across the clip."""
    if kind == "black":
        plane = np.zeros((height, width))
    elif kind == "grey":
        plane = np.full((height, width), GREY)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width] / (max(height, width) - 1) - 0.5
        ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / np.sqrt(0.5) + 0.5  # in [0, 1]
        lo, hi = GRADIENT_RANGE
        plane = lo + (hi - lo) * np.clip(ramp, 0, 1)
    elif kind == "noise":
        cells = rng.normal(size=(NOISE_CELLS, NOISE_CELLS)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(cells, mode="F").resize((width, height), Image.BICUBIC))
        plane = NOISE_LEVEL + NOISE_AMPLITUDE * np.clip(smooth, -2, 2)
    else:
        raise ValueError(f"unknown background {kind!r}: use one of {world.BACKGROUNDS}")
    return np.repeat(plane[:, :, None], 3, axis=2)


def max_frames(speed: str, motion: str, clip_frames: int) -> int | None:
    """The longest video (frames) in which an object at this speed stays in the frame; None: any.

    A speed is a pixel rate: `world.SPEEDS` share of the short side's free span per training clip
    (`clip_frames`), so every clip cut from a longer video shows the same motion per frame.
    """
    if motion == "still":
        return None
    return 1 + int((clip_frames - 1) / world.SPEEDS[speed])


def _reach(obj: dict[str, str], short: int) -> float:
    """Pixels from the object's centre to beyond its edge (its bounding radius plus the margin)."""
    return (SHAPE_EXTENT[obj["shape"]] * world.SIZES[obj["size"]] + MARGIN) * short


def _trajectory(obj: dict[str, str], height: int, width: int, frames: int, clip_frames: int,
                rng: np.random.Generator) -> np.ndarray:
    """Pixel centres (T, 2) as (x, y), chosen so the whole object stays inside the frame."""
    short = min(height, width)
    reach = _reach(obj, short)
    lo, hi = np.array([reach, reach]), np.array([width - reach, height - reach])
    direction = np.array(world.MOTIONS[obj["motion"]])
    step = world.SPEEDS[obj["speed"]] * (short - 2 * reach) / max(1, clip_frames - 1) * direction
    travel = step * (frames - 1)  # (2,) over the whole video
    first, last = lo - np.minimum(travel, 0), hi - np.maximum(travel, 0)
    start = first + rng.uniform(size=2) * np.maximum(last - first, 0)
    return (start + np.arange(frames)[:, None] * step - 0.5).astype(np.float32)


def _apart(objects: list[dict[str, str]], height: int, width: int, frames: int, clip_frames: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Trajectories of the objects; the second's start is the best of PLACEMENT_TRIES draws
    (the first that never overlaps the first object, else the one that comes least close), so
    the object the caption names second is seen, not hidden behind the first."""
    paths = [_trajectory(objects[0], height, width, frames, clip_frames, rng)]
    if len(objects) > 1:
        short = min(height, width)
        clear = _reach(objects[0], short) + _reach(objects[1], short)
        best, best_gap = None, -np.inf
        for _ in range(PLACEMENT_TRIES):
            path = _trajectory(objects[1], height, width, frames, clip_frames, rng)
            gap = float(np.min(np.linalg.norm(path - paths[0], axis=1))) - clear
            if gap > best_gap:
                best, best_gap = path, gap
            if gap >= 0:
                break
        paths.append(best)
    return paths


def render(attrs: dict[str, str], size: int | tuple[int, int], frames: int, rng: np.random.Generator,
           clip_frames: int | None = None) -> np.ndarray:
    """One video as uint8 (T, H, W, 3): the first object, and the second (`color2`, ...) if set.

    `size` is the side of a square video or its (height, width). `clip_frames` (default `frames`)
    is the training clip length that the speeds are defined over.
    """
    height, width = (size, size) if isinstance(size, int) else size
    clip_frames = clip_frames or frames
    objects = [attrs]
    second = world.second_object(attrs)
    if second is not None:
        objects.append(second)
    paths = _apart(objects, height, width, frames, clip_frames, rng)
    video = _background(attrs["background"], height, width, rng).astype(np.float32)[None]
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    # The first object is drawn last, on top: the one the caption names first is always whole.
    for obj, centres in reversed(list(zip(objects, paths))):
        dx = xs[None, None, :] - centres[:, 0, None, None]  # (T, 1, W)
        dy = ys[None, :, None] - centres[:, 1, None, None]  # (T, H, 1)
        dist = _shape_sdf(obj["shape"], dx, dy, world.SIZES[obj["size"]] * min(height, width))
        alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # (T, H, W, 1), one-pixel soft edge
        colour = np.array(world.COLORS[obj["color"]], dtype=np.float32)
        video = video * (1 - alpha) + colour * alpha
    return np.clip(video + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------


def _companion(first: dict[str, str], rng: random.Random, held: set) -> dict[str, str] | None:
    """A second object: a colour after the first's in `world.COLORS` (the caption order rule),
    never a held-out colour-shape-motion triple; None when no such triple is left."""
    colours = list(world.COLORS)
    later = colours[colours.index(first["color"]) + 1:]
    triples = [t for t in itertools.product(later, world.SHAPES, world.MOTIONS) if t not in held]
    if not triples:
        return None
    color, shape, motion = rng.choice(triples)
    return {"color": color, "shape": shape, "motion": motion,
            "speed": rng.choice(world.ATTRIBUTES["speed"]), "size": rng.choice(world.ATTRIBUTES["size"])}


def _plan(cfg: DataConfig, seed: int) -> list[dict]:
    """Metadata records (no files yet): balanced first-object attributes, second objects,
    durations, splits and caption visibility."""
    rng = random.Random(seed)
    n = cfg.num_videos
    columns = {}
    for name, values in world.ATTRIBUTES.items():
        tiled = [values[i % len(values)] for i in range(n)]
        rng.shuffle(tiled)
        columns[name] = tiled
    held = world.heldout_triples(cfg.heldout_fraction, seed)
    last_colour = list(world.COLORS)[-1]
    # A second object's colour comes after the first's, so a first object of the last colour has none.
    can_pair = [i for i in range(n) if columns["color"][i] != last_colour]
    paired = set(rng.sample(can_pair, min(len(can_pair), int(round(cfg.two_object_fraction * n)))))
    # Its own stream: with one aspect the other draws (and so the videos) are as before aspects.
    sizes = cfg.clip_sizes
    aspect_rng = random.Random(f"{seed}:aspects")
    clip_size = [sizes[i % len(sizes)] for i in range(n)]
    aspect_rng.shuffle(clip_size)
    shortest = max(cfg.frames, round(cfg.min_duration * cfg.fps))
    longest = max(shortest, round(cfg.max_duration * cfg.fps))
    records = []
    for i in range(n):
        attrs = {name: columns[name][i] for name in world.ATTRIBUTES}
        second = _companion(attrs, rng, held) if i in paired else None
        frames = rng.randint(shortest, longest)
        for obj in (attrs, second or attrs):
            cap = max_frames(obj["speed"], obj["motion"], cfg.frames)
            frames = frames if cap is None else max(cfg.frames, min(frames, cap))
        attrs.update({a + world.SECOND_SUFFIX: (second or {}).get(a, "") for a in world.OBJECT_ATTRIBUTES})
        triple = (attrs["color"], attrs["shape"], attrs["motion"])
        clip_id = f"v{i:06d}"
        records.append({
            "id": clip_id,
            "file": f"videos/{clip_id}.mp4",
            **attrs,
            "objects": 2 if second else 1,
            "caption": world.caption(attrs),
            "split": "heldout" if triple in held else "train",
            "caption_visible": False,
            "fps": cfg.fps,
            "frames": frames,
            "duration": round(frames / cfg.fps, 4),
            "width": cfg.raw_side(clip_size[i][1]),  # the MP4's size; prepare resizes to the clip's
            "height": cfg.raw_side(clip_size[i][0]),
            "aspect": aspect_of(*clip_size[i]),
        })
    train = [r for r in records if r["split"] == "train"]
    for r in rng.sample(train, int(round(cfg.caption_fraction * len(train)))):
        r["caption_visible"] = True
    return records


def _write_clips(job: tuple[str, list[dict], int, int]) -> int:
    """Worker: render and encode the given records. Top level so process pools can pickle it."""
    out_dir, records, seed, clip_frames = job
    for rec in records:
        rng = np.random.default_rng([seed, int(rec["id"][1:])])
        video = render(rec, (rec["height"], rec["width"]), rec["frames"], rng, clip_frames)
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
    jobs = [(str(out_dir), records[i : i + chunk], seed, cfg.frames) for i in range(0, len(records), chunk)]
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
        "two_objects": sum(r["objects"] == 2 for r in records),
        **{f"aspect_{a}": sum(r["aspect"] == a for r in records) for a in ("square", "landscape", "portrait")},
        "mean_frames": round(sum(r["frames"] for r in records) / len(records), 2),
        "caption_visible": sum(r["caption_visible"] for r in records),
        "seconds": round(seconds, 2),
        "videos_per_s": round(len(records) / seconds, 1),
    }
