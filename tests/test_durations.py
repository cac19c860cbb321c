"""Variable clip durations: prepare cuts each video's clip at a length drawn from `data.clip_frames`,
Great Expectations accepts exactly those lengths, the square view pads short clips for the
captioner, the VAE and the DiT train on every (frames, height, width) bucket, evaluation grades
full-length clips only, and generation and the bundle take every trained length."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from components.buckets import Bucket
from components.clips import load_clips, square_shard, to_square
from components.config import ConfigError, DataConfig, resolve
from components.prepare import assign_clip_frames, load_clip, window_start
from tests.conftest import data_fixtures, encode_and_train_dit, quick_evaluate, read_metadata, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEED = 7
LENGTHS = (5, 9)
SIZES = {"square": (16, 16), "landscape": (16, 24)}
CFG = DataConfig(num_videos=48, raw_size=32, size=16, frames=9, clip_frames=LENGTHS, fps=8,
                 caption_fraction=0.3, heldout_fraction=0.15, val_fraction=0.1, shard_size=16,
                 workers=1, two_object_fraction=0.0, min_duration=1.125, max_duration=1.5,
                 aspects=("16x16", "16x24"))
SHAPES = sorted(Bucket(t, h, w) for t in LENGTHS for h, w in SIZES.values())


raw, clips_dir = data_fixtures(CFG, SEED)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_frames,message", [
    ([8, 17], "1 \\+ 4k"), ([1, 17], "at least 5"), ([9, 13], "longest"), ([9, 33], "longest"),
    (["9"], "list of integers")])
def test_clip_frames_are_validated_naming_the_fix(clip_frames, message):
    with pytest.raises(ConfigError, match=f"data.clip_frames.*{message}"):
        resolve({"data": {"clip_frames": clip_frames}})


def test_ci_profile_cuts_two_lengths_and_the_default_the_graded_one():
    from components.config import load

    root = Path(__file__).resolve().parents[1]
    data = load(root / "params.yaml", "ci").data
    assert len(data.clip_lengths) >= 2 and max(data.clip_lengths) == data.frames
    full = sum(n == data.frames for n in data.clip_frames) / len(data.clip_frames)
    assert full >= 0.5  # the judge and the graded length keep most of the data
    tiny = load(root / "params.yaml", "tiny").data
    assert tiny.clip_lengths == [tiny.frames]  # [9, 17, 17] cost colour adherence (params.yaml)
    assert DataConfig().clip_lengths == [DataConfig().frames]  # no clip_frames: one length


# ----------------------------------------------------------------------------------------------
# Prepare, the square view, Great Expectations
# ----------------------------------------------------------------------------------------------


def test_lengths_are_drawn_balanced_and_capped_by_the_video():
    records = [{"id": f"v{i}", "frames": 17, "fps": 8} for i in range(30)]
    cfg = dataclasses.replace(CFG, frames=17, clip_frames=(9, 17, 17))
    lengths = assign_clip_frames(records, cfg, SEED)
    assert sorted(lengths.values()) == [9] * 10 + [17] * 20  # a length listed twice: drawn twice as often
    assert lengths == assign_clip_frames(records, cfg, SEED)  # seeded
    assert lengths != assign_clip_frames(records, cfg, SEED + 1)
    # A video too short for its draw gets the longest length it holds.
    short = [{"id": f"v{i}", "frames": 12, "fps": 8} for i in range(30)]
    assert set(assign_clip_frames(short, cfg, SEED).values()) == {9}
    # One length draws nothing: every clip data.frames long, as before clip_frames.
    assert set(assign_clip_frames(records, dataclasses.replace(cfg, clip_frames=()), SEED).values()) == {17}


def test_prepare_cuts_both_lengths_at_every_aspect(raw, clips_dir):
    clips = load_clips(clips_dir, CFG.size, CFG.frames)
    assert sorted(clips.shapes) == SHAPES
    lengths = [r["frames"] for r in clips.rows]
    assert abs(lengths.count(5) - lengths.count(9)) <= 1, lengths  # balanced
    meta = {r["id"]: r for r in read_metadata(raw)}
    drawn = assign_clip_frames(read_metadata(raw), CFG, SEED)
    for bucket, idx, video in clips.native():
        assert video.shape == (len(idx), 3, bucket.frames, bucket.height, bucket.width)
        for i in idx:
            row = clips.rows[i]
            assert row["frames"] == bucket.frames == drawn[row["clip_id"]]
            assert meta[row["clip_id"]]["frames"] >= CFG.frames  # every synthetic video holds a full clip
    # A short clip is the source's frames at its own window: the first frames of a longer cut there.
    row = next(r for r in clips.rows if r["frames"] == 5)
    rec = meta[row["clip_id"]]
    start = window_start(rec, 5, CFG.fps, SEED)
    longer = load_clip(raw / rec["file"], 5, CFG.fps, CFG.clip_sizes, start)
    (i,) = [k for k, r in enumerate(clips.rows) if r["clip_id"] == row["clip_id"]]
    (_, _, video), = clips.native([i])
    assert np.array_equal(video[0].numpy(), longer)


def test_square_view_pads_short_clips_with_their_last_frame(clips_dir):
    clips = load_clips(clips_dir, CFG.size, CFG.frames)
    square = clips.video
    assert square.shape == (len(clips), 3, CFG.frames, CFG.size, CFG.size)
    for bucket, idx, video in clips.native():
        view = square[idx]
        assert torch.equal(view[:, :, :bucket.frames], to_square(video, CFG.size))
        tail = view[:, :, bucket.frames - 1:]  # the last frame, repeated to data.frames
        assert torch.equal(tail, tail[:, :, :1].expand_as(tail))
    # The caption stage's per-shard view is the same, and needs the length named for mixed shards.
    shard = torch.load(clips_dir / clips.rows[0]["shard"], weights_only=True)
    ids = [k for k, r in enumerate(clips.rows) if r["shard"] == clips.rows[0]["shard"]]
    assert torch.equal(square_shard(shard["video"], CFG.size, CFG.frames), square[ids])
    with pytest.raises(ValueError, match="data.frames"):
        square_shard(shard["video"], CFG.size)
    with pytest.raises(ValueError, match="longest"):
        to_square(square[:1], CFG.size, 5)  # never cut: a longer clip is an error


def test_great_expectations_accepts_the_lengths_and_rejects_another(clips_dir, tmp_path):
    from flows.validation import ValidationFailed, validate_manifest

    ok = validate_manifest(clips_dir / "manifest.csv", CFG, tmp_path / "good", data_docs=False)
    assert ok["success"] and ok["failed"] == 0
    rows = list(csv.DictReader(open(clips_dir / "manifest.csv")))
    rows[3]["frames"] = "13"  # 1 + 4k, but not an allowed length
    bad = write_manifest(tmp_path / "bad.csv", rows)
    with pytest.raises(ValidationFailed, match="failed 1 of") as info:
        validate_manifest(bad, CFG, tmp_path / "bad", data_docs=False)
    assert "column_values_to_be_in_set on frames" in str(info.value) and "13" in str(info.value)


def test_own_videos_give_the_longest_clips_each_scene_holds(tmp_path):
    from components.config import IngestConfig
    from components.ingest import process_file
    from components.video_io import write_video

    frames = np.zeros((14, 32, 32, 3), np.uint8)
    frames[:, :, :, 1] = np.linspace(60, 120, 14)[:, None, None]  # a slow fade: one scene
    write_video(tmp_path / "fade.mp4", frames, fps=8)
    out = process_file((str(tmp_path / "fade.mp4"), [5, 9], 8, [(16, 16)], IngestConfig()))
    assert out["reason"] == ""
    assert [c["clip"].shape[1] for c in out["clips"]] == [9, 5]  # 14 frames: 9 + 5
    assert [c["start"] for c in out["clips"]] == [0.0, 9 / 8]
    write_video(tmp_path / "short.mp4", frames[:4], fps=8)
    out = process_file((str(tmp_path / "short.mp4"), [5, 9], 8, [(16, 16)], IngestConfig()))
    assert "too short" in out["reason"] and "5 frames" in out["reason"]


# ----------------------------------------------------------------------------------------------
# VAE, encode, the DiT, evaluation, generation and the bundle on both lengths
# ----------------------------------------------------------------------------------------------


def _config(**vae):
    from components.config import Config, DiTConfig, VAEConfig

    return Config(seed=SEED, data=CFG,
                  vae=VAEConfig(base_channels=8, latent_channels=4, steps=300, batch_size=4, lr=3e-3,
                                warmup=5, train_frames=5, full_clip_fraction=0.3, **vae),
                  dit=DiTConfig(preset="tiny", steps=12, batch_size=8, warmup=2, shift=3.0, shift_tokens=12))


@pytest.fixture(scope="module")
def vae_dir(clips_dir, tmp_path_factory) -> tuple[Path, dict]:
    from components.vae import run_train_vae

    out = tmp_path_factory.mktemp("vae")
    return out, run_train_vae(clips_dir, out, _config())


def test_vae_trains_on_both_lengths_and_reconstructs_each(clips_dir, vae_dir):
    from components.vae import VideoVAE, load_vae, recon_metrics_by_shape

    out, metrics = vae_dir
    assert metrics["buckets"] == len(SHAPES)
    for n in LENGTHS:
        assert np.isfinite(metrics[f"val_psnr_{n}f"])
    vae = load_vae(out / "vae.pt", "cpu")
    assert sorted(vae.data["buckets"]) == sorted(str(b) for b in SHAPES)
    clips = load_clips(clips_dir, CFG.size, CFG.frames)
    groups = [(b, v) for b, _, v in clips.native(clips.indices("val") + clips.indices("heldout"))]
    torch.manual_seed(SEED)
    before = recon_metrics_by_shape(VideoVAE(_config().vae).eval(), groups, "cpu")
    after = recon_metrics_by_shape(vae, groups, "cpu")
    for n in LENGTHS:  # each length learned: the windows and the whole short clips
        assert after[f"psnr_{n}f"] > before[f"psnr_{n}f"] + 2, (n, before, after)


@pytest.fixture(scope="module")
def trained(clips_dir, vae_dir, tmp_path_factory) -> dict:
    """Ground-truth captions, encode and a few DiT steps on the four buckets."""
    return encode_and_train_dit(tmp_path_factory.mktemp("trained"), clips_dir, vae_dir[0] / "vae.pt", _config())


def test_encode_and_train_dit_use_every_length(clips_dir, trained):
    from components.train_dit import load_encoded

    clips = load_clips(clips_dir, CFG.size, CFG.frames)
    assert trained["encode"]["latent_shapes"] == len(SHAPES)
    lat, _ = load_encoded(trained["root"] / "encoded")
    for row, z in zip(clips.rows, lat["latents"]):  # each clip's latent at its own length
        assert tuple(z.shape) == (4, (row["frames"] - 1) // 4 + 1, row["height"] // 4, row["width"] // 4)
    assert trained["dit"]["buckets"] == len(SHAPES) and np.isfinite(trained["dit"]["val_loss"])


def test_generation_at_every_trained_length(vae_dir, trained):
    from components.generate import T2VPipeline

    pipe = T2VPipeline.from_paths(vae_dir[0] / "vae.pt", trained["root"] / "dit" / "dit.pt", 32, "cpu")
    assert pipe.frames == CFG.frames  # the default length is the graded one
    for n in LENGTHS:
        for h, w in SIZES.values():
            video = pipe.generate(["a red circle moving left"], seed=1, steps=2, num_frames=n, height=h, width=w)
            assert video.shape == (1, n, h, w, 3) and video.dtype == np.uint8
    # Fewer latent tokens, a smaller timestep shift (schedule.token_shift), as in training.
    assert pipe.shift(5) < pipe.shift(9)


def test_evaluation_grades_full_length_clips_and_samples_every_shape(clips_dir, vae_dir, trained):
    from components.evaluation import _graded_rows
    from components.video_io import read_clip

    rows = load_clips(clips_dir, CFG.size, CFG.frames).rows
    graded = _graded_rows(rows, CFG.size, CFG.frames)
    assert any(graded(r) for r in rows)
    assert all(r["frames"] == CFG.frames and r["height"] == r["width"] for r in rows if graded(r))
    root = trained["root"]
    report = quick_evaluate(clips_dir, vae_dir[0] / "vae.pt", trained)
    m = report["metrics"]
    for n in LENGTHS:
        assert np.isfinite(m[f"vae_psnr_{n}f"]) and np.isfinite(m[f"vae_ssim_{n}f"])
    assert report["aspect_samples"] == ["square_5f", "landscape_5f", "landscape"]
    text = (root / "eval" / "report.md").read_text()
    assert "5-frame clips" in text
    for name, frames in (("square_5f", 5), ("landscape", 9), ("seen", 9)):
        grid, _ = read_clip(root / "eval" / "samples" / f"grid_{name}.gif")
        assert len(grid) == frames, name
        assert f"samples/grid_{name}.gif" in text


def test_bundle_records_both_lengths_and_serving_accepts_them(vae_dir, trained, tmp_path):
    import json

    from components.dit import load_dit
    from components.export import bundle_metadata
    from components.onnx_runtime import BundleInfo
    from components.vae import load_vae

    meta = bundle_metadata(load_vae(vae_dir[0] / "vae.pt", "cpu"),
                           load_dit(trained["root"] / "dit" / "dit.pt", "cpu"), trained["cfg"])
    assert sorted(meta["buckets"]) == sorted(str(b) for b in SHAPES)
    assert meta["frames"] == meta["max_frames"] == CFG.frames
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    info = BundleInfo.load(tmp_path / "bundle.json")
    assert sorted(info.sizes) == sorted(SIZES.values())  # one size per aspect, whatever its lengths
    assert [info.limits.check_frames(n) for n in LENGTHS] == list(LENGTHS)
