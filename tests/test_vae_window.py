"""The VAE trains on seeded windows of `vae.train_frames` frames and is measured on whole clips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components import vae as vae_module
from components.config import Config, ConfigError, DataConfig, VAEConfig
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


def _decoder_cfg(decoder_steps: int, decoder_lr: float = 1e-3, decoder_noise: float = 0.0) -> Config:
    cfg = Config(data=DATA, vae=VAEConfig(base_channels=8, latent_channels=4, steps=4, batch_size=4, warmup=1,
                                          train_frames=5, decoder_steps=decoder_steps, decoder_lr=decoder_lr,
                                          decoder_noise=decoder_noise))
    cfg.validate()
    return cfg


def test_the_decoder_phase_trains_the_decoder_alone_on_whole_clips(clips, tmp_path, seen):
    logged: list[int] = []
    vae_module.run_train_vae(clips, tmp_path / "joint", _decoder_cfg(0))
    seen.clear()
    vae_module.run_train_vae(clips, tmp_path / "both", _decoder_cfg(5), log=lambda step, m: logged.append(step))
    assert seen[-5:] == [9] * 5  # the decoder's steps see whole clips
    joint = vae_module.load_vae(tmp_path / "joint" / "vae.pt", "cpu")
    both = vae_module.load_vae(tmp_path / "both" / "vae.pt", "cpu")
    for (name, a), (_, b) in zip(joint.encoder.state_dict().items(), both.encoder.state_dict().items()):
        assert torch.equal(a, b), f"the decoder phase changed encoder.{name}"
    assert torch.equal(joint.latent_std, both.latent_std)  # the same latents: the DiT's data does not move
    changed = [not torch.equal(a, b) for a, b in zip(joint.decoder.state_dict().values(),
                                                    both.decoder.state_dict().values())]
    assert any(changed)
    assert max(logged) == 4 + 5  # the decoder's steps continue the joint phase's count
    assert all(p.requires_grad for p in both.encoder.parameters())


def test_a_new_decoder_setting_resumes_the_joint_phase(clips, tmp_path, seen):
    ckpt = tmp_path / "ckpt"
    vae_module.run_train_vae(clips, tmp_path / "a", _decoder_cfg(3), ckpt_dir=ckpt)
    seen.clear()
    vae_module.run_train_vae(clips, tmp_path / "b", _decoder_cfg(3, decoder_lr=5e-4), ckpt_dir=ckpt)
    # no joint step (windows of 5 frames) ran again: only the decoder phase's whole clips
    assert 5 not in seen and seen.count(9) >= 3


def test_decoder_noise_reaches_only_the_decoder_phase_scaled_by_each_channels_std(clips, tmp_path, monkeypatch):
    noises: list[torch.Tensor | None] = []
    real_loss = vae_module.vae_loss

    def spy(model, x, *args, **kwargs):
        noise = kwargs.get("latent_noise")
        noises.append(None if noise is None else noise.clone())
        return real_loss(model, x, *args, **kwargs)

    monkeypatch.setattr(vae_module, "vae_loss", spy)
    vae_module.run_train_vae(clips, tmp_path / "noisy", _decoder_cfg(4, decoder_noise=0.5))
    # the joint phase's 4 steps (and its latents) see no added noise; every pass of the decoder
    # phase (its 4 steps and fit's FLOP-counting pass) does
    first = next(k for k, n in enumerate(noises) if n is not None)
    assert first >= 4 and len(noises) - first == 5 and all(n is not None for n in noises[first:])
    std = vae_module.load_vae(tmp_path / "noisy" / "vae.pt", "cpu").latent_std
    levels = torch.stack([n / std for n in noises[first:]])  # (passes, batch, channels): one level per clip
    assert levels.shape == (5, 4, 4)
    assert torch.allclose(levels, levels[..., :1].expand_as(levels), rtol=1e-5)
    assert levels.min() >= 0 and levels.max() <= 0.5 and levels.std() > 0


def test_latent_noise_changes_the_decode_and_zero_noise_does_not():
    torch.manual_seed(0)
    model = vae_module.VideoVAE(VAEConfig(base_channels=8, latent_channels=4))
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    plain, _, _ = model(x, torch.Generator().manual_seed(1))
    zero, _, _ = model(x, torch.Generator().manual_seed(1), torch.zeros(2, 4))
    noisy, _, _ = model(x, torch.Generator().manual_seed(1), torch.full((2, 4), 0.5))
    assert torch.equal(plain, zero) and not torch.allclose(plain, noisy)


def test_decoder_settings_are_checked():
    with pytest.raises(ConfigError, match="vae.decoder_steps"):
        VAEConfig(decoder_steps=-1).validate()
    with pytest.raises(ConfigError, match="decoder_edge_weight"):
        VAEConfig(decoder_edge_weight=-1.0).validate()
    with pytest.raises(ConfigError, match="vae.decoder_noise"):
        VAEConfig(decoder_noise=-0.1).validate()
