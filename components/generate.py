"""The PyTorch text-to-video pipeline: captions -> MiniLM tokens -> DiT sampling -> VAE decode.

Starting noise comes from `schedule.initial_noise` and the timesteps from `schedule.timesteps`,
so the same seed gives the same video here and in the ONNX runtime (`components/onnx_runtime.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from components import schedule
from components.config import DataConfig
from components.dit import DiT, load_dit
from components.rectified_flow import sample
from components.text_encoder import TextEncoder
from components.vae import VideoVAE, load_vae, to_uint8


class T2VPipeline:
    def __init__(self, vae: VideoVAE, dit: DiT, text: TextEncoder, device: torch.device | str):
        self.vae, self.dit, self.text = vae, dit, text
        self.device = torch.device(device)
        data = getattr(vae, "data", {})  # the clips the VAE was trained on (load_vae sets it)
        self.size = int(data.get("size", DataConfig.size))
        self.frames = int(data.get("frames", DataConfig.frames))
        self.null_ctx, self.null_mask = text.encode([""])  # (1, L, 384), (1, L)

    @classmethod
    def from_paths(cls, vae_path: str | Path, dit_path: str | Path, max_tokens: int,
                   device: torch.device | str) -> "T2VPipeline":
        return cls(load_vae(vae_path, device), load_dit(dit_path, device),
                   TextEncoder(max_tokens, device), device)

    def latent_shape(self, batch: int, num_frames: int, height: int | None = None,
                     width: int | None = None) -> tuple[int, ...]:
        return (batch, *self.vae.latent_shape(num_frames, height or self.size, width or self.size))

    def shift(self, num_frames: int, height: int | None = None, width: int | None = None) -> float:
        _, t, h, w = self.vae.latent_shape(num_frames, height or self.size, width or self.size)
        trained = getattr(self.dit, "train_config", {})  # the dit: section that trained it
        return schedule.token_shift(self.dit.num_tokens(t, h, w), trained.get("shift", schedule.LEGACY_SHIFT),
                                    trained.get("shift_tokens", schedule.LEGACY_SHIFT_TOKENS))

    def noise(self, seed: int | Sequence[int], batch: int, num_frames: int, height: int | None = None,
              width: int | None = None) -> torch.Tensor:
        """One int: `initial_noise(seed, (B, c, t, h, w))`. A list: one seed per video, each drawn
        alone as `OnnxT2V.generate_batch` does, so a batch reproduces single-prompt videos."""
        shape = self.latent_shape(batch, num_frames, height, width)
        if isinstance(seed, (int, np.integer)):
            noise = schedule.initial_noise(int(seed), shape)
        else:
            if len(seed) != batch:
                raise ValueError(f"got {len(seed)} seeds for {batch} prompts: pass one int or one per prompt")
            noise = np.concatenate([schedule.initial_noise(int(s), (1, *shape[1:])) for s in seed])
        return torch.from_numpy(noise).to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int | Sequence[int], steps: int = 25,
                 guidance: float = 6.0, num_frames: int | None = None,
                 sampler: str = "euler", *, height: int | None = None,
                 width: int | None = None) -> np.ndarray:
        """-> uint8 video (B, T, H, W, 3): `num_frames` (1: an image) of `height` x `width`
        (default: the trained clip's frames and square size; any native size the model knows)."""
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts, not one string")
        num_frames = num_frames or self.frames
        ctx, mask = self.text.encode(list(prompts))  # (B, L, 384), (B, L)
        noise = self.noise(seed, len(prompts), num_frames, height, width)  # (B, c, t, h, w)
        z = sample(self.dit, noise, ctx, mask, self.null_ctx, self.null_mask, steps, guidance,
                   self.shift(num_frames, height, width), sampler)  # (B, c, t, h, w), normalised
        video = self.vae.decode(self.vae.denormalize(z))  # (B, 3, T, H, W) in [-1, 1]
        return to_uint8(video).permute(0, 2, 3, 4, 1).cpu().numpy()
