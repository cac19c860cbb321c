"""Device selection, and the CUDA paths of the training engine and the models.

The selection tests run everywhere; the CUDA ones need a GPU (CI has none: they run on a lent GPU
machine with `pytest tests/test_gpu.py`, BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch

from components import distributed
from components.config import VAEConfig
from components.dit import DiT, DiTSpec
from components.rectified_flow import rf_loss, sample
from components.trainer import TrainSpec, fit
from components.vae import VideoVAE

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="CUDA path: this machine has no GPU")
SPEC = DiTSpec(in_channels=4, dim=64, depth=2, heads=2, mlp_ratio=2.0, patch_t=1, patch_h=2, patch_w=2)


# ----------------------------------------------------------------------------------------------
# Which device the stages use (components.distributed.device)
# ----------------------------------------------------------------------------------------------


def test_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.delenv(distributed.DEVICE_ENV, raising=False)
    assert distributed.device().type == ("cuda" if HAS_GPU else "cpu")


def test_zoetrope_device_cpu_keeps_a_gpu_machine_on_the_cpu(monkeypatch):
    monkeypatch.setenv(distributed.DEVICE_ENV, "cpu")
    assert distributed.device() == torch.device("cpu")


@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_names_the_fix(monkeypatch):
    monkeypatch.setenv(distributed.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="sees no GPU.*unset ZOETROPE_DEVICE"):
        distributed.device()


def test_a_device_that_is_not_one_is_named(monkeypatch):
    monkeypatch.setenv(distributed.DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match="ZOETROPE_DEVICE='gpu0'.*cpu, cuda or cuda:N"):
        distributed.device()


# ----------------------------------------------------------------------------------------------
# CUDA: the same code on a GPU
# ----------------------------------------------------------------------------------------------


def _batch(b: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 3, 8, 8, generator=g) * 0.5
    ctx = torch.randn(b, 6, 384, generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    return x0.to(device), ctx.to(device), mask.to(device)


@needs_gpu
def test_dit_forward_on_gpu_matches_cpu_in_fp32():
    torch.manual_seed(0)
    model = DiT(SPEC).eval()
    with torch.no_grad():  # adaLN-Zero starts at v = 0: wake every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, ctx, mask = _batch(3, "cpu")
    t = torch.tensor([0.1, 0.5, 0.9])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want = model(x, t, ctx, mask)
            got = model.to("cuda")(x.cuda(), t.cuda(), ctx.cuda(), mask.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert want.abs().max() > 0.01  # the weights were woken: the comparison means something
    assert (got - want).abs().max() < 1e-4


@needs_gpu
def test_fit_on_gpu_trains_under_bf16_autocast_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = DiT(SPEC).cuda()
    x0, ctx, mask = _batch(16, "cuda")
    seen: list[torch.dtype] = []
    hook = model.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def loss_fn(m, batch):
        return rf_loss(m, x0, ctx, mask, batch)

    losses: list[float] = []
    res = fit(model, loss_fn, lambda step, gen: gen, TrainSpec(steps=60, lr=2e-3, warmup=5, grad_clip=1.0,
              ema=0.9, ckpt_every=0, log_every=10), log=lambda s, m: losses.append(m["loss"]),
              samples_per_batch=16)
    hook.remove()
    assert torch.bfloat16 in seen  # the blocks ran under bf16 autocast
    assert all(p.dtype == torch.float32 and p.is_cuda for p in res.model.parameters())
    assert res.flops_per_step and res.flops_per_step > 0
    assert losses[-1] < losses[0]
    z = sample(res.ema, torch.randn(2, 4, 3, 8, 8, device="cuda"), ctx[:2], mask[:2], ctx[:1], mask[:1],
               steps=4, guidance=3.0, shift=2.0)
    assert z.is_cuda and torch.isfinite(z).all()


@needs_gpu
def test_vae_chunked_decode_on_gpu_equals_whole_decode():
    torch.manual_seed(0)
    vae = VideoVAE(VAEConfig(base_channels=8, latent_channels=4, time_down=4, space_down=4, patch=2)).cuda().eval()
    z = torch.randn(2, 4, 5, 4, 4, device="cuda")
    with torch.no_grad():
        whole = vae.decoder(z)
        for chunk in (1, 2, 3):
            assert torch.allclose(torch.cat(list(vae.decoder.stream(z, chunk)), dim=2), whole, atol=1e-4)


def _nan_at(step_bad: int, device: str, ckpt_dir, log_every: int):
    torch.manual_seed(0)
    model = DiT(SPEC).to(device)
    x0, ctx, mask = _batch(4, device)

    def loss_fn(m, batch):
        step, gen = batch
        loss, metrics = rf_loss(m, x0, ctx, mask, gen)
        return (loss * float("nan") if step == step_bad else loss), metrics

    spec = TrainSpec(steps=20, lr=1e-3, ckpt_every=log_every, log_every=log_every)
    with pytest.raises(FloatingPointError, match="lower the learning rate") as err:
        fit(model, loss_fn, lambda step, gen: (step, gen), spec, ckpt_dir=ckpt_dir)
    return str(err.value)


def test_a_non_finite_loss_stops_training_at_its_step_on_cpu(tmp_path):
    message = _nan_at(2, "cpu", tmp_path, log_every=5)
    assert "became nan at step 2" in message
    assert not list(tmp_path.glob("state-*.pt"))  # nothing was checkpointed before it


@needs_gpu
def test_a_non_finite_loss_on_gpu_stops_training_before_a_checkpoint_keeps_it(tmp_path):
    # On CUDA the loss is read at log and checkpoint steps only: the NaN of step 7 is found at
    # step 9 (the 10th), before the checkpoint after it is written; the one after step 4 stays.
    message = _nan_at(7, "cuda", tmp_path, log_every=5)
    assert "step 9" in message
    saved = list(tmp_path.glob("state-*.pt"))
    assert len(saved) == 1 and torch.load(saved[0], weights_only=False)["step"] == 5
