"""Sampling schedule and initial noise, in numpy so PyTorch and ONNX Runtime share them exactly.

Rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow Transformers"):
`x_t = (1 - t) x_0 + t * noise`, integrated from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

import math

import numpy as np

# The shift rule of models trained before `dit.shift` / `dit.shift_tokens` existed (their checkpoints
# and bundles do not name them): 1 at 256 tokens. Both sampling paths fall back to it.
LEGACY_SHIFT = 1.0
LEGACY_SHIFT_TOKENS = 256

def token_shift(num_tokens: int, base_shift: float = 1.0, base_tokens: int = 256) -> float:
    """Timestep shift for `num_tokens` latent tokens: `base_shift` at `base_tokens`, growing as
    sqrt(num_tokens / base_tokens) (SD3 §5.3.2's resolution rule, alpha = sqrt(m / n)), never below 1.

    More tokens carry more redundant signal, so the same noise level hides less of the video and
    training and sampling must spend more time at high noise, where layout and motion are decided.
    On the default profile's 80-token latents a base of 3 lifted motion adherence from 0.34 to 0.95
    (docs/architecture.md): with shift 1 the DiT saw too few high-noise steps to learn direction.
    """
    if num_tokens < 1 or base_tokens < 1 or base_shift <= 0:
        raise ValueError(f"token_shift needs positive tokens and shift, got num_tokens={num_tokens}, "
                         f"base_tokens={base_tokens}, base_shift={base_shift}")
    return max(1.0, base_shift * math.sqrt(num_tokens / base_tokens))


def shift_t(t: np.ndarray | float, shift: float) -> np.ndarray | float:
    """Map uniform t to the shifted t' = s t / (1 + (s - 1) t); shift 1 is the identity."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def timesteps(steps: int, shift: float = 1.0) -> np.ndarray:
    """`steps + 1` times from 1 down to 0 (float32)."""
    if steps < 1:
        raise ValueError(f"steps={steps} is invalid: use at least 1 sampling step")
    t = np.linspace(1.0, 0.0, steps + 1, dtype=np.float64)
    return np.asarray(shift_t(t, shift), dtype=np.float32)


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The seeded starting noise, identical for every backend."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
