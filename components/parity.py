"""Whole-generation parity: the ONNX Runtime pipeline against the PyTorch one, same seed.

Compared in float, before pixels are rounded to uint8 (a rounding flip is 1/255 and says
nothing about the graphs): the sampled latents, and the decoded videos in [-1, 1].

Tolerances, max |ONNX - PyTorch| over latents and videos: float32 graphs stay within
`FP32_TOLERANCE` (the `gates.onnx_max_abs_diff` default; the tiny test model lands near 1e-6);
the fp16 graphs round every activation to 11 significant bits and the error compounds over the
sampling steps, so they get `FP16_TOLERANCE`, 0.05 of a [-1, 1] pixel range (about 6 of 255 levels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from components.config import Config
from components.rectified_flow import sample

FP32_TOLERANCE = 1e-3
FP16_TOLERANCE = 5e-2

PROMPTS = ("a large red circle moving left quickly on a black background",
           "a small blue triangle staying still on a noise background")


@torch.no_grad()
def generation_parity(bundle_dir: Path, vae_path: Path, dit_path: Path, cfg: Config,
                      seed: int = 1234, providers: list[str] | None = None,
                      precision: str = "fp32") -> dict:
    """Max |ONNX Runtime - PyTorch| of a whole generation (two prompts, CFG), same seeds."""
    from components.generate import T2VPipeline
    from components.onnx_runtime import OnnxT2V

    runtime = OnnxT2V(bundle_dir, providers=providers or ["CPUExecutionProvider"], precision=precision)
    pipe = T2VPipeline.from_paths(vae_path, dit_path, max_tokens=cfg.text.max_tokens, device="cpu")
    prompts, seeds = list(PROMPTS), [seed, seed + 1]
    frames, steps = cfg.data.frames, cfg.sample.steps
    z_onnx = runtime.sample_latents(prompts, seeds, steps=steps, guidance=cfg.sample.guidance,
                                    num_frames=frames, sampler=cfg.sample.sampler)
    ctx, mask = pipe.text.encode(prompts)
    noise = pipe.noise(seeds, len(prompts), frames)
    z_torch = sample(pipe.dit, noise, ctx, mask, pipe.null_ctx, pipe.null_mask, steps,
                     cfg.sample.guidance, pipe.shift(frames), cfg.sample.sampler)
    video_torch = pipe.vae.decode(pipe.vae.denormalize(z_torch)).numpy()  # (B, 3, T, H, W)
    video_onnx = runtime.decode_float(z_onnx)  # (B, 3, T, H, W)
    latent_diff = float(np.abs(z_onnx - z_torch.numpy()).max())
    video_diff = float(np.abs(video_onnx - video_torch).max())
    return {"max_abs_diff": max(latent_diff, video_diff), "latent_max_abs_diff": latent_diff,
            "video_max_abs_diff": video_diff, "steps": steps, "provider": runtime.provider,
            "precision": runtime.precision}
