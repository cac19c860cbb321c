"""Rectified flow objective and sampler for any `model(x, t, ctx, ctx_mask) -> v` (after minRF).

`x_t = (1 - t) x_0 + t * noise`; the network regresses `v = noise - x_0`. Training draws t from a
logit-normal (SD3, Esser et al. 2024 §3.1) pushed through the token-count shift; sampling
integrates t = 1 -> 0 on `schedule.timesteps`, the schedule the ONNX runtime uses too.
Classifier-free guidance (Ho & Salimans 2022) batches the conditional and unconditional branch.
"""

from __future__ import annotations

import torch
from torch import nn

from components import schedule

SAMPLERS = ("euler", "heun")


def rf_loss(
    model: nn.Module,
    x0: torch.Tensor,
    ctx: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    null_ctx: torch.Tensor | None = None,
    null_mask: torch.Tensor | None = None,
    cond_dropout: float = 0.0,
    shift: float = 1.0,
    t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching MSE on latents x0 (B, c, t, h, w) with captions ctx (B, L, D) / mask (B, L).

    With probability `cond_dropout` a caption is replaced by `null_ctx` / `null_mask` (1, L, D)
    so the same network learns the unconditional velocity for guidance. Pass `t` (B,) to
    evaluate at fixed times instead of sampling them.
    """
    B = x0.shape[0]
    dev = x0.device
    if t is None:
        t = torch.sigmoid(torch.randn(B, generator=generator))  # logit-normal(0, 1)
        t = schedule.shift_t(t, shift)
    t = t.to(dev, x0.dtype)
    noise = torch.randn(x0.shape, generator=generator).to(dev, x0.dtype)
    if cond_dropout > 0:
        if null_ctx is None or null_mask is None:
            raise ValueError("cond_dropout > 0 needs null_ctx and null_mask (the empty caption)")
        drop = (torch.rand(B, generator=generator) < cond_dropout).to(dev)
        ctx = torch.where(drop[:, None, None], null_ctx.expand_as(ctx), ctx)
        mask = torch.where(drop[:, None], null_mask.expand_as(mask), mask)
    tb = t.view(B, *([1] * (x0.dim() - 1)))
    xt = (1 - tb) * x0 + tb * noise
    v = model(xt, t, ctx, mask)
    loss = (v - (noise - x0)).pow(2).mean()
    return loss, {}


def _velocity(model: nn.Module, x: torch.Tensor, t: float, ctx: torch.Tensor, mask: torch.Tensor,
              null_ctx: torch.Tensor, null_mask: torch.Tensor, guidance: float) -> torch.Tensor:
    B = x.shape[0]
    if guidance == 1.0:
        tt = torch.full((B,), t, device=x.device, dtype=x.dtype)
        return model(x, tt, ctx, mask)
    tt = torch.full((2 * B,), t, device=x.device, dtype=x.dtype)
    ctx2 = torch.cat([ctx, null_ctx.expand(B, -1, -1)])  # (2B, L, D): cond then uncond
    mask2 = torch.cat([mask, null_mask.expand(B, -1)])
    v_cond, v_uncond = model(torch.cat([x, x]), tt, ctx2, mask2).chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    ctx: torch.Tensor,
    mask: torch.Tensor,
    null_ctx: torch.Tensor,
    null_mask: torch.Tensor,
    steps: int,
    guidance: float,
    shift: float = 1.0,
    sampler: str = "euler",
) -> torch.Tensor:
    """Integrate from `noise` at t = 1 to data at t = 0; null_ctx (1, L, D) is the empty caption."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown: use one of {', '.join(SAMPLERS)}")
    ts = schedule.timesteps(steps, shift)  # (steps + 1,) float32, 1 -> 0
    x = noise
    for i in range(steps):
        t_cur, t_next = float(ts[i]), float(ts[i + 1])
        dt = t_next - t_cur  # negative
        v = _velocity(model, x, t_cur, ctx, mask, null_ctx, null_mask, guidance)
        if sampler == "heun" and t_next > 0:
            x_pred = x + dt * v
            v_next = _velocity(model, x_pred, t_next, ctx, mask, null_ctx, null_mask, guidance)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x + dt * v
    return x
