"""Native sizes: bucket shapes, proportional bucket draws, and one DiT trained on two shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from components.buckets import Bucket, BucketSampler
from components.checkpoint import atomic_torch_save
from components.config import Config, DiTConfig
from components.dit import load_dit
from components.train_dit import load_encoded, run_train_dit, split_buckets, val_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

L = 6  # caption tokens
SHAPES = [(4, 3, 4, 4), (4, 2, 4, 6)]  # (c, t, h, w): a square clip and a shorter landscape one


def test_bucket_shapes_parse_and_check():
    b = Bucket.parse("17x32x48")
    assert (b.frames, b.height, b.width, b.aspect, str(b)) == (17, 32, 48, "landscape", "17x32x48")
    assert Bucket.parse("1x48x32").aspect == "portrait"
    Bucket.parse("1x32x32").check(time_down=4, side_multiple=8)  # a single frame: an image
    with pytest.raises(ValueError, match="FRAMESxHEIGHTxWIDTH"):
        Bucket.parse("32x32")
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        Bucket.parse("16x32x32").check(time_down=4, side_multiple=8)
    with pytest.raises(ValueError, match="width=36 is invalid"):
        Bucket.parse("17x32x36").check(time_down=4, side_multiple=8)


def test_buckets_are_drawn_in_proportion_to_their_clips():
    sampler = BucketSampler([300, 100])
    gen = torch.Generator().manual_seed(0)
    draws = [sampler.draw(4, gen) for _ in range(2000)]
    share = sum(b == 0 for b, _ in draws) / len(draws)
    assert 0.70 < share < 0.80  # 0.75 expected; 2000 draws put 0.70-0.80 beyond 5 sigma
    assert all(int(i.max()) < (300, 100)[b] for b, i in draws)
    one = BucketSampler([5])  # a single bucket draws exactly as unbucketed training does
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(one.draw(8, g1)[1], torch.randint(5, (8,), generator=g2))


def _encoded(tmp_path):
    """latents.pt with clips of two shapes (a list of (c, t, h, w) tensors) and text.pt."""
    g = torch.Generator().manual_seed(0)
    captions = ["", "first", "second", "third"]
    latents, caption_index, split = [], [], []
    for i in range(48):
        shape = SHAPES[i % 3 == 2]  # two square clips for each landscape one
        c = 1 + i % 3
        # Learnable: the caption sets every channel's mean, the rest is small noise.
        offset = torch.linspace(-1, 1, shape[0]).roll(c).view(-1, 1, 1, 1)
        latents.append(offset + 0.3 * torch.randn(shape, generator=g))
        caption_index.append(c)
        split.append("val" if i >= 42 else "train")
    atomic_torch_save({"latents": latents, "clip_id": [f"c{i}" for i in range(48)],
                       "caption_index": torch.tensor(caption_index), "split": split},
                      tmp_path / "latents.pt")
    tokens = torch.randn(len(captions), L, 384, generator=g)
    tokens[0] = 0
    mask = torch.arange(L)[None] < torch.tensor([[1], [4], [5], [6]])
    atomic_torch_save({"captions": captions, "tokens": tokens.half(), "mask": mask}, tmp_path / "text.pt")


def _val_losses(model, lat, text) -> list[float]:
    idx = torch.tensor([i for i, s in enumerate(lat["split"]) if s == "train"])
    out = []
    for x, ids in split_buckets(lat["latents"], idx):
        c = lat["caption_index"][ids]
        out.append(val_loss(model, x, text["tokens"][c].float(), text["mask"][c], seed=0))
    return out


def test_bucketed_batches_train(tmp_path):
    _encoded(tmp_path)
    cfg = dataclasses.replace(Config(), dit=DiTConfig(preset="tiny", steps=80, batch_size=8, lr=2e-3,
                                                      warmup=5, ema=0.5, cond_dropout=0.1))
    logged = []
    metrics = run_train_dit(tmp_path, tmp_path / "model", cfg, log=lambda s, m: logged.append(m))
    assert metrics["buckets"] == 2 and metrics["train_clips"] == 42 and "val_loss" in metrics
    trained = load_dit(tmp_path / "model" / "dit.pt", "cpu")
    torch.manual_seed(cfg.seed)  # the same initial weights as training started from
    from components.dit import DiT, DiTSpec
    initial = DiT(DiTSpec.from_config(cfg.dit, latent_channels=4))
    lat, text = load_encoded(tmp_path)
    before, after = _val_losses(initial, lat, text), _val_losses(trained, lat, text)
    for b, a in zip(before, after):  # each shape learned, not one at the other's expense
        assert a < 0.7 * b, (before, after)
    # One model takes every bucket's shape and a single latent frame (an image).
    ctx, mask = text["tokens"][1:2].float(), text["mask"][1:2]
    for shape in (*SHAPES, (4, 1, 4, 6)):
        v = trained(torch.randn(1, *shape), torch.tensor([0.5]), ctx, mask)
        assert v.shape == (1, *shape)
