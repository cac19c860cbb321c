"""Ingestion throughput (clips/s) against plain PyAV decoding of the same files, in one run.

  PYTHONPATH=. nice -n 19 python benchmarks/ingest.py [--videos 32] [--seconds 8] [--side 240]

Writes a folder of synthetic-texture videos in mixed containers (mp4, mkv, webm, avi, mov, gif),
stages it as the raw stage does, then times, best of `--repeats`, on the same files:
  plain  - PyAV decoding every frame to RGB (`frame.to_ndarray(format="rgb24")`), one file after
           another with FFmpeg's own threads (thread_type AUTO): what PyAV gives out of the box;
  ingest - `components.ingest.ingest` with the project's settings: probe, decode, resample,
           resize, scene cuts, stats, perceptual hash, dedup, shards and manifest.
Prints both and the ratio ingest / plain (issue 3's target: >= 0.7).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components import config as C  # noqa: E402
from components.ingest import ingest, read_sources, stage_folder  # noqa: E402

CONTAINERS = [("mp4", "libx264", ".mp4"), ("matroska", "libx264", ".mkv"), ("webm", "libvpx-vp9", ".webm"),
              ("avi", "mpeg4", ".avi"), ("mov", "libx264", ".mov"), ("gif", None, ".gif")]


def texture(seed: int, n: int, w: int, h: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(cells).resize((w * 2, h), Image.BILINEAR))
    return np.stack([np.roll(base, 3 * i, axis=1)[:, :w] for i in range(n)])


def write(path: Path, frames: np.ndarray, fps: int, fmt: str, codec: str | None) -> None:
    if fmt == "gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def plain_decode(paths: list[Path]) -> int:
    frames = 0
    for path in paths:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in c.decode(stream):
                frame.to_ndarray(format="rgb24")
                frames += 1
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--side", type=int, default=240, help="source height; width is 4/3 of it")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", default="tiny")
    args = ap.parse_args()
    cfg = C.load(Path(__file__).resolve().parents[1] / "params.yaml", args.profile)

    with tempfile.TemporaryDirectory(prefix="zoetrope-bench-") as tmp:
        src, raw = Path(tmp) / "videos", Path(tmp) / "raw"
        src.mkdir()
        n = int(args.seconds * args.fps)
        for i in range(args.videos):
            fmt, codec, suffix = CONTAINERS[i % len(CONTAINERS)]
            h = args.side if fmt != "gif" else args.side // 2  # GIF decoding is slow at any size
            write(src / f"video {i:03d}{suffix}", texture(i, n, h * 4 // 3 // 2 * 2, h), args.fps, fmt, codec)
        stage_folder(src, raw)
        records, _ = read_sources(raw)
        paths = [raw / r["file"] for r in records]
        plain_decode(paths)  # warm the page cache for both
        plain_s, ingest_s, clips, frames = [], [], 0, 0
        for r in range(args.repeats):
            t0 = time.perf_counter()
            frames = plain_decode(paths)
            plain_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = ingest(raw, Path(tmp) / f"clips{r}", cfg.data, cfg.ingest, cfg.seed)
            ingest_s.append(time.perf_counter() - t0)
            clips = summary["clips"]
    best_plain, best_ingest = min(plain_s), min(ingest_s)
    result = {
        "videos": args.videos, "source": f"{args.side * 4 // 3}x{args.side} @ {args.fps} fps, {args.seconds} s",
        "clips": clips, "decoded_frames": frames, "workers": cfg.data.workers,
        "plain_decode_s": round(best_plain, 2), "ingest_s": round(best_ingest, 2),
        "plain_clips_per_s": round(clips / best_plain, 2), "ingest_clips_per_s": round(clips / best_ingest, 2),
        "ratio": round(best_plain / best_ingest, 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
