"""Reading and writing video with PyAV. Frames are always uint8 arrays (T, H, W, 3), RGB.

Writes go to a temporary sibling first and are renamed into place (never a half-written file).
"""

from __future__ import annotations

import io
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames should be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18, threads: int = 0) -> bytes:
    """H.264 in MP4. Odd sides are padded to even (yuv420p needs even sizes).

    `threads=0` lets x264 choose; pass 1 when many small clips are encoded in parallel processes
    (x264's thread start-up then costs more than the encoding).
    """
    frames = _check_frames(frames)
    t, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        # asm=0: x264's SIMD paths gave different bytes for the same frames from run to run
        # (seen in 1 of 10 clips); the C paths are deterministic, and at these sizes as fast.
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": str(threads),
                          "x264-params": "asm=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_gif(frames: np.ndarray, fps: int) -> bytes:
    from PIL import Image

    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_video(path: str | Path, frames: np.ndarray, fps: int, threads: int = 0) -> Path:
    """Write MP4 or GIF by the file's suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        data = encode_mp4(frames, fps, threads=threads)
    elif suffix == ".gif":
        data = encode_gif(frames, fps)
    else:
        raise ValueError(f"{path}: unsupported video suffix {suffix!r}; use .mp4 or .gif")
    _atomic_write(path, data)
    return path


def read_video(source: str | Path | bytes, max_frames: int | None = None) -> np.ndarray:
    """Decode every frame (or the first `max_frames`) as uint8 (T, H, W, 3)."""
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    frames = []
    with av.open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{source if not isinstance(source, bytes) else 'bytes'}: no video frames")
    return np.stack(frames)


def read_clip(source: str | Path | bytes, max_frames: int | None = None,
              end_time: float | None = None) -> tuple[np.ndarray, float]:
    """Decode like `read_video` on the calling thread, and return the stream's frame rate too.
    `end_time` (seconds): stop after the first frame at or past it.

    For many small clips decoded in worker processes: FFmpeg's decoder threads cost more than
    they save there (measured about 3x slower per 64x64 clip).
    """
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    frames = []
    with av.open(src) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
            if end_time is not None and frame.time is not None and frame.time >= end_time:
                break
    if not frames:
        raise ValueError("no video frames")
    if fps <= 0:
        raise ValueError("unknown frame rate")
    return np.stack(frames), fps
