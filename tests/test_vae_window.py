"""The VAE trains on seeded windows of `vae.train_frames` frames and is measured on whole clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from components import vae as vae_module
from components.config import Config, DataConfig, VAEConfig
from components.prepare import prepare
from components.synth import generate

DATA = DataConfig(num_videos=50, raw_size=32, size=16, frames=9, fps=8, val_fraction=0.1, shard_size=32,
                  workers=1, two_object_fraction=0.0, min_duration=1.125, max_duration=1.125)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("clips")
    generate(raw, DATA, 1)
    prepare(raw, out, DATA, 1)
    return out


@pytest.fixture
def seen(monkeypatch) -> list[int]:
    """The frame count of every batch the VAE's loss sees (vae_loss wrapped)."""
    frames: list[int] = []
    real_loss = vae_module.vae_loss

    def spy(model, x, *args, **kwargs):
        frames.append(x.shape[2])
        return real_loss(model, x, *args, **kwargs)

    monkeypatch.setattr(vae_module, "vae_loss", spy)
    return frames


@pytest.mark.parametrize("train_frames, expected", [(5, 5), (0, 9)])
def test_vae_trains_on_windows_and_is_measured_on_whole_clips(clips, tmp_path, seen, train_frames, expected):
    cfg = Config(data=DATA, vae=VAEConfig(base_channels=8, latent_channels=4, steps=6, batch_size=4, warmup=1,
                                          train_frames=train_frames))
    cfg.validate()
    out = vae_module.run_train_vae(clips, tmp_path / "vae", cfg)
    # every training batch (and the step FLOP count's pass) is a window of train_frames (0: whole clips)
    assert len(seen) >= 6 and set(seen) == {expected}
    model = vae_module.load_vae(tmp_path / "vae" / "vae.pt", "cpu")
    assert model.latent_shape(9, 16, 16)[1] == 3  # whole 9-frame clips still encode: 1 + 8/4 latent frames
    assert out["val_clips"] > 0 and out["val_psnr"] > 0


def test_the_last_steps_train_on_whole_clips(clips, tmp_path, seen):
    cfg = Config(data=DATA, vae=VAEConfig(base_channels=8, latent_channels=4, steps=6, batch_size=4, warmup=1,
                                          train_frames=5, full_clip_fraction=1 / 3))
    cfg.validate()
    vae_module.run_train_vae(clips, tmp_path / "vae", cfg)
    assert seen[-6:] == [5, 5, 5, 5, 9, 9]
