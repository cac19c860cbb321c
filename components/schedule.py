"""Sampling schedule and initial noise, in numpy so PyTorch and ONNX Runtime share them exactly.

Rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow Transformers"):
`x_t = (1 - t) x_0 + t * noise`, integrated from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

import math

import numpy as np


def token_shift(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0,
                max_tokens: int = 4096, max_shift: float = 3.0) -> float:
    """Timestep shift that grows with the token count (SD3 §5.3.2): more tokens, more noise."""
    if num_tokens <= base_tokens:
        return base_shift
    frac = math.log(num_tokens / base_tokens) / math.log(max_tokens / base_tokens)
    return base_shift + min(1.0, frac) * (max_shift - base_shift)


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
