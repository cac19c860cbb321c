"""Synthetic data, preparation, quarantine and the Great Expectations manifest suite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from components import world
from components.clips import load_clips, read_manifest
from components.config import DataConfig
from components.prepare import MANIFEST_COLUMNS, TooManyBadFiles, prepare
from components.synth import generate
from components.video_io import write_video
from tests.conftest import data_fixtures, read_metadata, write_manifest

SEED = 3
CFG = DataConfig(num_videos=50, raw_size=32, size=16, frames=9, fps=8, caption_fraction=0.3,
                 heldout_fraction=0.15, val_fraction=0.1, shard_size=16, workers=1,
                 two_object_fraction=0.3, min_duration=1.0, max_duration=2.5)


raw, clips = data_fixtures(CFG, SEED, "clips")


def test_synth_is_deterministic_across_worker_counts(raw, tmp_path):
    again = tmp_path / "again"
    summary = generate(again, DataConfig(**{**CFG.__dict__, "workers": 2}), SEED)
    assert summary["videos"] == CFG.num_videos
    assert (again / "metadata.jsonl").read_text() == (raw / "metadata.jsonl").read_text()
    for rec in read_metadata(raw)[:10]:
        assert (again / rec["file"]).read_bytes() == (raw / rec["file"]).read_bytes()


def test_synth_metadata_contract(raw):
    records = read_metadata(raw)
    held = world.heldout_triples(CFG.heldout_fraction, SEED)
    assert len(records) == CFG.num_videos
    colours = list(world.COLORS)
    for r in records:
        assert set(r) == {"id", "file", "color", "shape", "motion", "speed", "size", "background",
                          "caption", "split", "caption_visible", "fps", "frames", "width", "height",
                          "objects", *world.SECOND_KEYS, "duration", "aspect"}
        assert (raw / r["file"]).stat().st_size > 0
        assert r["caption"] == world.caption(r)
        assert all(r[a] in values for a, values in world.ATTRIBUTES.items())
        triple = (r["color"], r["shape"], r["motion"])
        assert r["split"] == ("heldout" if triple in held else "train")
        assert not (r["caption_visible"] and r["split"] == "heldout")
        objects = world.parse_objects(r["caption"])
        assert len(objects) == r["objects"]
        assert world.parse_caption(r["caption"]) == {a: r[a] for a in world.ATTRIBUTES} | (
            {"speed": None} if r["motion"] == "still" else {})
        if r["objects"] == 2:
            second = world.second_object(r)
            assert (second["color"], second["shape"], second["motion"]) not in held  # never trained
            assert colours.index(second["color"]) > colours.index(r["color"])  # caption order rule
            assert {a: objects[1][a] for a in ("color", "shape", "motion", "size")} == {
                a: second[a] for a in ("color", "shape", "motion", "size")}
        else:
            assert all(r[k] == "" for k in world.SECOND_KEYS)
        # Every video holds a clip; a moving object's video ends before it could leave the frame.
        assert CFG.frames <= r["frames"] <= round(CFG.max_duration * CFG.fps)
        assert r["duration"] == pytest.approx(r["frames"] / r["fps"])
        for obj in (r, world.second_object(r) or r):
            if obj["motion"] != "still":
                assert r["frames"] <= 1 + (CFG.frames - 1) / world.SPEEDS[obj["speed"]]
    assert sum(r["objects"] == 2 for r in records) == round(CFG.two_object_fraction * len(records))
    assert len({r["frames"] for r in records}) > 3  # durations vary
    train = [r for r in records if r["split"] == "train"]
    assert sum(r["caption_visible"] for r in train) == round(CFG.caption_fraction * len(train))
    for name, values in world.ATTRIBUTES.items():  # balanced: counts differ by at most one
        counts = [sum(r[name] == v for r in records) for v in values]
        assert max(counts) - min(counts) <= 1, name


def test_prepare_writes_shards_and_manifest(raw, clips):
    data = load_clips(clips)
    n = CFG.num_videos
    assert data.video.shape == (n, 3, CFG.frames, CFG.size, CFG.size)
    assert list(data.rows[0]) == list(MANIFEST_COLUMNS)
    assert len(list(clips.glob("shard-*.pt"))) == -(-n // CFG.shard_size)
    assert json.loads((clips / "quarantine.json").read_text()) == []
    meta = {r["id"]: r for r in read_metadata(raw)}
    for row in data.rows:
        rec = meta[row["clip_id"]]
        assert row["split"] == rec["split"] or (rec["split"], row["split"]) == ("train", "val")
        assert row["caption"] == (rec["caption"] if rec["caption_visible"] else "")
        assert 0 <= row["mean"] <= 1 and row["std"] > 0
        assert (row["objects"], row["color2"], row["duration"]) == (rec["objects"], rec["color2"], rec["duration"])
    moving = [r["motion_score"] for r in data.rows if r["motion"] != "still" or r["motion2"] not in ("", "still")]
    still = [r["motion_score"] for r in data.rows if r["motion"] == "still" and r["motion2"] in ("", "still")]
    assert min(moving) > max(still)  # the objects' motion, not compression noise
    assert len(data.indices("val")) == round(CFG.val_fraction * sum(r["split"] == "train" for r in meta.values()))


def _break_some(raw: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    files = [r["file"] for r in read_metadata(broken)]
    (broken / files[0]).write_bytes(b"")
    (broken / files[1]).write_bytes(b"this is not a video at all" * 100)
    write_video(broken / files[2], np.zeros((3, 32, 32, 3), np.uint8), fps=8)  # 3 of 9 frames
    return broken, {files[0]: "empty file", files[1]: "undecodable", files[2]: "too short"}


def test_prepare_quarantines_broken_files_and_continues(raw, tmp_path):
    broken, expected = _break_some(raw, tmp_path)
    summary = prepare(broken, tmp_path / "clips", CFG, SEED)
    assert summary["quarantined"] == 3 and summary["clips"] == CFG.num_videos - 3
    reasons = {q["path"]: q["reason"] for q in json.loads((tmp_path / "clips" / "quarantine.json").read_text())}
    assert set(reasons) == set(expected)
    for path, start in expected.items():
        assert reasons[path].startswith(start), reasons[path]
    assert len(read_manifest(tmp_path / "clips" / "manifest.csv")) == CFG.num_videos - 3


def test_too_many_bad_files_names_the_knob(raw, tmp_path):
    broken, _ = _break_some(raw, tmp_path)
    cfg = DataConfig(**{**CFG.__dict__, "max_bad_fraction": 0.05})
    with pytest.raises(TooManyBadFiles, match="data.max_bad_fraction"):
        prepare(broken, tmp_path / "clips", cfg, SEED)


def test_prepare_resamples_a_higher_frame_rate(tmp_path):
    frames = np.zeros((18, 32, 32, 3), np.uint8)
    frames[np.arange(18), :, :, :] = (np.arange(18) * 10)[:, None, None, None]  # brightness = 10 * index
    write_video(tmp_path / "videos" / "x.mp4", frames, fps=16)
    rec = {"id": "x", "file": "videos/x.mp4", "color": "red", "shape": "circle", "motion": "still",
           "speed": "slow", "size": "small", "background": "black", "caption": "c", "split": "train",
           "caption_visible": False, "fps": 16, "frames": 18, "width": 32, "height": 32}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rec) + "\n")
    prepare(tmp_path, tmp_path / "clips", DataConfig(**{**CFG.__dict__, "val_fraction": 0.0}), SEED)
    video = load_clips(tmp_path / "clips").video[0].float()  # (3, 9, 16, 16)
    levels = video.mean((0, 2, 3)) / 10  # source frame index of each kept frame
    assert np.allclose(levels.numpy(), np.arange(0, 18, 2), atol=0.6)


def test_great_expectations_suite_passes_and_names_planted_faults(clips, tmp_path):
    import csv

    from flows.validation import ValidationFailed, validate_manifest

    ok = validate_manifest(clips / "manifest.csv", CFG, tmp_path / "good", data_docs=False)
    assert ok["success"] and ok["failed"] == 0
    report = json.loads((tmp_path / "good" / "validation.json").read_text())
    assert report["evaluated"] == len(report["expectations"]) > 10

    rows = list(csv.DictReader(open(clips / "manifest.csv")))
    visible = next(r for r in rows if r["caption_visible"] == "True")
    visible["caption"] = ""  # a visible clip lost its caption
    rows[0]["frames"] = str(CFG.frames - 4)  # a clip of the wrong length
    bad = write_manifest(tmp_path / "bad.csv", rows)
    with pytest.raises(ValidationFailed) as info:
        validate_manifest(bad, CFG, tmp_path / "bad", data_docs=False)
    message = str(info.value)
    assert "expect_column_values_to_not_be_null on caption where caption_visible == True" in message
    assert "expect_column_values_to_be_in_set on frames" in message and f"[{CFG.frames - 4}]" in message
    assert "failed 2 of" in message


def test_two_object_captions_parse_back_to_each_object():
    first = {"size": "small", "color": "red", "shape": "circle", "motion": "left", "speed": "slow",
             "background": "black"}
    assert world.caption(first) == "a small red circle moving left slowly on a black background"
    both = {**first, "color2": "blue", "shape2": "square", "motion2": "still", "speed2": "fast",
            "size2": "large"}
    text = world.caption(both)
    assert text == ("a small red circle moving left slowly and a large blue square staying still "
                    "on a black background")
    assert world.parse_caption(text) == first  # the first object, as every caller expects
    assert world.parse_objects(text)[1] == {"color": "blue", "shape": "square", "motion": "still",
                                            "speed": None, "size": "large", "background": "black"}
    assert len(world.parse_objects(world.caption(first))) == 1


def test_prepare_cuts_a_window_anywhere_in_a_longer_video(tmp_path):
    frames = np.zeros((33, 32, 32, 3), np.uint8)
    frames[:] = (np.arange(33) * 7)[:, None, None, None]  # brightness = 7 * index
    write_video(tmp_path / "videos" / "x.mp4", frames, fps=8)
    base = {"file": "videos/x.mp4", "color": "red", "shape": "circle", "motion": "still",
            "speed": "slow", "size": "small", "background": "black", "caption": "c", "split": "train",
            "caption_visible": False, "fps": 8, "frames": 33, "width": 32, "height": 32}
    (tmp_path / "metadata.jsonl").write_text(
        "".join(json.dumps({**base, "id": f"x{i}"}) + "\n" for i in range(8)))
    prepare(tmp_path, tmp_path / "clips", DataConfig(**{**CFG.__dict__, "val_fraction": 0.0}), SEED)
    data = load_clips(tmp_path / "clips")
    starts = []
    for clip in data.video.float():  # (3, 9, 16, 16) each
        levels = (clip.mean((0, 2, 3)) / 7).numpy()  # source frame index of each kept frame
        start = round(float(levels[0]))
        assert np.allclose(levels, start + np.arange(CFG.frames), atol=0.6)  # consecutive frames
        assert 0 <= start <= 33 - CFG.frames
        starts.append(start)
    assert len(set(starts)) > 1  # windows drawn per video, not always the first frames
    assert {r["duration"] for r in data.rows} == {33 / 8} and {r["objects"] for r in data.rows} == {1}
