"""A folder of the user's own videos -> training clips in the synthetic path's format.

Two steps, one per DVC stage, so DVC versions the raw input as well as the clips:

- `stage_folder(source, raw_dir)` (the `synth` stage when `data.source` is a folder): walks the
  folder recursively, copies every video (mp4, mov, mkv, webm, avi, animated gif) and its caption
  into `raw_dir/videos/`, and writes `raw_dir/sources.jsonl` (one line per video: `id`, `file`,
  `caption` or null) and `raw_dir/skipped.json` (symlinks leading outside the folder, which are
  not followed). Captions: `NAME.txt` beside `NAME.mp4`, or a `*.csv` / `*.jsonl` manifest with
  `path` and `caption` columns (paths relative to the manifest).
- `ingest(raw_dir, out_dir, cfg, icfg, seed)` (the `prepare` stage): every video is probed
  (duration, fps, size, codec) and decoded in a process pool, each frame downscaled while
  decoding (`VideoFrame.reformat`, never the whole video at full resolution) and resampled to
  `data.fps`; long videos split at scene cuts (mean frame difference above
  `ingest.scene_threshold`); each scene gives up to `ingest.max_clips_per_scene` consecutive
  clips, each the longest of `data.clip_frames` (default `data.frames`) that the rest of the scene
  holds (a 26-frame scene: 17 + 9 with [9, 17]; a user's video has no drawn length, its duration
  decides, so most clips are full length); clips below `ingest.min_motion` are dropped and near-duplicates (a
  perceptual hash within `ingest.dedup_max_distance` bits) kept once. Output: the shards,
  `manifest.csv` (attribute columns empty), `quarantine.json` (every unusable file and its
  reason) and `ingest.json` (each file's probe and what became of it).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path

import av
import numpy as np

from components.config import DataConfig, IngestConfig
from components.prepare import aspect_of, check_bad_share, clip_stats, nearest_size, write_clips

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
SOURCES = "sources.jsonl"
SKIPPED = "skipped.json"
# First bytes of the containers we read: a file that starts like one but fails is truncated or
# corrupt; one that starts like none is not a video at all.
SIGNATURES = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"GIF8"), (4, b"moov"),
              (4, b"mdat"), (4, b"wide"), (4, b"free"))
HASH_SIDE = 32  # perceptual hash: DCT of a 32x32 grey frame, its 8x8 low frequencies


# ----------------------------------------------------------------------------------------------
# Staging the folder (raw stage)
# ----------------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _manifest_captions(path: Path) -> dict[Path, str]:
    """{absolute video path: caption} from a CSV or JSONL manifest; other CSVs yield nothing."""
    rows: list[dict] = []
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return {}
    out = {}
    for row in rows:
        if isinstance(row, dict) and row.get("path") and row.get("caption"):
            out[(path.parent / str(row["path"])).resolve()] = str(row["caption"]).strip()
    return out


def scan_folder(source: Path) -> tuple[list[tuple[Path, str]], dict[Path, str], list[dict]]:
    """-> [(absolute file, relative name)], {absolute file: caption}, skipped entries."""
    root = Path(source).resolve()
    videos, captions, skipped = [], {}, []
    manifests = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in [*sorted(files), *(d for d in dirs if (Path(folder) / d).is_symlink())]:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not _inside(target, root):
                    skipped.append({"path": rel, "reason": f"symlink leading outside the folder, not "
                                                           f"followed (-> {os.readlink(path)})"})
                    continue
                if target.is_dir():
                    continue  # inside the folder: walked there already
            suffix = path.suffix.lower()
            if suffix in VIDEO_SUFFIXES:
                videos.append((path, rel))
            elif suffix in MANIFEST_SUFFIXES:
                manifests.append(path)
    for path in manifests:
        captions.update(_manifest_captions(path))
    for path, _ in videos:
        sidecar = path.with_suffix(".txt")
        if sidecar.exists() and _inside(sidecar.resolve(), root):
            text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                captions[path.resolve()] = text  # beside the video wins over a manifest
    return videos, captions, skipped


def stage_folder(source: str | Path, raw_dir: Path) -> dict:
    """Copy the user's videos and captions into `raw_dir` (what DVC versions); return a summary."""
    from components.checkpoint import atomic_write_json, atomic_write_text

    source = Path(source).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"data.source={str(source)!r} is not a folder: pass the folder of your "
                                f"videos (zoetrope run --data PATH) or data.source=synthetic")
    videos, captions, skipped = scan_folder(source)
    if not videos and not skipped:
        raise ValueError(f"{source} holds no videos ({', '.join(VIDEO_SUFFIXES)}): check the path")
    raw_dir = Path(raw_dir)
    records = []
    for n, (path, rel) in enumerate(videos):
        dest = raw_dir / "videos" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(path, dest)  # follows links inside the folder; never copies a link
        except OSError as exc:
            skipped.append({"path": rel, "reason": f"unreadable: {type(exc).__name__}: {exc}"})
            continue
        records.append({"id": f"u{n:05d}", "file": f"videos/{rel}", "caption": captions.get(path.resolve())})
    atomic_write_text(raw_dir / SOURCES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(raw_dir / SKIPPED, skipped)
    return {"videos": len(records), "captioned": sum(r["caption"] is not None for r in records),
            "skipped": len(skipped)}


# ----------------------------------------------------------------------------------------------
# One file (runs in worker processes)
# ----------------------------------------------------------------------------------------------


def _target_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) that covers the clip size (height, width), aspect kept (even sides are
    not needed for RGB)."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[1], round(width * scale)), max(size[0], round(height * scale))


def _crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = frame.shape[:2]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return frame[top:top + size[0], left:left + size[1]]


def decode_resampled(path: str | Path, fps: int, size: int | list[tuple[int, int]]) -> tuple[np.ndarray, dict]:
    """Decode to uint8 (N, H, W, 3) at `fps`, each kept frame downscaled by FFmpeg as it is
    decoded (area filter) and centre-cropped; -> frames and the probe (codec, size, fps, ...).
    `size`: a square side, or the clip sizes (height, width) of `data.aspects`, of which the one
    nearest the video's aspect ratio is taken (`prepare.nearest_size`): only a small remainder
    is cropped.

    Only the frames nearest each target time are converted, so memory and time grow with the
    output, not the source resolution. Raises ValueError with a user-facing reason.
    """
    try:
        container = av.open(str(path))
    except av.error.InvalidDataError as exc:
        raise ValueError(_unreadable(path, exc)) from None
    with container:
        if not container.streams.video:
            raise ValueError("not a video: no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise ValueError("unsupported codec: this FFmpeg build has no decoder for the video stream")
        cc = stream.codec_context
        cc.thread_count = 1  # one process per core already; FFmpeg threads would compete
        src_fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                    else (container.duration or 0) / av.time_base)
        probe = {"codec": cc.name, "width": cc.width, "height": cc.height, "fps": round(src_fps, 3),
                 "duration": round(duration, 3)}
        if not cc.width or not cc.height:
            raise ValueError(f"unsupported video: frame size {cc.width}x{cc.height}")
        size = (size, size) if isinstance(size, int) else nearest_size(cc.height, cc.width, size)
        tw, th = _target_size(cc.width, cc.height, size)
        out: list[np.ndarray] = []
        prev, prev_t, t0, decoded, step = None, 0.0, None, 0, 1.0 / fps
        error = None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else decoded / (src_fps or fps)
                t0 = t if t0 is None else t0
                t -= t0
                decoded += 1
                # Emit every target time k*step that lies before this frame: nearest of prev / this.
                while prev is not None and len(out) * step <= t:
                    target = len(out) * step
                    pick = prev if target - prev_t < t - target else frame
                    out.append(_crop(pick.reformat(width=tw, height=th, format="rgb24",
                                                   interpolation="AREA").to_ndarray(), size))
                prev, prev_t = frame, t
        except (av.error.FFmpegError, ValueError) as exc:  # a truncated stream ends in an error
            error = exc
        if prev is not None:
            frame_time = 1.0 / (src_fps or fps)
            end = prev_t + frame_time
            # A quarter frame of slack: container timestamps are rounded (to ms in Matroska).
            while len(out) * step < end - frame_time / 4:
                out.append(_crop(prev.reformat(width=tw, height=th, format="rgb24",
                                               interpolation="AREA").to_ndarray(), size))
    probe["decoded_frames"] = decoded
    if not out:
        if error is not None:
            raise ValueError(f"truncated or corrupt: no frame decodes ({type(error).__name__}: {error})")
        raise ValueError("no video frames")
    if error is not None:
        probe["warning"] = f"decoding stopped early ({type(error).__name__}: {error})"
    return np.stack(out), probe


def _unreadable(path: str | Path, exc: Exception) -> str:
    with open(path, "rb") as fh:
        head = fh.read(12)
    if any(head[o:o + len(sig)] == sig for o, sig in SIGNATURES):
        return f"truncated or corrupt container: {exc}"
    return f"not a video (unrecognised data): {exc}"


def scene_bounds(frames: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Split (N, H, W, 3) at cuts: a mean absolute grey difference above `threshold` (in [0, 1])."""
    grey = frames.astype(np.float32).mean(-1) / 255.0  # (N, H, W)
    diff = np.abs(np.diff(grey, axis=0)).mean((1, 2))  # (N - 1,)
    cuts = [0, *(int(i) + 1 for i in np.flatnonzero(diff > threshold)), len(frames)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


_DCT = None


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(clip: np.ndarray) -> np.ndarray:
    """Perceptual hash of a (3, T, H, W) clip: 64 DCT bits of its first, middle and last frames."""
    global _DCT
    if _DCT is None:
        _DCT = _dct_matrix(HASH_SIDE)
    from PIL import Image

    bits = []
    for t in (0, clip.shape[1] // 2, clip.shape[1] - 1):
        grey = Image.fromarray(np.ascontiguousarray(clip[:, t].transpose(1, 2, 0))).convert("L")
        x = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.BOX), np.float32)
        low = (_DCT @ x @ _DCT.T)[:8, :8].ravel()
        bits.append(low > np.median(low[1:]))  # the DC term says only how bright the frame is
    return np.packbits(np.concatenate(bits))  # (24,) uint8 = 192 bits


def process_file(job: tuple) -> dict:
    """Worker: one video -> its clips, stats and hashes, or the reason it is unusable."""
    path, lengths, fps, size, icfg = job  # lengths: data.clip_lengths, shortest first
    shortest = lengths[0]
    out = {"clips": [], "reason": "", "probe": {}, "filtered": {"motion": 0, "short_scene": 0}}
    try:
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        video, probe = decode_resampled(path, fps, size)  # (N, H, W, 3)
        out["probe"] = probe
        if len(video) < shortest:
            raise ValueError(f"too short: {len(video) / fps:.2f} s, a clip needs {shortest / fps:.2f} s "
                             f"({shortest} frames at {fps} fps)")
        for a, b in scene_bounds(video, icfg.scene_threshold):
            if b - a < shortest:
                out["filtered"]["short_scene"] += 1
                continue
            start = a
            for _ in range(icfg.max_clips_per_scene):
                held = [n for n in lengths if n <= b - start]
                if not held:
                    break
                frames = max(held)  # the longest clip the rest of the scene holds
                clip = np.ascontiguousarray(video[start:start + frames].transpose(3, 0, 1, 2))
                clip_start, start = start, start + frames
                stats = clip_stats(clip)
                if icfg.min_motion > 0 and stats["motion_score"] < icfg.min_motion:
                    out["filtered"]["motion"] += 1
                    continue
                out["clips"].append({"start": round(clip_start / fps, 3), "clip": clip, "stats": stats,
                                     "hash": phash(clip)})
    except ValueError as exc:
        out["reason"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run
        out["reason"] = f"undecodable: {type(exc).__name__}: {exc}"
    return out


# ----------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------


def read_sources(raw_dir: Path) -> tuple[list[dict], list[dict]]:
    raw_dir = Path(raw_dir)
    path = raw_dir / SOURCES
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the synth stage with data.source set to your folder")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    skipped = json.loads((raw_dir / SKIPPED).read_text()) if (raw_dir / SKIPPED).exists() else []
    return records, skipped


def decode_files(paths: list[str], cfg: DataConfig, icfg: IngestConfig) -> list[dict]:
    jobs = [(p, cfg.clip_lengths, cfg.fps, cfg.clip_sizes, icfg) for p in paths]
    workers = cfg.workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) <= 1:
        return [process_file(j) for j in jobs]
    # spawn, not fork: the calling process may hold threads (MLflow, torch) that fork would copy.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.map(process_file, jobs, chunksize=1)  # files differ in length: no big chunks


def ingest(raw_dir: Path, out_dir: Path, cfg: DataConfig, icfg: IngestConfig, seed: int) -> dict:
    """Clips from the staged folder; writes the shards, manifest.csv, quarantine.json, ingest.json."""
    from components.checkpoint import atomic_write_json

    t0 = time.time()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    records, skipped = read_sources(raw_dir)
    results = decode_files([str(raw_dir / r["file"]) for r in records], cfg, icfg)

    quarantine = [{"id": None, "path": s["path"], "reason": s["reason"]} for s in skipped]
    report, kept, hashes = [], [], np.zeros((0, 24), np.uint8)
    duplicates = 0
    for rec, res in zip(records, results):
        rel = rec["file"].removeprefix("videos/")
        entry = {"path": rel, **res["probe"], "clips": 0, "filtered": res["filtered"], "duplicates": 0}
        if res["reason"]:
            quarantine.append({"id": rec["id"], "path": rel, "reason": res["reason"]})
            entry["reason"] = res["reason"]
        for k, c in enumerate(res["clips"]):
            if len(hashes):
                distance = np.unpackbits(hashes ^ c["hash"], axis=1).sum(1).min()
                if distance <= icfg.dedup_max_distance:
                    duplicates += 1
                    entry["duplicates"] += 1
                    continue
            hashes = np.vstack([hashes, c["hash"][None]])
            kept.append((rec, rel, k, c))
            entry["clips"] += 1
        report.append(entry)

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "quarantine.json", quarantine)
    atomic_write_json(out_dir / "ingest.json", {"files": report, "skipped": skipped})
    check_bad_share(quarantine, len(records) + len(skipped), cfg, out_dir, "files in the video folder",
                    "fix or remove them")
    if not kept:
        raise ValueError(f"no clips from {raw_dir}: every video was quarantined or filtered "
                         f"(see {out_dir / 'ingest.json'}); lower ingest.min_motion or add longer videos")

    # Split by source video, so clips of one video never sit in both train and val.
    ids = sorted({rec["id"] for rec, *_ in kept})
    val = set(random.Random(seed + 1).sample(ids, int(round(cfg.val_fraction * len(ids)))))
    items = []
    for rec, rel, k, c in kept:
        caption = rec.get("caption") or ""
        items.append(({
            "clip_id": f"{rec['id']}-{k:03d}", "source": f"{rel}@{c['start']:g}s",
            "frames": c["clip"].shape[1], "height": c["clip"].shape[2], "width": c["clip"].shape[3],
            "fps": cfg.fps, "split": "val" if rec["id"] in val else "train",
            "caption": caption, "caption_visible": bool(caption),
            **{a: "" for a in ("color", "shape", "motion", "speed", "size", "background")},
            **c["stats"],
            "aspect": aspect_of(c["clip"].shape[2], c["clip"].shape[3]),
        }, c["clip"]))
    rows, shards = write_clips(out_dir, items, cfg.shard_size)
    seconds = time.time() - t0
    return {
        "clips": len(rows),
        "videos": len(records),
        "quarantined": len(quarantine),
        "duplicates": duplicates,
        "filtered_motion": sum(r["filtered"]["motion"] for r in results),
        "shards": len(shards),
        **{f"clips_{s}": sum(r["split"] == s for r in rows) for s in ("train", "val", "heldout")},
        "seconds": round(seconds, 2),
        "clips_per_s": round(len(rows) / seconds, 1),
    }
