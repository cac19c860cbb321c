"""The train_dit stage: rectified flow on encoded train-split latents, EMA weights to `dit.pt`.

Latents of several shapes (native sizes: `components/buckets.py`) train one model, each batch
drawn from one shape with probability proportional to its clip count.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components import distributed, schedule
from components.buckets import BucketSampler, group_by_shape
from components.captioner import FEATURE_PARTS
from components.checkpoint import save_model
from components.config import Config
from components.dit import DiT, DiTSpec, dit_config_dict
from components.rectified_flow import rf_loss
from components.trainer import LogFn, TrainSpec, data_digest, fit

VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed timesteps of the validation flow-matching loss
VAL_CLIPS = 256


def load_encoded(encoded_dir: Path) -> tuple[dict, dict]:
    encoded_dir = Path(encoded_dir)
    for name in ("latents.pt", "text.pt"):
        if not (encoded_dir / name).exists():
            raise FileNotFoundError(f"{encoded_dir / name} not found: run the encode stage first")
    lat = torch.load(encoded_dir / "latents.pt", map_location="cpu", weights_only=False)
    text = torch.load(encoded_dir / "text.pt", map_location="cpu", weights_only=False)
    if text["captions"][0] != "":
        raise ValueError(f"{encoded_dir / 'text.pt'}: caption 0 must be the empty caption")
    return lat, text


def load_features(encoded_dir: Path) -> torch.Tensor:
    """The captioner's video features the encode stage wrote (REPA's targets)."""
    path = Path(encoded_dir) / "features.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: dit.repa_weight > 0 aligns the DiT with the captioner's video features, "
            "which the caption stage writes beside the captions and the encode stage copies here (rerun "
            "them), or set dit.repa_weight: 0")
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def val_loss(model: DiT, x0: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor,
             seed: int, batch_size: int = 64) -> float:
    """Mean flow-matching loss at `VAL_TIMES` with fixed noise: comparable between runs."""
    model.eval()
    total, n = 0.0, 0
    for t in VAL_TIMES:
        gen = torch.Generator().manual_seed(seed + int(t * 1000))
        for i in range(0, len(x0), batch_size):
            xb = x0[i:i + batch_size]
            tt = torch.full((len(xb),), t)
            loss, _ = rf_loss(model, xb, ctx[i:i + batch_size], mask[i:i + batch_size], gen, t=tt)
            total += float(loss) * len(xb)
            n += len(xb)
    return total / max(n, 1)


def split_buckets(latents: torch.Tensor | list[torch.Tensor], idx: torch.Tensor
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The clips `idx` as (latents (n, c, t, h, w), their clip indices (n,)) per shape, largest
    bucket first. `latents` is one (N, c, t, h, w) tensor (one shape) or N (c, t, h, w) tensors."""
    if torch.is_tensor(latents):
        return [(latents[idx].float(), idx)]
    groups = group_by_shape([tuple(latents[int(i)].shape) for i in idx])
    out = [(torch.stack([latents[int(idx[j])] for j in js]).float(), idx[js]) for js in groups.values()]
    return sorted(out, key=lambda xb: -len(xb[1]))


class RepaDiT(nn.Module):
    """The DiT with REPA's projector (Yu et al. 2024, "Representation Alignment for Generation"):
    block `block`'s output tokens (B, N, D), through a two-layer MLP, regress the clean clip's
    features at each token's place (cosine). The projector only trains; the DiT alone is saved
    and generates. The forward is the DiT's; `hidden` holds the block's tokens of the last call."""

    def __init__(self, dit: DiT, block: int, feature_dim: int, parts: int = 1):
        super().__init__()
        if not 1 <= block <= len(dit.blocks):
            raise ValueError(f"dit.repa_block={block} is not a block of this {len(dit.blocks)}-block DiT: "
                             f"use 1..{len(dit.blocks)}")
        if feature_dim % parts:
            raise ValueError(f"{feature_dim} feature channels do not split into {parts} parts")
        self.dit = dit
        self.block = block
        self.parts = parts
        D = dit.spec.dim
        self.proj = nn.Sequential(nn.Linear(D, 2 * D), nn.SiLU(), nn.Linear(2 * D, feature_dim))
        self.hidden: torch.Tensor | None = None
        dit.blocks[block - 1].register_forward_hook(self._keep)  # copied with the module (EMA)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, ctx, ctx_mask)

    def _keep(self, module: nn.Module, args, out: torch.Tensor) -> None:
        self.hidden = out

    def alignment_loss(self, target: torch.Tensor) -> torch.Tensor:
        """1 - mean cosine of the projected tokens of the last forward and `target` (B, N, F),
        each of the target's `parts` (channel chunks) on its own."""
        pred = self.proj(self.hidden).unflatten(-1, (self.parts, -1))
        return 1.0 - F.cosine_similarity(pred, target.unflatten(-1, (self.parts, -1)), dim=-1).mean()


def unwrap(m: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
        if inner is None:
            return m
        m = inner


def token_targets(features: torch.Tensor, latent_shape: tuple[int, ...], model: DiT) -> torch.Tensor:
    """Captioner grids (n, F, t', h', w') of the square view -> per DiT token of latents shaped
    `latent_shape` (c, T, H, W): (n, N, F). Latent frame k covers frames 4k-3..4k and grid step k
    reads frame 4k, so time keeps the first T steps (a shorter clip's square view is padded);
    space is resized to the token grid (the square view is the whole frame, resized)."""
    _, T, H, W = latent_shape
    pt, ph, pw = model.patch
    grid = features[:, :, :T].float()
    out = F.interpolate(grid, size=(T // pt, H // ph, W // pw), mode="trilinear", align_corners=False)
    return out.flatten(2).transpose(1, 2).contiguous()


def run_train_dit(encoded_dir: Path, model_dir: Path, cfg: Config, log: LogFn | None = None,
                  ckpt_dir: Path | None = None, device: torch.device | str = "cpu",
                  features: torch.Tensor | None = None) -> dict:
    """`features`: the captioner's video features of every clip (N, F, t, h, w) in the latents'
    order (`components.captioner.video_features`) when `dit.repa_weight` > 0; default
    `encoded_dir/features.pt`."""
    t0 = time.time()
    lat, text = load_encoded(encoded_dir)
    splits = lat["split"]
    train_idx = torch.tensor([i for i, s in enumerate(splits) if s == "train"], dtype=torch.long)
    val_idx = torch.tensor([i for i, s in enumerate(splits) if s == "val"], dtype=torch.long)
    if len(train_idx) == 0:
        raise ValueError(f"{encoded_dir}/latents.pt holds no train latents")
    cap_idx = lat["caption_index"]
    # Padding is masked, so cutting the token axis to the longest caption changes nothing but cost.
    used = max(2, int(text["mask"].sum(1).max()))
    tokens = text["tokens"][:, :used].float().to(device)  # (U, L', 384)
    masks = text["mask"][:, :used].to(device)  # (U, L')
    null_ctx, null_mask = tokens[:1], masks[:1]

    # Native sizes: one batch stacks clips of one shape; a bucket's chance is its share of clips.
    by_shape = split_buckets(lat["latents"], train_idx)
    buckets = [(x.to(device), cap_idx[ids].to(device)) for x, ids in by_shape]
    sampler = BucketSampler([len(x) for x, _ in buckets])
    latent_shape = list(buckets[0][0].shape[1:])  # (c, t, h, w) of the largest bucket

    dcfg = cfg.dit
    spec = DiTSpec.from_config(dcfg, latent_channels=latent_shape[0])
    torch.manual_seed(cfg.seed)
    model = DiT(spec).to(device)
    n_tokens = [model.num_tokens(*x.shape[2:]) for x, _ in buckets]
    shifts = [schedule.token_shift(n, dcfg.shift, dcfg.shift_tokens) for n in n_tokens]
    shift = shifts[0]
    targets: list[torch.Tensor] | None = None
    trained: nn.Module = model
    if dcfg.repa_weight > 0:
        if features is None:
            features = load_features(encoded_dir)
        if len(features) != len(splits):
            raise ValueError(f"{len(features)} clips' features for {len(splits)} latents: recompute them "
                             "from the same clips")
        targets = [token_targets(features[ids], tuple(x.shape[1:]), model).to(device) for x, ids in by_shape]
        trained = RepaDiT(model, dcfg.repa_block, features.shape[1], FEATURE_PARTS).to(device)
    del by_shape  # on a GPU, the host copies of the buckets

    def batch_fn(step: int, gen: torch.Generator):
        b, i = sampler.draw(dcfg.batch_size, gen)
        x, caps = buckets[b]
        i = i.to(device)
        c = caps[i]
        if targets is None:
            return x[i], tokens[c], masks[c], gen, shifts[b]
        return x[i], tokens[c], masks[c], gen, shifts[b], targets[b][i]

    def loss_fn(m, batch):
        x0, ctx, mask, gen, bucket_shift = batch[:5]
        loss, info = rf_loss(m, x0, ctx, mask, gen, null_ctx, null_mask, dcfg.cond_dropout, bucket_shift)
        if targets is None:
            return loss, info
        align = unwrap(m).alignment_loss(batch[5])
        # detached tensors: the trainer reads them only at a log step (no GPU sync every step)
        return loss + dcfg.repa_weight * align, {**info, "flow_loss": loss.detach(), "repa_loss": align.detach()}

    tspec = TrainSpec(steps=dcfg.steps, lr=dcfg.lr, warmup=dcfg.warmup, grad_clip=dcfg.grad_clip,
                      ema=dcfg.ema, seed=cfg.seed)
    # The latents and captions too: a new VAE or captioner must not resume a DiT trained on the old ones.
    data = data_digest([x for x, _ in buckets], [c for _, c in buckets], tokens, masks, *(targets or []))
    extra = {"config": dit_config_dict(spec, dcfg), "n_train": len(train_idx), "data": data}
    if len(buckets) > 1:
        extra["buckets"] = [list(x.shape[1:]) for x, _ in buckets]
    mean_tokens = sum(n * len(x) for n, (x, _) in zip(n_tokens, buckets)) / len(train_idx)
    # Under torchrun batch_fn draws the global batch and each rank trains on its share of it.
    res = fit(trained, loss_fn, batch_fn, tspec, ckpt_dir=ckpt_dir, fingerprint_extra=extra, log=log,
              desc="dit", samples_per_batch=dcfg.batch_size,
              tokens_per_batch=round(dcfg.batch_size * mean_tokens))
    ema = res.ema if res.ema is not None else res.model
    if isinstance(ema, RepaDiT):
        ema = ema.dit

    metrics = {
        "final_loss": res.final_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": res.seconds,
        "steps_per_s": (res.steps - res.resumed_from) / max(res.seconds, 1e-9),
        "shift": shift,
        "train_clips": len(train_idx),
        "buckets": len(buckets),
    }
    if res.flops_per_step:
        metrics["flops_per_step"] = float(res.flops_per_step)
        metrics["flop_per_s"] = res.flops_per_step * metrics["steps_per_s"]
    if not distributed.is_main():  # every rank holds the same weights: rank 0 evaluates and writes
        metrics["seconds"] = time.time() - t0
        return metrics
    if len(val_idx):
        vi = val_idx[:VAL_CLIPS]
        total = 0.0
        for x, ids in split_buckets(lat["latents"], vi):
            c = cap_idx[ids].to(device)
            total += val_loss(ema, x.to(device), tokens[c], masks[c], cfg.seed) * len(ids)
        metrics["val_loss"] = total / len(vi)
        metrics["val_clips"] = len(vi)
    save_model(Path(model_dir) / "dit.pt", "dit", dit_config_dict(spec, dcfg), ema.state_dict(),
               shift=shift, latent_shape=latent_shape,
               buckets=[list(x.shape[1:]) for x, _ in buckets])
    metrics["seconds"] = time.time() - t0
    return metrics
