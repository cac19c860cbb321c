"""The train_dit stage: rectified flow on encoded train-split latents, EMA weights to `dit.pt`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from components import distributed, schedule
from components.checkpoint import save_model
from components.config import Config
from components.dit import DiT, DiTSpec, dit_config_dict
from components.rectified_flow import rf_loss
from components.trainer import LogFn, TrainSpec, fit

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


def run_train_dit(encoded_dir: Path, model_dir: Path, cfg: Config, log: LogFn | None = None,
                  ckpt_dir: Path | None = None, device: torch.device | str = "cpu") -> dict:
    t0 = time.time()
    lat, text = load_encoded(encoded_dir)
    splits = lat["split"]
    train_idx = torch.tensor([i for i, s in enumerate(splits) if s == "train"], dtype=torch.long)
    val_idx = torch.tensor([i for i, s in enumerate(splits) if s == "val"], dtype=torch.long)
    if len(train_idx) == 0:
        raise ValueError(f"{encoded_dir}/latents.pt holds no train latents")
    latents = lat["latents"].float()  # (N, c, t, h, w)
    cap_idx = lat["caption_index"]
    # Padding is masked, so cutting the token axis to the longest caption changes nothing but cost.
    used = max(2, int(text["mask"].sum(1).max()))
    tokens = text["tokens"][:, :used].float().to(device)  # (U, L', 384)
    masks = text["mask"][:, :used].to(device)  # (U, L')
    null_ctx, null_mask = tokens[:1], masks[:1]

    dcfg = cfg.dit
    spec = DiTSpec.from_config(dcfg, latent_channels=latents.shape[1])
    torch.manual_seed(cfg.seed)
    model = DiT(spec).to(device)
    train_x = latents[train_idx].to(device)
    train_c = cap_idx[train_idx].to(device)
    shift = schedule.token_shift(model.num_tokens(*latents.shape[2:]), dcfg.shift, dcfg.shift_tokens)

    def batch_fn(step: int, gen: torch.Generator):
        i = torch.randint(len(train_idx), (dcfg.batch_size,), generator=gen).to(device)
        c = train_c[i]
        return train_x[i], tokens[c], masks[c], gen

    def loss_fn(m, batch):
        x0, ctx, mask, gen = batch
        return rf_loss(m, x0, ctx, mask, gen, null_ctx, null_mask, dcfg.cond_dropout, shift)

    tspec = TrainSpec(steps=dcfg.steps, lr=dcfg.lr, warmup=dcfg.warmup, grad_clip=dcfg.grad_clip,
                      ema=dcfg.ema, seed=cfg.seed)
    extra = {"config": dit_config_dict(spec, dcfg), "n_train": len(train_idx)}
    # Under torchrun batch_fn draws the global batch and each rank trains on its share of it.
    res = fit(model, loss_fn, batch_fn, tspec, ckpt_dir=ckpt_dir, fingerprint_extra=extra, log=log,
              desc="dit", samples_per_batch=dcfg.batch_size,
              tokens_per_batch=dcfg.batch_size * model.num_tokens(*latents.shape[2:]))
    ema = res.ema if res.ema is not None else res.model

    metrics = {
        "final_loss": res.final_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": res.seconds,
        "steps_per_s": (res.steps - res.resumed_from) / max(res.seconds, 1e-9),
        "shift": shift,
        "train_clips": len(train_idx),
    }
    if res.flops_per_step:
        metrics["flops_per_step"] = float(res.flops_per_step)
        metrics["flop_per_s"] = res.flops_per_step * metrics["steps_per_s"]
    if not distributed.is_main():  # every rank holds the same weights: rank 0 evaluates and writes
        metrics["seconds"] = time.time() - t0
        return metrics
    if len(val_idx):
        vi = val_idx[:VAL_CLIPS]
        c = cap_idx[vi].to(device)
        metrics["val_loss"] = val_loss(ema, latents[vi].to(device), tokens[c], masks[c], cfg.seed)
        metrics["val_clips"] = len(vi)
    state = {k: v.cpu() for k, v in ema.state_dict().items()}
    save_model(Path(model_dir) / "dit.pt", "dit", dit_config_dict(spec, dcfg), state,
               shift=shift, latent_shape=list(latents.shape[1:]))
    metrics["seconds"] = time.time() - t0
    return metrics
