"""Native sizes before the DiT: the synthetic world writes square, landscape and portrait videos,
prepare keeps each at its aspect's clip size, Great Expectations accepts exactly those sizes, and
the clips come back grouped by shape (native) or resized to one square view."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from components import world
from components.buckets import Bucket
from components.clips import load_clips, to_square
from components.config import ConfigError, DataConfig, resolve
from components.prepare import nearest_size, resize_crop
from components.synth import generate, render
from components.video_io import read_clip, write_video
from tests.conftest import data_fixtures, encode_and_train_dit, quick_evaluate, read_metadata, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEED = 5
SIZES = {"square": (16, 16), "landscape": (16, 24), "portrait": (24, 16)}
CFG = DataConfig(num_videos=51, raw_size=32, size=16, frames=9, fps=8, caption_fraction=0.3,
                 heldout_fraction=0.15, val_fraction=0.1, shard_size=16, workers=1,
                 two_object_fraction=0.2, min_duration=1.125, max_duration=2.0,
                 aspects=("16x16", "16x24", "24x16"))


raw, clips_dir = data_fixtures(CFG, SEED)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aspects,message", [
    (["20x40"], "multiples of 8"), (["24x40", "48x80"], "aspect ratio of 24x40"),
    (["wide"], "HEIGHTxWIDTH"), ("24x40", None)])
def test_aspects_are_validated_naming_the_fix(aspects, message):
    raw = {"data": {"aspects": aspects}}
    if message is None:  # one string is a list of one
        assert resolve(raw).data.clip_sizes == [(24, 40)]
        return
    with pytest.raises(ConfigError, match=message):
        resolve(raw)


def test_default_and_ci_profiles_have_three_aspects():
    from components.config import load

    root = Path(__file__).resolve().parents[1]
    assert load(root / "params.yaml").data.clip_sizes == [(32, 32), (24, 40), (40, 24)]
    assert load(root / "params.yaml", "ci").data.clip_sizes == [(32, 32), (24, 40), (40, 24)]
    assert DataConfig(size=16).clip_sizes == [(16, 16)]  # no aspects: the square data.size


# ----------------------------------------------------------------------------------------------
# Synth
# ----------------------------------------------------------------------------------------------


def test_synth_writes_every_aspect_at_the_scaled_raw_size(raw):
    records = read_metadata(raw)
    counts = {a: sum(r["aspect"] == a for r in records) for a in SIZES}
    assert max(counts.values()) - min(counts.values()) <= 1, counts  # balanced
    scale = CFG.raw_size // CFG.size
    for aspect, (h, w) in SIZES.items():
        rec = next(r for r in records if r["aspect"] == aspect)
        assert (rec["height"], rec["width"]) == (h * scale, w * scale)
        video, _ = read_clip(raw / rec["file"])  # real H.264 at that size
        assert video.shape[1:] == (h * scale, w * scale, 3)
    for name, values in world.ATTRIBUTES.items():  # the attributes stay balanced
        counts = [sum(r[name] == v for r in records) for v in values]
        assert max(counts) - min(counts) <= 1, name


def test_synth_with_aspects_is_deterministic_and_keeps_the_square_worlds_draws(raw, tmp_path):
    again = tmp_path / "again"
    generate(again, dataclasses.replace(CFG, workers=2), SEED)
    assert (again / "metadata.jsonl").read_text() == (raw / "metadata.jsonl").read_text()
    records = read_metadata(raw)
    for aspect in SIZES:
        rec = next(r for r in records if r["aspect"] == aspect)
        assert (again / rec["file"]).read_bytes() == (raw / rec["file"]).read_bytes()
    square = tmp_path / "square"
    generate(square, dataclasses.replace(CFG, aspects=(), num_videos=CFG.num_videos), SEED)
    frame = {"width", "height", "aspect"}
    for a, b in zip(records, read_metadata(square)):
        assert {k: v for k, v in a.items() if k not in frame} == {k: v for k, v in b.items() if k not in frame}
        assert (b["width"], b["height"], b["aspect"]) == (CFG.raw_size, CFG.raw_size, "square")


@pytest.mark.parametrize("height,width", [(48, 80), (80, 48)])
def test_objects_stay_whole_inside_a_landscape_or_portrait_frame(height, width):
    rng = np.random.default_rng(0)
    for k in range(24):
        attrs = {"color": "white", "shape": world.SHAPES[k % 3], "size": "large", "speed": "fast",
                 "motion": list(world.MOTIONS)[k % 6], "background": "black"}
        video = render(attrs, (height, width), 17, rng).astype(np.float64)  # (T, H, W, 3)
        assert video.shape == (17, height, width, 3)
        area = video.sum((1, 2, 3))  # the object's drawn mass per frame
        assert area.min() > 0.97 * area.max(), (attrs, area.min() / area.max())  # never leaves the frame
        if attrs["motion"] in ("left", "right"):  # speed is a share of the short side's span
            xs = (video[..., 0].sum(1) * np.arange(width)).sum(1) / video[..., 0].sum((1, 2))
            per_frame = abs(xs[-1] - xs[0]) / 16
            short = min(height, width)
            assert per_frame < short / 16, per_frame


# ----------------------------------------------------------------------------------------------
# Prepare, Great Expectations, the clips
# ----------------------------------------------------------------------------------------------


def test_prepare_keeps_each_clip_at_its_aspects_native_size(raw, clips_dir):
    clips = load_clips(clips_dir, CFG.size)
    meta = {r["id"]: r for r in read_metadata(raw)}
    assert sorted(clips.shapes) == sorted(Bucket(CFG.frames, h, w) for h, w in SIZES.values())
    seen = 0
    for bucket, idx, video in clips.native():
        assert video.shape == (len(idx), 3, CFG.frames, bucket.height, bucket.width)
        assert video.dtype == torch.uint8 and video.float().std() > 5
        for i in idx:
            row = clips.rows[i]
            assert (row["height"], row["width"]) == (bucket.height, bucket.width)
            assert SIZES[meta[row["clip_id"]]["aspect"]] == (bucket.height, bucket.width)
            assert row["aspect"] == bucket.aspect
        seen += len(idx)
    assert seen == len(clips) == CFG.num_videos
    # native(idx) keeps the order it is asked in, within each shape
    picked = [7, 3, 40, 12]
    out = clips.native(picked)
    assert sorted(i for _, ids, _ in out for i in ids) == sorted(picked)
    for _, ids, _ in out:
        assert ids == [i for i in picked if i in ids]


def test_square_view_is_every_clip_resized_to_data_size(clips_dir):
    clips = load_clips(clips_dir, CFG.size)
    square = clips.video
    assert square.shape == (CFG.num_videos, 3, CFG.frames, CFG.size, CFG.size) and square.dtype == torch.uint8
    for bucket, idx, video in clips.native():
        if bucket.height == bucket.width == CFG.size:
            assert torch.equal(square[idx], video)  # a square clip is its own square view
        else:
            assert torch.equal(square[idx], to_square(video, CFG.size))
            # a resize, not a crop: the mean colour survives
            assert (square[idx].float().mean((2, 3, 4)) - video.float().mean((2, 3, 4))).abs().max() < 3
    with pytest.raises(ValueError, match="several shapes|shapes"):
        load_clips(clips_dir)  # mixed shapes need the square side named


def test_great_expectations_accepts_every_aspect_and_rejects_a_wrong_size(clips_dir, tmp_path):
    from flows.validation import ValidationFailed, validate_manifest

    ok = validate_manifest(clips_dir / "manifest.csv", CFG, tmp_path / "good", data_docs=False)
    assert ok["success"] and ok["failed"] == 0
    with pytest.raises(ValidationFailed, match=r"column_pair_values_to_be_in_set on \(height, width\)"):
        # a square-only suite rejects the landscape and portrait clips
        validate_manifest(clips_dir / "manifest.csv", dataclasses.replace(CFG, aspects=()), tmp_path / "sq",
                          data_docs=False)
    rows = list(csv.DictReader(open(clips_dir / "manifest.csv")))
    portrait = next(r for r in rows if r["height"] == "24")
    portrait["width"] = "24"  # 24x24: each side is a known side, the pair is no known size
    bad = write_manifest(tmp_path / "bad.csv", rows)
    with pytest.raises(ValidationFailed, match="failed 1 of") as info:
        validate_manifest(bad, CFG, tmp_path / "bad", data_docs=False)
    assert "(height, width)" in str(info.value)


def test_own_videos_take_the_nearest_aspect_and_crop_only_the_remainder(tmp_path):
    from components.ingest import decode_resampled

    sizes = list(SIZES.values())
    assert nearest_size(1080, 1920, sizes) == (16, 24)  # 16:9 -> the 2:3 landscape
    assert nearest_size(1920, 1080, sizes) == (24, 16)
    assert nearest_size(480, 500, sizes) == (16, 16)
    frame = np.zeros((90, 160, 3), np.uint8)
    frame[:, :, 0] = np.linspace(0, 255, 160)[None]  # a horizontal ramp
    out = resize_crop(frame, (16, 24))
    assert out.shape == (16, 24, 3)
    assert out[0, 0, 0] < 30 and out[0, -1, 0] > 225  # almost all of the width kept
    write_video(tmp_path / "wide.mp4", np.repeat(frame[None], 12, axis=0), fps=8)
    video, probe = decode_resampled(tmp_path / "wide.mp4", 8, sizes)
    assert video.shape[1:] == (16, 24, 3) and (probe["width"], probe["height"]) == (160, 90)


# ----------------------------------------------------------------------------------------------
# VAE, encode and the DiT on every shape
# ----------------------------------------------------------------------------------------------


def _config(**vae):
    from components.config import Config, DiTConfig, VAEConfig

    return Config(seed=SEED, data=CFG,
                  vae=VAEConfig(base_channels=8, latent_channels=4, steps=300, batch_size=4, lr=3e-3,
                                warmup=5, **vae),
                  dit=DiTConfig(preset="tiny", steps=12, batch_size=8, warmup=2))


@pytest.fixture(scope="module")
def vae_dir(clips_dir, tmp_path_factory) -> tuple[Path, dict]:
    from components.vae import run_train_vae

    out = tmp_path_factory.mktemp("vae")
    logged: list[dict] = []
    metrics = run_train_vae(clips_dir, out, _config(), log=lambda step, m: logged.append(m))
    return out, {"metrics": metrics, "logged": logged}


def test_vae_trains_on_every_shape_and_reconstructs_each(clips_dir, vae_dir):
    from components.vae import VideoVAE, load_vae, recon_metrics_by_shape, reconstruct

    out, run = vae_dir
    metrics = run["metrics"]
    assert metrics["buckets"] == 3
    for aspect in SIZES:  # per-aspect figures beside the aggregate
        assert np.isfinite(metrics[f"val_psnr_{aspect}"])
    vae = load_vae(out / "vae.pt", "cpu")
    assert sorted(vae.data["buckets"]) == sorted(f"{CFG.frames}x{h}x{w}" for h, w in SIZES.values())
    clips = load_clips(clips_dir, CFG.size)
    groups = [(b, v) for b, _, v in clips.native(clips.indices("val") + clips.indices("heldout"))]
    assert len(groups) == 3
    torch.manual_seed(SEED)
    untrained = VideoVAE(_config().vae).eval()
    before = recon_metrics_by_shape(untrained, groups, "cpu")
    after = recon_metrics_by_shape(vae, groups, "cpu")
    for aspect in SIZES:  # each shape learned, not one at the others' expense
        assert after[f"psnr_{aspect}"] > before[f"psnr_{aspect}"] + 2, (aspect, before, after)
        assert after[f"ssim_{aspect}"] > before[f"ssim_{aspect}"] + 0.1, (aspect, before, after)
    for _, video in groups:
        assert reconstruct(vae, video[:2], "cpu").shape == (min(2, len(video)), *video.shape[1:])
    # The latent statistics are measured over every shape: normalised latents of each are ~unit.
    with torch.no_grad():
        z = torch.cat([vae.normalize(vae.encode(v.float() / 127.5 - 1)[0]).flatten() for _, v in groups])
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 2.0


@pytest.fixture(scope="module")
def trained(clips_dir, vae_dir, tmp_path_factory) -> dict:
    """Captions (the ground truth), encode and a few DiT steps on the three shapes."""
    return encode_and_train_dit(tmp_path_factory.mktemp("trained"), clips_dir, vae_dir[0] / "vae.pt", _config())


def test_encode_writes_each_shape_and_train_dit_trains_on_them(clips_dir, trained):
    from components.dit import load_dit
    from components.evaluation import flow_val_loss
    from components.train_dit import load_encoded

    clips = load_clips(clips_dir, CFG.size)
    root = trained["root"]
    assert trained["encode"]["latent_shapes"] == 3 and trained["encode"]["clips"] == len(clips)
    lat, _ = load_encoded(root / "encoded")
    assert isinstance(lat["latents"], list) and len(lat["latents"]) == len(clips)
    for row, z in zip(clips.rows, lat["latents"]):  # each clip's latent at its own shape
        assert tuple(z.shape) == (4, (CFG.frames - 1) // 4 + 1, row["height"] // 4, row["width"] // 4)
    metrics = trained["dit"]
    assert metrics["buckets"] == 3 and np.isfinite(metrics["val_loss"])
    dit = load_dit(root / "dit" / "dit.pt", "cpu")
    val = flow_val_loss(root / "encoded", dit, SEED)  # evaluation reads the list of latents too
    assert val["flow_val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_evaluation_reports_each_aspect_and_samples_its_sizes(clips_dir, vae_dir, trained):
    from components.video_io import read_clip

    root = trained["root"]
    report = quick_evaluate(clips_dir, vae_dir[0] / "vae.pt", trained)
    m = report["metrics"]
    for aspect in SIZES:
        assert np.isfinite(m[f"vae_psnr_{aspect}"]) and np.isfinite(m[f"vae_ssim_{aspect}"])
    parts = [m[f"vae_psnr_{a}"] for a in SIZES]
    assert min(parts) <= m["vae_psnr"] <= max(parts)  # the mean over every clip
    assert report["aspect_samples"] == ["landscape", "portrait"]
    scale = {"landscape": (16, 24), "portrait": (24, 16)}
    for aspect, (h, w) in scale.items():
        grid, _ = read_clip(root / "eval" / "samples" / f"grid_{aspect}.gif")
        assert grid.shape[1] == h + 2  # one row of `h`-high videos with 2-pixel gutters
        assert grid.shape[2] == 8 * (w + 2)
        assert f"samples/grid_{aspect}.gif" in (root / "eval" / "report.md").read_text()
    square, _ = read_clip(root / "eval" / "samples" / "grid_seen.gif")
    assert square.shape[1] == CFG.size + 2  # the graded generations stay square


def test_bundle_records_the_trained_sizes(vae_dir, trained):
    from components.dit import load_dit
    from components.export import bundle_metadata
    from components.vae import load_vae

    meta = bundle_metadata(load_vae(vae_dir[0] / "vae.pt", "cpu"),
                           load_dit(trained["root"] / "dit" / "dit.pt", "cpu"), trained["cfg"])
    assert sorted(meta["buckets"]) == sorted(f"{CFG.frames}x{h}x{w}" for h, w in SIZES.values())
    assert meta["size"] == CFG.size  # the default (square) generation size is unchanged
