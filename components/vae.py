"""Causal video VAE: video `(B, 3, T, H, W)` in [-1, 1] <-> latents `(B, c, t, h, w)`.

Causal in time (MAGVIT-v2, Yu et al. 2023; Open-Sora Plan's CausalVAE): every convolution pads only
the past, and each 2x time step maps frame 0 alone and then pairs of frames, so T = 1 + k * time_down
frames give t = 1 + k latent frames and the first frame is encoded as an image. Convolutions are
factorised into a 3x3 spatial and a 3-tap causal temporal kernel (R(2+1)D, Tran et al. 2018), and
the first and last `patch`x of space is a pixel (un)shuffle (as Cosmos Tokenizer's patchify), because
on a CPU full-resolution convolutions cost most of the budget and buy little: with patch 4 every
convolution runs at 8x8 and trained to a higher PSNR per CPU-second than patch 2.

KL-regularised (Kingma & Welling 2014) with a small weight; L1 plus L2 reconstruction loss, each
pixel's error optionally weighted up where the clip has an edge (`edge_map`, `vae.edge_weight`): the
error sits on edges and corners, which is where a square becomes a circle. The
per-channel mean and std of the posterior means over the training clips are measured after
training and stored in the checkpoint: the DiT sees `(mu - mean) / std`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from components.buckets import Bucket, BucketSampler
from components.checkpoint import load_model, save_model
from components.config import Config, VAEConfig
from components.metrics import psnr, ssim
from components.trainer import LogFn, TrainSpec, data_digest, fit

STATS_CLIPS = 1024  # training clips whose posterior means give the latent mean / std
EVAL_BATCH = 32

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """uint8 video in [0, 255] -> float in [-1, 1]."""
    return video.float() / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    return ((video.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def space_to_depth(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*r*r, T, H/r, W/r)."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // r, r, W // r, r).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(B, C * r * r, T, H // r, W // r)


def depth_to_space(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C*r*r, T, h, w) -> (B, C, T, h*r, w*r); the inverse of `space_to_depth`."""
    B, Crr, T, h, w = x.shape
    x = x.reshape(B, Crr // (r * r), r, r, T, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(B, Crr // (r * r), T, h * r, w * r)


class ChannelNorm(nn.Module):
    """RMS norm over channels at each (t, h, w): unlike GroupNorm it never mixes frames (causal)."""

    def __init__(self, ch: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch, 1, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight


class CausalConv(nn.Module):
    """Conv3d with kernel (kt, k, k) that pads kt - 1 past frames with zeros and none in the future."""

    def __init__(self, cin: int, cout: int, kt: int = 1, k: int = 3, stride_t: int = 1,
                 stride_s: int = 1):
        super().__init__()
        self.pad_t = kt - 1
        self.conv = nn.Conv3d(cin, cout, (kt, k, k), stride=(stride_t, stride_s, stride_s),
                              padding=(0, k // 2, k // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_t:
            x = F.pad(x, (0, 0, 0, 0, self.pad_t, 0))
        return self.conv(x)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Two (2+1)D causal convolutions with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.norm2 = ChannelNorm(ch), ChannelNorm(ch)
        self.s1, self.t1 = CausalConv(ch, ch, kt=1, k=3), CausalConv(ch, ch, kt=3, k=1)
        self.s2, self.t2 = CausalConv(ch, ch, kt=1, k=3), CausalConv(ch, ch, kt=3, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.t1(self.s1(F.silu(self.norm1(x))))
        h = self.t2(self.s2(F.silu(self.norm2(h))))
        return x + h


class TimeDown(nn.Module):
    """t -> 1 + (t - 1) / 2: output frame 0 sees input frame 0 only, frame j sees 2j-2..2j."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = CausalConv(ch, ch, kt=3, k=1, stride_t=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TimeUp(nn.Module):
    """t -> 2t - 1: each frame becomes two (depth-to-time), and frame 0's first copy is dropped."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = CausalConv(ch, 2 * ch, kt=3, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, t, h, w = x.shape
        y = self.conv(x).reshape(B, 2, C, t, h, w).permute(0, 2, 3, 1, 4, 5)  # (B, C, t, 2, h, w)
        return y.reshape(B, C, 2 * t, h, w)[:, :, 1:]


class SpaceDown(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv(cin, cout, kt=1, k=3, stride_s=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SpaceUp(nn.Module):
    """Sub-pixel convolution (Shi et al. 2016): conv to 4x channels, then depth-to-space."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv(cin, 4 * cout, kt=1, k=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv(x), 2)


def _levels(cfg: VAEConfig) -> tuple[int, int, list[int]]:
    """(space steps after the pixel unshuffle, time steps, channels at each level)."""
    n_space = int(math.log2(cfg.space_down)) - int(math.log2(cfg.patch))
    n_time = int(math.log2(cfg.time_down))
    chs = [cfg.base_channels]
    for i in range(max(n_space, n_time)):
        chs.append(chs[-1] * 2 if i < n_space else chs[-1])
    return n_space, n_time, chs


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n_space, n_time, chs = _levels(cfg)
        self.patch = cfg.patch
        self.conv_in = CausalConv(3 * cfg.patch**2, chs[0], kt=1, k=3)
        layers: list[nn.Module] = []
        for i in range(len(chs) - 1):
            layers.append(ResBlock(chs[i]))
            if i < n_time:
                layers.append(TimeDown(chs[i]))
            if i < n_space:
                layers.append(SpaceDown(chs[i], chs[i + 1]))
        layers.append(ResBlock(chs[-1]))
        self.layers = nn.Sequential(*layers)
        self.norm_out = ChannelNorm(chs[-1])
        self.conv_out = CausalConv(chs[-1], 2 * cfg.latent_channels, kt=1, k=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(space_to_depth(x, self.patch))  # (B, C0, T, H/p, W/p)
        h = self.layers(h)  # (B, C, t, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2c, t, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n_space, n_time, chs = _levels(cfg)
        self.conv_in = CausalConv(cfg.latent_channels, chs[-1], kt=1, k=3)
        layers: list[nn.Module] = [ResBlock(chs[-1])]
        for i in reversed(range(len(chs) - 1)):
            if i < n_space:
                layers.append(SpaceUp(chs[i + 1], chs[i]))
            if i < n_time:
                layers.append(TimeUp(chs[i]))
            layers.append(ResBlock(chs[i]))
        self.layers = nn.Sequential(*layers)
        self.norm_out = ChannelNorm(chs[0])
        self.patch = cfg.patch
        self.conv_out = CausalConv(chs[0], 3 * cfg.patch**2, kt=1, k=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.conv_in(z))  # (B, C0, T, H/p, W/p)
        return depth_to_space(self.conv_out(F.silu(self.norm_out(h))), self.patch)  # (B, 3, T, H, W)

    def stream(self, z: torch.Tensor, chunk_frames: int) -> Iterator[torch.Tensor]:
        """`forward` run on `chunk_frames` latent frames at a time: yields the video in pieces
        (B, 3, T_i, H, W) whose concatenation along time equals `forward(z)`.

        Memory is bounded by the chunk, not the video. Every temporal convolution is causal with
        kernel 3, so carrying the last 2 frames of its input across chunks (`_Stream`) gives each
        frame exactly the context it has in the whole video; everything else acts per frame.
        """
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames} is invalid: decode at least 1 latent frame at a time")
        state = _Stream()
        for i in range(0, z.shape[2], chunk_frames):
            h = self.conv_in(z[:, :, i:i + chunk_frames])  # kt=1: per frame
            for layer in self.layers:
                h = state.layer(layer, h)
            yield depth_to_space(self.conv_out(F.silu(self.norm_out(h))), self.patch)
            state.first = False


class _Stream:
    """The causal state of a chunked decode: each temporal conv's last input frames.

    Mirrors `ResBlock.forward` and `TimeUp.forward` with the carried frames in place of the zero
    padding; `tests/test_vae_chunked.py` checks it against the whole-video decode.
    """

    def __init__(self) -> None:
        self.past: dict[nn.Module, torch.Tensor] = {}
        self.first = True  # the first chunk holds latent frame 0

    def conv(self, conv: CausalConv, x: torch.Tensor) -> torch.Tensor:
        if not conv.pad_t:
            return conv(x)
        past = self.past.get(conv)
        if past is None:  # the start of the video: the zeros CausalConv pads with
            past = x.new_zeros(*x.shape[:2], conv.pad_t, *x.shape[3:])
        x = torch.cat([past, x], dim=2)
        self.past[conv] = x[:, :, -conv.pad_t:]
        return conv.conv(x)

    def layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, ResBlock):
            h = self.conv(layer.t1, layer.s1(F.silu(layer.norm1(x))))
            h = self.conv(layer.t2, layer.s2(F.silu(layer.norm2(h))))
            return x + h
        if isinstance(layer, TimeUp):
            B, C, t, h, w = x.shape
            y = self.conv(layer.conv, x).reshape(B, 2, C, t, h, w).permute(0, 2, 3, 1, 4, 5)
            y = y.reshape(B, C, 2 * t, h, w)
            return y[:, :, 1:] if self.first else y  # only latent frame 0 maps to one frame
        if isinstance(layer, SpaceUp):
            return layer(x)  # kt=1: per frame
        raise TypeError(f"chunked decoding does not know {type(layer).__name__}: teach _Stream.layer its "
                        "temporal behaviour")


class VideoVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Measured after training (`measure_latent_stats`); identity until then.
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(c, t, h, w) for a video of `frames` x `height` x `width`."""
        self.check_video_shape(frames, height, width)
        return (self.cfg.latent_channels, (frames - 1) // self.cfg.time_down + 1,
                height // self.cfg.space_down, width // self.cfg.space_down)

    def check_video_shape(self, frames: int, height: int, width: int) -> None:
        td, sd = self.cfg.time_down, self.cfg.space_down
        if (frames - 1) % td:
            raise ValueError(f"frames={frames} is invalid for the causal VAE: use 1 + {td}k frames")
        if height % sd or width % sd:
            raise ValueError(f"size {height}x{width} is invalid: use multiples of {sd}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video (B, 3, T, H, W) in [-1, 1] -> posterior mean and log-variance (B, c, t, h, w)."""
        self.check_video_shape(*x.shape[2:])
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Latents (B, c, t, h, w), not normalised -> video (B, 3, T, H, W) in [-1, 1].

        With `chunk_frames`, decodes that many latent frames at a time (`Decoder.stream`): the
        same video in memory bounded by the chunk.
        """
        if chunk_frames is None:
            return self.decoder(z).clamp(-1.0, 1.0)
        return torch.cat(list(self.decoder.stream(z, chunk_frames)), dim=2).clamp(-1.0, 1.0)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                latent_noise: torch.Tensor | None = None):
        """Reconstruction (unclamped, for the loss), posterior mean and log-variance.

        `latent_noise` (B, c): the std of Gaussian noise added to each clip's latent channels
        before decoding (the decoder phase's `vae.decoder_noise`)."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        if latent_noise is not None:
            noise = torch.randn(mu.shape, generator=generator).to(mu.device)
            z = z + latent_noise.to(mu.device)[:, :, None, None, None] * noise
        return self.decoder(z), mu, logvar


def edge_map(x: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, T, H, W) per-pixel loss weights: 1 + weight * the largest spatial step of the clip
    (over channels, on the [-1, 1] scale) within one pixel, so corners and edges weigh more."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    g = F.pad(dx, (0, 1)).maximum(F.pad(dy, (0, 0, 0, 1))).amax(1, keepdim=True)  # (B, 1, T, H, W)
    g = F.max_pool3d(g, (1, 3, 3), stride=1, padding=(0, 1, 1))
    return 1.0 + weight * g


def vae_loss(model: VideoVAE, x: torch.Tensor, kl_weight: float,
             generator: torch.Generator | None = None,
             mse_weight: float = 0.0, edge_weight: float = 0.0,
             latent_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + mse_weight * L2 of the reconstruction error, that error first scaled by `edge_map`
    when edge_weight > 0, plus kl_weight * KL. The metrics are the plain (unweighted) L1 and L2.
    `latent_noise`: see `VideoVAE.forward`."""
    recon, mu, logvar = model(x, generator, latent_noise)
    diff = recon - x
    err = diff * edge_map(x, edge_weight) if edge_weight > 0 else diff
    l1 = err.abs().mean()
    mse = err.pow(2).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + mse_weight * mse + kl_weight * kl
    with torch.no_grad():  # the plain terms: the loss's own when nothing weights them
        plain_l1, plain_mse = (diff.abs().mean(), diff.pow(2).mean()) if err is not diff else (l1, mse)
        metrics = {"l1": float(plain_l1), "mse": float(plain_mse), "kl": float(kl)}
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Measuring, evaluating, loading
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def measure_latent_stats(model: VideoVAE, video: torch.Tensor | list[torch.Tensor], device: torch.device | str,
                         batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the posterior means of uint8 clips (N, 3, T, H, W), or of
    several such tensors of different shapes (native sizes: every latent position counts once)."""
    s = s2 = None
    n = 0
    for group in ([video] if torch.is_tensor(video) else video):
        for i in range(0, len(group), batch_size):
            mu, _ = model.encode(to_unit(group[i:i + batch_size]).to(device))
            mu = mu.double().transpose(0, 1).flatten(1)  # (c, B*t*h*w)
            s = mu.sum(1) if s is None else s + mu.sum(1)
            s2 = mu.pow(2).sum(1) if s2 is None else s2 + mu.pow(2).sum(1)
            n += mu.shape[1]
    mean = s / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-8).sqrt()
    return mean.float().cpu(), std.float().cpu()


@torch.no_grad()
def reconstruct(model: VideoVAE, video: torch.Tensor, device: torch.device | str,
                batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """uint8 (N, 3, T, H, W) -> reconstruction in [-1, 1] from the posterior means (on CPU)."""
    out = []
    for i in range(0, len(video), batch_size):
        mu, _ = model.encode(to_unit(video[i:i + batch_size]).to(device))
        out.append(model.decode(mu).cpu())
    return torch.cat(out)


def recon_metrics(model: VideoVAE, video: torch.Tensor, device: torch.device | str) -> dict[str, float]:
    """PSNR and SSIM (on [-1, 1]) of uint8 clips against their reconstructions."""
    recon = reconstruct(model, video, device)
    ref = to_unit(video)
    return {"psnr": psnr(recon, ref), "ssim": ssim(recon, ref)}


def recon_metrics_by_shape(model: VideoVAE, groups: list[tuple[Bucket, torch.Tensor]],
                           device: torch.device | str) -> dict[str, float]:
    """`recon_metrics` over clips of several shapes ((bucket, uint8 (n, 3, T, H, W)) each): the
    mean over clips, each clip weighing the same whatever its shape; with more than one aspect
    also `psnr_<aspect>` / `ssim_<aspect>` (square, landscape, portrait), with more than one
    length `psnr_<frames>f` / `ssim_<frames>f` (e.g. psnr_9f)."""
    per: dict[str, list[tuple[int, dict[str, float]]]] = {}
    per_length: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for bucket, video in groups:
        if len(video):
            part = (len(video), recon_metrics(model, video, device))
            per.setdefault(bucket.aspect, []).append(part)
            per_length.setdefault(f"{bucket.frames}f", []).append(part)

    def mean(parts: list[tuple[int, dict[str, float]]], key: str) -> float:
        return sum(n * m[key] for n, m in parts) / sum(n for n, _ in parts)

    every = [p for parts in per.values() for p in parts]
    out = {k: mean(every, k) for k in ("psnr", "ssim")}
    for split in (per, per_length):
        if len(split) > 1:
            out.update({f"{k}_{name}": mean(parts, k) for name, parts in split.items() for k in ("psnr", "ssim")})
    return out


def load_vae(path: str | Path, device: torch.device | str) -> VideoVAE:
    obj = load_model(path, "vae")
    model = VideoVAE(VAEConfig(**obj["config"]))
    model.load_state_dict(obj["state_dict"])
    model.latent_mean.copy_(torch.as_tensor(obj["latent_mean"]))
    model.latent_std.copy_(torch.as_tensor(obj["latent_std"]))
    model.data = obj.get("data", {})  # frames, size, fps of the clips it was trained on
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------


def train_decoder(model: VideoVAE, train: list, sampler: BucketSampler, cfg: Config,
                  ckpt_dir: Path | None = None, log: LogFn | None = None, extra: dict | None = None,
                  device: torch.device | str = "cpu"):
    """The decoder phase (`vae.decoder_steps`): the encoder frozen, the decoder trained alone on
    whole clips (`train`: run_train_vae's native groups). The latents stay what the joint phase made
    them, so the DiT's data does not move; the decoder gets sharper. Logged steps continue the
    joint phase's count. Resumes from its own checkpoint in `ckpt_dir`.

    With `vae.decoder_noise` > 0 each clip's latents get Gaussian noise before decoding, its std a
    level drawn uniformly in [0, decoder_noise] times each channel's std (`model.latent_std`,
    measured before this phase): the decoder learns to draw clean objects from latents as
    imprecise as the DiT's."""
    vcfg = cfg.vae
    channel_std = model.latent_std.detach().cpu()

    def batch_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Generator]:
        b, idx = sampler.draw(vcfg.batch_size, gen)
        return to_unit(train[b][2][idx]).to(device), gen

    def loss_fn(m: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x, gen = batch
        noise = None
        if vcfg.decoder_noise > 0:
            level = vcfg.decoder_noise * torch.rand(len(x), generator=gen)
            noise = level[:, None] * channel_std[None, :]
        return vae_loss(m, x, vcfg.kl_weight, gen, vcfg.mse_weight, vcfg.decoder_edge_weight,
                        latent_noise=noise)

    spec = TrainSpec(steps=vcfg.decoder_steps, lr=vcfg.decoder_lr, warmup=vcfg.warmup,
                     grad_clip=vcfg.grad_clip, seed=cfg.seed + 1)
    phase = {**(extra or {}), "phase": "decoder", "decoder_edge_weight": vcfg.decoder_edge_weight}
    if vcfg.decoder_noise > 0:  # absent at 0: the checkpoints of runs before the setting still resume
        phase["decoder_noise"] = vcfg.decoder_noise
    shifted = (lambda step, metrics: log(vcfg.steps + step, metrics)) if log is not None else None
    model.encoder.requires_grad_(False)
    try:
        return fit(model, loss_fn, batch_fn, spec, ckpt_dir=ckpt_dir, log=shifted, desc="vae decoder",
                   fingerprint_extra=phase, samples_per_batch=vcfg.batch_size,
                   params=list(model.decoder.parameters()))
    finally:
        model.encoder.requires_grad_(True)


def run_train_vae(clips_dir: Path, model_dir: Path, cfg: Config, log: LogFn | None = None,
                  ckpt_dir: Path | None = None, device: torch.device | str = "cpu") -> dict:
    """Train the VAE on the train clips at their native sizes (each batch one shape, a shape's
    chance its share of the clips: components/buckets.py), measure latent stats over every
    shape, write `model_dir/vae.pt`."""
    from components.clips import load_clips  # the prepare stage's reader

    t0 = time.time()
    clips = load_clips(Path(clips_dir), cfg.data.size)
    train_ids, val_ids = clips.indices("train"), clips.indices("val")
    if not train_ids:
        raise ValueError(f"{clips_dir} holds no train clips: rerun prepare with more videos")
    train = clips.native(train_ids)  # [(bucket, manifest indices, uint8 (n, 3, T, H, W))]
    sampler = BucketSampler([len(ids) for _, ids, _ in train])
    vcfg = cfg.vae
    for bucket, _, _ in train:
        bucket.check(vcfg.time_down, vcfg.space_down)
    torch.manual_seed(cfg.seed)
    model = VideoVAE(vcfg).to(device)

    whole_from = vcfg.steps - round(vcfg.full_clip_fraction * vcfg.steps)

    def batch_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Generator]:
        # One shape draws no bucket: the batches of square-only training, bit for bit.
        b, idx = sampler.draw(vcfg.batch_size, gen)
        video = train[b][2][idx]
        # Per bucket (data.clip_frames): a clip no longer than the window is trained on whole.
        frames = video.shape[2]
        window = vcfg.train_frames or frames
        whole = step >= whole_from  # the last steps see whole clips
        if window < frames and not whole:  # a seeded window: its first frame is encoded alone, as a clip's is
            start = int(torch.randint(0, frames - window + 1, (1,), generator=gen))
            video = video[:, :, start:start + window]
        return to_unit(video).to(device), gen

    def loss_fn(m: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x, gen = batch
        return vae_loss(m, x, vcfg.kl_weight, gen, vcfg.mse_weight, vcfg.edge_weight)

    spec = TrainSpec(steps=vcfg.steps, lr=vcfg.lr, warmup=vcfg.warmup, grad_clip=vcfg.grad_clip,
                     seed=cfg.seed)
    # The decoder phase's settings are left out, so changing them keeps the joint checkpoint.
    joint_cfg = {k: v for k, v in dataclasses.asdict(vcfg).items() if not k.startswith("decoder_")}
    # The clips too (other clips of the same count must not resume); the decoder phase inherits it.
    extra = {"vae": joint_cfg, "n_train": len(train_ids), "data": data_digest([v for _, _, v in train])}
    if len(train) > 1:
        extra["buckets"] = [str(b) for b, _, _ in train]
    res = fit(model, loss_fn, batch_fn, spec, ckpt_dir=ckpt_dir, log=log, desc="vae",
              fingerprint_extra=extra, samples_per_batch=vcfg.batch_size)
    train_seconds = res.seconds
    final_loss = res.final_loss

    # The encoder is final now (the decoder phase leaves it frozen): its latents' statistics too.
    g = torch.Generator().manual_seed(cfg.seed)
    stats_idx = torch.randperm(len(train_ids), generator=g)[:STATS_CLIPS].tolist()
    stats = clips.native([train_ids[k] for k in stats_idx])
    mean, std = measure_latent_stats(model, [video for _, _, video in stats], device)
    model.latent_mean.copy_(mean)
    model.latent_std.copy_(std)
    if vcfg.decoder_steps > 0:
        dec = train_decoder(model, train, sampler, cfg, ckpt_dir=ckpt_dir, log=log, extra=extra, device=device)
        train_seconds += dec.seconds
        final_loss = dec.final_loss
    evaluated = clips.native(val_ids) if val_ids else clips.native([train_ids[k] for k in stats_idx[:EVAL_BATCH * 4]])
    metrics = recon_metrics_by_shape(model, [(b, video) for b, _, video in evaluated], device)

    data = {"frames": cfg.data.frames, "size": cfg.data.size, "fps": cfg.data.fps,
            "buckets": sorted(str(b) for b, _, _ in train)}  # the native shapes it trained on
    save_model(Path(model_dir) / "vae.pt", "vae", dataclasses.asdict(vcfg), model.state_dict(),
               latent_mean=mean.tolist(), latent_std=std.tolist(), data=data)
    return {
        "val_psnr": metrics.pop("psnr"),
        "val_ssim": metrics.pop("ssim"),
        **{f"val_{k}": v for k, v in metrics.items()},  # per aspect, with more than one
        "val_clips": sum(len(ids) for _, ids, _ in evaluated),
        "buckets": len(train),
        "final_loss": final_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "seconds": time.time() - t0,
        "latent_mean": mean.tolist(),
        "latent_std": std.tolist(),
    }
