"""Diffusion Transformer over spacetime patches of video latents (Peebles & Xie 2023; Sora).

Latents `(B, c, t, h, w)` are cut into `patch_t x patch_h x patch_w` patches, one token each
(`(B, N, D)`). Every block: adaLN-Zero-modulated self-attention with real-valued 3D RoPE and
QK RMS-norm, cross-attention to the MiniLM caption tokens (PixArt-alpha, Chen et al. 2023) under
their padding mask, and an adaLN-Zero MLP. The network predicts the rectified-flow velocity
`v = noise - x_0`; the objective and the sampler live in `components/rectified_flow.py`.

Export-safe by construction: positions come from the input's shape at run time, RoPE is cos/sin
arithmetic (no complex numbers), attention is `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.checkpoint import load_model
from components.config import DiTConfig
from components.text_encoder import TEXT_DIM

ROPE_THETA = 100.0  # latent grids are at most a few dozen positions per axis, not 10k tokens
FREQ_DIM = 256  # sinusoidal timestep features (DiT's TimestepEmbedder)


@dataclass(frozen=True)
class DiTArch:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


# Calibration: a 1.65M cross-attention DiT at ~4 steps/s learned colour, shape and direction in
# 8 minutes; optimizer steps beat parameters at this scale. `tiny` is that size (1.64M): on a
# CPU per-op overhead dominates, so dim 96 ran no faster than 128.
DIT_PRESETS: dict[str, DiTArch] = {
    "tiny": DiTArch(dim=128, depth=4, heads=4),
    "small": DiTArch(dim=192, depth=6, heads=6),
    "base": DiTArch(dim=384, depth=12, heads=6),
}


@dataclass(frozen=True)
class DiTSpec:
    """Everything that builds the network: its arch and the latent / patch geometry."""

    in_channels: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    patch_t: int
    patch_h: int
    patch_w: int
    text_dim: int = TEXT_DIM

    @classmethod
    def from_config(cls, cfg: DiTConfig, latent_channels: int) -> "DiTSpec":
        if cfg.preset not in DIT_PRESETS:
            raise ValueError(f"dit.preset={cfg.preset!r} is unknown: use one of {', '.join(DIT_PRESETS)}")
        arch = DIT_PRESETS[cfg.preset]
        return cls(latent_channels, arch.dim, arch.depth, arch.heads, arch.mlp_ratio,
                   cfg.patch_t, cfg.patch_h, cfg.patch_w)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) * (1 + scale) + shift, shift and scale (B, 1, D): one fused kernel."""
    return torch.addcmul(shift, x, 1 + scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm over the last axis with `F.rms_norm` (forward and backward about 1.4x the
    written-out form's on a 2-core CPU); the ONNX exporter writes it out as elementwise nodes at
    opset 18, which has no RMSNormalization op."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs given to the (t, h, w) axes: as equal as possible, time gets the remainder."""
    pairs = head_dim // 2
    hw = pairs // 3
    return pairs - 2 * hw, hw, hw


def rope_cos_sin(t: int, h: int, w: int, head_dim: int, device: torch.device,
                 theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, head_dim) for the t x h x w token grid, in the rotate-half layout.

    Each axis rotates its own block of pairs by position * frequency, so a query-key score
    depends only on the difference of their (t, h, w) positions (Su et al. 2021, RoFormer).
    """
    angles = []
    grids = torch.meshgrid(
        torch.arange(t, device=device, dtype=torch.float32),
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    for pos, n in zip(grids, rope_split(head_dim)):
        if n == 0:
            continue
        freqs = theta ** (-torch.arange(n, device=device, dtype=torch.float32) / n)  # (n,)
        angles.append(pos.reshape(-1, 1) * freqs)  # (N, n)
    ang = torch.cat(angles, dim=-1)  # (N, head_dim / 2)
    ang = torch.cat([ang, ang], dim=-1)  # (N, head_dim)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, N, hs); cos/sin (N, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) in [0, 1] -> sinusoidal features (B, dim), on t * 1000 as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with QK RMS-norm; self-attention with RoPE or cross-attention."""

    def __init__(self, dim: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim))
        self.k_norm = nn.Parameter(torch.ones(self.head_dim))
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hs)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ctx: torch.Tensor | None = None, ctx_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        if self.cross:
            q = self._heads(self.q(x))
            k, v = (self._heads(z) for z in self.kv(ctx).chunk(2, dim=-1))  # (B, nh, L, hs)
        else:
            q, k, v = (self._heads(z) for z in self.qkv(x).chunk(3, dim=-1))  # (B, nh, N, hs)
        q, k = rms_norm(q, self.q_norm), rms_norm(k, self.k_norm)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_bias)  # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = Attention(dim, heads, cross=True)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)  # adaLN-Zero: zero-initialised in DiT.init_weights

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope, ctx: torch.Tensor,
                ctx_bias: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)  # each (B, 1, D)
        x = torch.addcmul(x, g1, self.attn(modulate(self.norm1(x), sh1, sc1), rope=rope))
        x = x + self.cross(self.norm2(x), ctx=ctx, ctx_bias=ctx_bias)
        x = torch.addcmul(x, g2, self.mlp(modulate(self.norm3(x), sh2, sc2)))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)  # each (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class DiT(nn.Module):
    def __init__(self, spec: DiTSpec):
        super().__init__()
        if spec.dim % spec.heads or (spec.dim // spec.heads) % 2:
            raise ValueError(f"dim={spec.dim} must split into {spec.heads} heads of even size")
        self.spec = spec
        D = spec.dim
        patch = (spec.patch_t, spec.patch_h, spec.patch_w)
        self.patch = patch
        self.x_embed = nn.Conv3d(spec.in_channels, D, kernel_size=patch, stride=patch)
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, D), nn.SiLU(), nn.Linear(D, D))
        self.ctx_embed = nn.Sequential(nn.LayerNorm(spec.text_dim), nn.Linear(spec.text_dim, D))
        self.pool_embed = nn.Linear(spec.text_dim, D)  # masked-mean caption -> conditioning vector
        self.blocks = nn.ModuleList(Block(D, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.final = FinalLayer(D, spec.in_channels * math.prod(patch))
        self.init_weights()

    def init_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        nn.init.zeros_(self.pool_embed.weight)
        # adaLN-Zero: every block starts as the identity and the output as zero (DiT §3.2).
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        nn.init.zeros_(self.final.ada.weight)
        nn.init.zeros_(self.final.ada.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def num_tokens(self, t: int, h: int, w: int) -> int:
        """Tokens for a latent of t x h x w (the sampler's timestep shift depends on it)."""
        pt, ph, pw = self.patch
        return (t // pt) * (h // ph) * (w // pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                ctx_mask: torch.Tensor) -> torch.Tensor:
        """x (B, c, t, h, w), t (B,) in [0, 1], ctx (B, L, 384), ctx_mask bool (B, L) -> v like x."""
        B, c, T, H, W = x.shape
        pt, ph, pw = self.patch
        gt, gh, gw = T // pt, H // ph, W // pw
        # contiguous: else every residual add and LayerNorm of the stream inherits the transposed layout
        tokens = self.x_embed(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D), N = gt*gh*gw
        rope = rope_cos_sin(gt, gh, gw, self.spec.dim // self.spec.heads, x.device)

        maskf = ctx_mask.to(ctx.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (ctx * maskf).sum(1) / maskf.sum(1).clamp_min(1.0)  # (B, 384)
        cond = self.t_embed(timestep_features(t)) + self.pool_embed(pooled)  # (B, D)
        ctx_tokens = self.ctx_embed(ctx)  # (B, L, D)
        # Additive mask, finite so an all-padding row gives uniform weights rather than NaN.
        ctx_bias = (1.0 - maskf.transpose(1, 2)).unsqueeze(1) * -1e4  # (B, 1, 1, L)

        for block in self.blocks:
            tokens = block(tokens, cond, rope, ctx_tokens, ctx_bias)
        out = self.final(tokens, cond)  # (B, N, c*pt*ph*pw)
        out = out.reshape(B, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(B, c, T, H, W)


def build_dit(cfg: DiTConfig, latent_channels: int) -> DiT:
    return DiT(DiTSpec.from_config(cfg, latent_channels))


def load_dit(path: str | Path, device: torch.device | str) -> DiT:
    """The EMA weights written by the train_dit stage."""
    obj = load_model(path, "dit")
    model = DiT(DiTSpec(**obj["config"]["spec"]))
    model.load_state_dict(obj["state_dict"])
    model.train_config = obj["config"].get("dit", {})
    return model.to(device).eval()


def dit_config_dict(spec: DiTSpec, cfg: DiTConfig) -> dict:
    """The checkpoint's `config`: what builds the network plus the settings that trained it."""
    return {"spec": dataclasses.asdict(spec), "dit": dataclasses.asdict(cfg)}
