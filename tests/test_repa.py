"""REPA: the DiT's tokens aligned with the captioner's video features (dit.repa_weight)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from components.captioner import FEATURE_PARTS, Captioner, build_vocab, video_features
from components.config import Config, DiTConfig
from components.dit import DiT, DiTSpec, load_dit
from components.train_dit import RepaDiT, run_train_dit, token_targets
from tests.test_buckets import _encoded

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_video_features_are_the_captioners_grid_and_frame_features():
    torch.manual_seed(0)
    model = Captioner(build_vocab(["a red circle"]), width=16, layers=1, max_words=8, frames=9, size=16)
    video = torch.randint(0, 256, (3, 3, 9, 16, 16), dtype=torch.uint8)
    feats = video_features(model, video, batch_size=2)
    assert feats.shape == (3, 2 * 16, 3, 2, 2)  # frames 0, 4, 8 at H/8 x W/8; FEATURE_PARTS = 2
    assert FEATURE_PARTS == 2
    x = video.float() / 127.5 - 1.0
    memory, _ = model.encode(x)
    grid = memory[:, :12]  # the decoder's first N tokens: the spacetime grid in (t, h, w) order
    assert torch.allclose(feats[:, :16].flatten(2).transpose(1, 2), grid, atol=1e-5)
    frames = model.encoder.frame_features(x)  # (3, 16, 3, 4, 4): every fourth frame at H/4
    cell = frames[:, :, 1, 2:4, 0:2].mean((2, 3))  # frame 4, the H/8 cell at row 1, column 0
    expected = torch.nn.functional.layer_norm(cell, (16,))
    assert torch.allclose(feats[:, 16:, 1, 1, 0], expected, atol=1e-5)


def test_captioning_returns_the_features_of_the_same_pass():
    torch.manual_seed(0)
    model = Captioner(build_vocab(["a red circle"]), width=16, layers=1, max_words=8, frames=9, size=16)
    video = torch.randint(0, 256, (5, 3, 9, 16, 16), dtype=torch.uint8)
    captions, feats = model.generate(video, batch_size=2, features=True)
    assert captions == model.generate(video, batch_size=3)
    assert torch.allclose(feats, video_features(model, video, batch_size=4), atol=1e-6)


def test_token_targets_follow_the_token_grid():
    model = DiT(DiTSpec(in_channels=4, dim=32, depth=2, heads=2, mlp_ratio=2.0, patch_t=1, patch_h=2, patch_w=2))
    feats = torch.randn(2, 8, 5, 4, 4)
    same = token_targets(feats, (4, 5, 8, 8), model)  # 5 latent frames of 8 x 8: a 5 x 4 x 4 token grid
    assert torch.allclose(same, feats.flatten(2).transpose(1, 2))  # the grids match: nothing resampled
    short = token_targets(feats, (4, 3, 8, 8), model)  # a 9-frame clip padded in the square view
    assert torch.allclose(short, feats[:, :, :3].flatten(2).transpose(1, 2))
    wide = token_targets(feats, (4, 5, 6, 10), model)  # landscape: 3 x 5 tokens a frame
    assert wide.shape == (2, 5 * 3 * 5, 8)
    flat = torch.ones(1, 8, 5, 4, 4) * torch.arange(8.0).view(1, 8, 1, 1, 1)  # constant maps stay constant
    assert torch.allclose(token_targets(flat, (4, 5, 6, 10), model), torch.arange(8.0).expand(75, 8))


def test_repa_trains_the_alignment_and_saves_a_plain_dit(tmp_path):
    _encoded(tmp_path)  # 48 clips of two shapes (tests/test_buckets.py)
    g = torch.Generator().manual_seed(1)
    # Learnable targets: one random vector per caption (the latents' channel means follow it too).
    per_caption = torch.randn(4, 8, generator=g)
    caption_index = torch.load(tmp_path / "latents.pt", weights_only=False)["caption_index"]
    features = per_caption[caption_index].view(48, 8, 1, 1, 1).expand(48, 8, 3, 4, 4).contiguous()
    dit = DiTConfig(preset="tiny", steps=60, batch_size=8, lr=2e-3, warmup=5, ema=0.5, repa_weight=0.5)
    cfg = dataclasses.replace(Config(), dit=dit)
    with pytest.raises(FileNotFoundError, match="features.pt not found.*repa_weight: 0"):
        run_train_dit(tmp_path, tmp_path / "none", cfg)
    with pytest.raises(ValueError, match="recompute"):
        run_train_dit(tmp_path, tmp_path / "short", cfg, features=features[:40])
    with pytest.raises(ValueError, match="repa_block=9"):
        RepaDiT(DiT(DiTSpec.from_config(dit, 4)), 9, 8)

    logged = []
    run_train_dit(tmp_path, tmp_path / "model", cfg, features=features, log=lambda s, m: logged.append(m))
    repa = [m["repa_loss"] for m in logged if "repa_loss" in m]
    # Before training the projection points anywhere (cosine ~0); after 60 steps along the targets.
    lat = torch.load(tmp_path / "latents.pt", weights_only=False)
    text = torch.load(tmp_path / "text.pt", weights_only=False)
    torch.manual_seed(0)
    untrained = RepaDiT(DiT(DiTSpec.from_config(dit, 4)), dit.repa_block, 8, 2)
    square = [i for i in range(48) if lat["latents"][i].shape == (4, 3, 4, 4)][:8]
    c = caption_index[square]
    untrained(torch.stack([lat["latents"][i] for i in square]), torch.full((8,), 0.5),
              text["tokens"][c].float(), text["mask"][c])
    before = float(untrained.alignment_loss(token_targets(features[square], (4, 3, 4, 4), untrained.dit)))
    assert before > 0.5 and max(repa[-3:]) < 0.2, (before, repa)
    assert all(abs(m["loss"] - m["flow_loss"] - 0.5 * m["repa_loss"]) < 1e-4 for m in logged if "repa_loss" in m)
    trained = load_dit(tmp_path / "model" / "dit.pt", "cpu")  # the DiT alone: no projector weights
    state = torch.load(tmp_path / "model" / "dit.pt", weights_only=False)["state_dict"]
    assert not any(k.startswith(("proj", "dit.")) for k in state)
    assert isinstance(trained, DiT)
