"""Ingesting a folder of the user's own videos: mixed containers, broken files, scene cuts, dedup."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from components.clips import load_clips
from components.config import DataConfig, IngestConfig
from components.ingest import decode_resampled, ingest, scan_folder, stage_folder
from components.prepare import MANIFEST_COLUMNS, TooManyBadFiles

SEED = 1
CFG = DataConfig(size=16, frames=9, fps=8, val_fraction=0.2, shard_size=8, workers=2, max_bad_fraction=0.3)
ICFG = IngestConfig(scene_threshold=0.2, max_clips_per_scene=2, min_motion=0.0, dedup_max_distance=12)
# (container format, codec, suffix)
CONTAINERS = [("mp4", "libx264", ".mp4"), ("matroska", "libx264", ".mkv"), ("webm", "libvpx-vp9", ".webm"),
              ("avi", "mpeg4", ".avi"), ("mov", "libx264", ".mov"), ("gif", None, ".gif")]


def _has_encoder(codec: str | None) -> bool:
    if codec is None:
        return True
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:  # noqa: BLE001 - any failure means this FFmpeg build lacks it
        return False


def pattern(seed: int, n: int, w: int, h: int, shift: int = 2) -> np.ndarray:
    """A distinct blocky texture per seed, scrolling right: uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(cells).resize((w * 2, h), Image.NEAREST))
    return np.stack([np.roll(base, i * shift, axis=1)[:, :w] for i in range(n)])


def write(path: Path, frames: np.ndarray, fps: int, fmt: str, codec: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        if codec == "libx264":  # x264's SIMD paths are not deterministic (see video_io.encode_mp4)
            s.options = {"x264-params": "asm=0"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    """>= 20 good videos in mixed containers (odd names, subfolders, captions) plus 6 broken files."""
    root = tmp_path_factory.mktemp("user videos") / "my clips"
    usable = [c for c in CONTAINERS if _has_encoder(c[1])]
    expect: dict = {"good": [], "broken": {}}
    for i in range(21):
        fmt, codec, suffix = usable[i % len(usable)]
        w, h = [(48, 32), (32, 48), (40, 40)][i % 3]  # landscape, portrait, square
        sub = ["", "holiday/", "holiday/day 2/"][i % 3]
        name = f"{sub}clip {i:02d}{' été' if i % 5 == 0 else ''}{suffix}"
        write(root / name, pattern(i, 24, w, h), 12, fmt, codec)  # 2 s at 12 fps
        expect["good"].append(name)
    # One long video with a hard cut: two scenes of 3 s each.
    long = np.concatenate([pattern(100, 36, 64, 48), pattern(200, 36, 64, 48)[:, ::-1]])
    write(root / "long take.mp4", long, 12, "mp4", "libx264")
    expect["good"].append("long take.mp4")
    # The same content as clip 01 in another container: a duplicate.
    write(root / "holiday" / "zz copy of clip 01.mkv", pattern(1, 24, 32, 48), 12, "matroska", "libx264")
    expect["duplicate"] = "holiday/zz copy of clip 01.mkv"  # walked after clip 01: the copy goes
    # Captions: one beside its video, two in a CSV manifest.
    (root / "clip 00 été.txt").write_text("a scrolling texture of coloured blocks\n")
    expect["captions"] = {"clip 00 été.mp4": "a scrolling texture of coloured blocks",
                          expect["good"][1]: "blocks sliding to the right slowly",
                          "long take.mp4": "two scenes of blocks one after the other"}
    (root / "captions.csv").write_text(f"path,caption\n{expect['good'][1]},blocks sliding to the right slowly\n"
                                       "long take.mp4,two scenes of blocks one after the other\n")

    broken = expect["broken"]
    (root / "zero.mp4").write_bytes(b"")
    broken["zero.mp4"] = "empty file"
    good = (root / "long take.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
    broken["truncated.mp4"] = "truncated or corrupt"
    (root / "notes.mp4").write_text("these are my notes, not a video\n" * 40)
    broken["notes.mp4"] = "not a video"
    write(root / "short.mp4", pattern(300, 6, 32, 32), 12, "mp4", "libx264")  # 0.5 s
    broken["short.mp4"] = "too short"
    avi = write(root / "odd codec.avi", pattern(301, 24, 32, 32), 12, "avi", "mpeg4").read_bytes()
    for tag in (b"FMP4", b"fmp4", b"mp4v", b"XVID", b"DIVX"):  # a FourCC no decoder knows
        avi = avi.replace(tag, b"ZQZQ")
    (root / "odd codec.avi").write_bytes(avi)
    broken["odd codec.avi"] = "unsupported codec"
    outside = write(root.parent / "outside.mp4", pattern(302, 24, 32, 32), 12, "mp4", "libx264")
    os.symlink(outside, root / "link to outside.mp4")
    broken["link to outside.mp4"] = "symlink leading outside the folder"
    os.symlink(root / "clip 03.avi", root / "holiday" / "link inside.avi")  # followed: a good file
    return root, expect


@pytest.fixture(scope="module")
def ingested(folder, tmp_path_factory) -> tuple[Path, dict]:
    root, _ = folder
    raw = tmp_path_factory.mktemp("raw")
    stage_folder(root, raw)
    out = tmp_path_factory.mktemp("clips")
    return out, ingest(raw, out, CFG, ICFG, SEED)


def test_folder_has_what_the_issue_asks(folder):
    root, expect = folder
    videos, captions, skipped = scan_folder(root)
    names = {rel for _, rel in videos}
    assert len(expect["good"]) >= 20 and len(expect["broken"]) == 6
    assert len({Path(n).suffix for n in expect["good"]}) >= 5  # mixed containers
    assert set(expect["good"]) <= names
    assert [s["path"] for s in skipped] == ["link to outside.mp4"]
    assert "holiday/link inside.avi" in names
    assert len(captions) == 3


def test_broken_files_are_quarantined_with_reasons_and_the_rest_become_clips(folder, ingested):
    root, expect = folder
    out, summary = ingested
    quarantine = json.loads((out / "quarantine.json").read_text())
    reasons = {q["path"]: q["reason"] for q in quarantine}
    assert set(reasons) == set(expect["broken"])
    for path, start in expect["broken"].items():
        assert reasons[path].startswith(start), (path, reasons[path])
    report = json.loads((out / "ingest.json").read_text())
    files = {f["path"]: f for f in report["files"]}
    for name in expect["good"]:
        assert files[name]["clips"] >= 1 and "reason" not in files[name], files[name]
        assert {"codec", "width", "height", "fps", "duration"} <= set(files[name])
    assert files[expect["duplicate"]]["clips"] == 0 and files[expect["duplicate"]]["duplicates"] >= 1
    assert files["holiday/link inside.avi"]["duplicates"] >= 1  # the same file as clip 03.avi
    assert files["long take.mp4"]["clips"] == 2  # one clip from each scene
    assert summary["quarantined"] == 6 and summary["duplicates"] >= 2


def test_clips_follow_the_synthetic_path_contract(folder, ingested):
    out, summary = ingested
    data = load_clips(out)
    assert list(data.rows[0]) == list(MANIFEST_COLUMNS)
    assert data.video.shape[1:] == (3, CFG.frames, CFG.size, CFG.size)
    assert len(data) == summary["clips"] >= 22
    assert len({r["clip_id"] for r in data.rows}) == len(data)
    for r in data.rows:
        assert r["color"] == r["shape"] == r["motion"] == ""  # no ground truth for user videos
        assert r["fps"] == CFG.fps and r["split"] in ("train", "val")
        assert r["motion_score"] > 0 and 0 <= r["mean"] <= 1 and r["std"] > 0
    captions = {r["source"].split("@")[0]: r["caption"] for r in data.rows if r["caption_visible"]}
    assert captions == folder[1]["captions"]
    # A split per source video: its clips never straddle train and val.
    by_source: dict[str, set] = {}
    for r in data.rows:
        by_source.setdefault(r["clip_id"].split("-")[0], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_source.values())
    assert any(r["split"] == "val" for r in data.rows)


def test_too_many_bad_files_fails_naming_the_knob(folder, ingested, tmp_path):
    root, _ = folder
    raw = tmp_path / "raw"
    stage_folder(root, raw)
    cfg = DataConfig(**{**CFG.__dict__, "max_bad_fraction": 0.1, "workers": 1})
    with pytest.raises(TooManyBadFiles, match=r"data.max_bad_fraction=0.1"):
        ingest(raw, tmp_path / "clips", cfg, ICFG, SEED)
    assert len(json.loads((tmp_path / "clips" / "quarantine.json").read_text())) == 6


def test_motion_filter_drops_still_clips(tmp_path):
    src = tmp_path / "src"
    write(src / "moving.mp4", pattern(7, 24, 32, 32, shift=3), 12, "mp4", "libx264")
    write(src / "still.mp4", pattern(8, 24, 32, 32, shift=0), 12, "mp4", "libx264")
    stage_folder(src, tmp_path / "raw")
    cfg = DataConfig(**{**CFG.__dict__, "workers": 1, "val_fraction": 0.0})
    summary = ingest(tmp_path / "raw", tmp_path / "a", cfg, IngestConfig(min_motion=0.0), SEED)
    assert summary["clips"] == 2
    summary = ingest(tmp_path / "raw", tmp_path / "b", cfg, IngestConfig(min_motion=0.01), SEED)
    assert summary["clips"] == 1 and summary["filtered_motion"] == 1
    assert [r["source"] for r in load_clips(tmp_path / "b").rows] == ["moving.mp4@0s"]


def test_a_huge_video_is_downscaled_while_decoding(tmp_path):
    h, w, n = 2160, 3840, 12
    ramp = np.linspace(0, 255, w, dtype=np.float32)
    frames = np.stack([np.broadcast_to(np.roll(ramp, 40 * i).astype(np.uint8)[None, :, None], (h, w, 3))
                       for i in range(n)])
    path = write(tmp_path / "huge 4k.mp4", frames, 8, "mp4", "libx264")
    del frames
    full_res = n * h * w * 3
    tracemalloc.start()
    video, probe = decode_resampled(path, fps=8, size=32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert video.shape == (n, 32, 32, 3) and (probe["width"], probe["height"]) == (w, h)
    assert peak < full_res / 20, f"peak {peak / 1e6:.0f} MB of numpy memory for a {full_res / 1e6:.0f} MB video"


def test_resampling_follows_timestamps(tmp_path):
    levels = (np.arange(24) * 10).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (24, 32, 32, 3)).copy()
    path = write(tmp_path / "ramp.mkv", frames, 16, "matroska", "libx264")  # 1.5 s at 16 fps
    video, _ = decode_resampled(path, fps=8, size=16)
    assert len(video) == 12
    assert np.allclose(video.mean((1, 2, 3)) / 10, np.arange(0, 24, 2), atol=0.6)


def test_missing_folder_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source"):
        stage_folder(tmp_path / "nope", tmp_path / "raw")


def test_cli_run_data_that_is_not_a_folder_fails_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import make_project

    project = make_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k not in ("ZOETROPE_PROJECT", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--data", str(tmp_path / "nope")],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"zoetrope: error: --data '{tmp_path / 'nope'}' is not a folder: pass the folder of your videos"]
