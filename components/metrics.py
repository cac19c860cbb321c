"""Reconstruction metrics on video tensors `(B, C, T, H, W)`, any value range (pass `data_range`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over videos of the per-video PSNR in dB; `data_range` is 2 for [-1, 1], 255 for uint8."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    x, y = x.double(), y.double()
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)  # (B,)
    return float((10.0 * torch.log10(data_range**2 / mse)).mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 7,
             sigma: float = 1.5) -> torch.Tensor:
    """Per-window SSIM (Wang et al. 2004) of every frame and channel, in x's dtype; Gaussian
    window, valid padding.

    A 7-pixel window (not the paper's 11) because our frames are only 32 pixels wide.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != 5:
        raise ValueError(f"ssim: expected video (B, C, T, H, W), got shape {tuple(x.shape)}")
    B, C, T, H, W = x.shape
    window = min(window, H, W)
    x = x.permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)
    y = y.permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)
    k = _gaussian_window(window, sigma)[None, None].to(x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mx * mx
    syy = F.conv2d(y * y, k) - my * my
    sxy = F.conv2d(x * y, k) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 7,
         sigma: float = 1.5) -> float:
    """Mean SSIM of every frame and channel, computed in float64 (see `ssim_map`)."""
    return float(ssim_map(x.double(), y.double(), data_range, window, sigma).mean())
