"""Encode once, train many times: clips -> normalised VAE latents, captions -> MiniLM token states.

Writes `latents.pt` (posterior means, normalised with the VAE's measured per-channel stats: one
(N, c, t, h, w) tensor when every clip has one shape, else, with native sizes, the list of the N
clips' (c, t, h, w) latents in manifest order, which train_dit groups by shape) and
`text.pt` (unique captions, index 0 the empty caption used for classifier-free guidance), as
docs/architecture.md specifies, and `features.pt` when the caption stage wrote it beside the
captions: the captioner's video features of every clip (`components.captioner.video_features`,
float16 (N, F, t, h, w) in manifest order), the targets the DiT's tokens are aligned with when
`dit.repa_weight` > 0, copied so that train_dit reads `data/encoded` alone.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from components.checkpoint import atomic_torch_save, copy_file
from components.config import Config
from components.text_encoder import TextEncoder
from components.trainer import LogFn
from components.vae import EVAL_BATCH, load_vae, to_unit


def read_captions(captions_dir: Path) -> dict[str, str]:
    """clip_id -> caption from `captions.csv`."""
    path = Path(captions_dir) / "captions.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the caption stage first")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"clip_id", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks columns {sorted(missing)}: expected clip_id, caption, source")
        return {row["clip_id"]: (row["caption"] or "").strip() for row in reader}


@torch.no_grad()
def encode_latents(vae, video: torch.Tensor, device: torch.device | str,
                   batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """uint8 (N, 3, T, H, W) -> normalised posterior means float32 (N, c, t, h, w) on CPU."""
    out = []
    for i in range(0, len(video), batch_size):
        mu, _ = vae.encode(to_unit(video[i:i + batch_size]).to(device))
        out.append(vae.normalize(mu).float().cpu())
    return torch.cat(out)


def run_encode(clips_dir: Path, captions_dir: Path, vae_path: Path, out_dir: Path, cfg: Config,
               log: LogFn | None = None, device: torch.device | str = "cpu") -> dict:
    from components.clips import load_clips  # the prepare stage's reader

    t0 = time.time()
    clips = load_clips(Path(clips_dir), cfg.data.size)
    captions = read_captions(Path(captions_dir))
    clip_ids = [r["clip_id"] for r in clips.rows]
    texts = [captions.get(c, "") for c in clip_ids]
    unique = [""] + sorted({t for t in texts if t})
    index = {t: i for i, t in enumerate(unique)}

    vae = load_vae(vae_path, device)
    groups = clips.native()  # [(bucket, manifest indices, uint8 (n, 3, T, H, W))] per clip shape
    if len(groups) == 1:
        latents = encode_latents(vae, groups[0][2], device)  # (N, c, t, h, w)
        flat = latents.flatten()
    else:
        latents = [None] * len(clips)  # N (c, t, h, w), each clip at its own shape
        for _, ids, video in groups:
            for i, z in zip(ids, encode_latents(vae, video, device)):
                latents[i] = z
        flat = torch.cat([z.flatten() for z in latents])
    features = Path(captions_dir) / "features.pt"
    if features.exists():
        copy_file(features, Path(out_dir) / "features.pt")
    encoder = TextEncoder(cfg.text.max_tokens, device)
    tokens, mask = encoder.encode(unique)  # (U, L, 384), (U, L)

    out_dir = Path(out_dir)
    atomic_torch_save({
        "latents": latents,
        "clip_id": clip_ids,
        "caption_index": torch.tensor([index[t] for t in texts], dtype=torch.int64),
        "split": [r["split"] for r in clips.rows],
    }, out_dir / "latents.pt")
    atomic_torch_save({
        "captions": unique,
        "tokens": tokens.to(torch.float16).cpu(),
        "mask": mask.cpu(),
    }, out_dir / "text.pt")
    metrics = {
        "clips": len(clip_ids),
        "uncaptioned_clips": sum(1 for t in texts if not t),
        "unique_captions": len(unique),
        "latent_shapes": len(groups),
        "latent_mean_abs": float(flat.mean().abs()),
        "latent_std": float(flat.std()),
        "captioner_features": int(features.exists()),
        "seconds": time.time() - t0,
    }
    if log is not None:
        log(0, metrics)
    return metrics
