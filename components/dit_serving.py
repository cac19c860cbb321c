"""The DiT in its serving form: what depends only on the prompt and the schedule, computed once.

A sampling loop evaluates the same network 25-50 times with the same caption and a timestep it
knows in advance, yet `DiT.forward` recomputes per call everything that depends only on them:
the caption projection, every block's cross-attention keys and values, the masked-mean caption
vector, the timestep embedding and every adaLN modulation, and the RoPE tables. Split in two:

- `DiTCondition`: once per generation, (x, ts, ctx, ctx_mask) -> every step's adaLN modulation
  `mod` (S, N, 1, M), the cross-attention keys / values of every block (RMS-normed), the
  additive caption mask and the RoPE tables for x's latent grid;
- `DiTStep`: once per step, (x, mod[i], the rest) -> v, the same velocity as `DiT.forward`.

Same weights, same arithmetic as `components/dit.py` (up to float rounding), written in the
forms ONNX Runtime runs in fewer kernels: RMS norm as x / sqrt(mean(x^2) + eps) * w (which ORT
fuses into one SimplifiedLayerNormalization), RoPE's rotate-half as one matmul with a constant
signed permutation, `1 + scale` folded into the modulation. `components/export.py` exports both;
`components/onnx_runtime.py` runs them. Training and the PyTorch pipeline use `DiT` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.dit import DiT, rope_cos_sin, timestep_features


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`dit.rms_norm` in the Div form that ORT's SimplifiedLayerNormFusion recognises."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R (hs, hs) with x @ R == cat([-x2, x1]) (dit.apply_rope's rotate-half) for x = [x1, x2]."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    idx = torch.arange(half)
    r[idx + half, idx] = -1.0  # output i < half takes -x2[i]
    r[idx, idx + half] = 1.0  # output half + i takes x1[i]
    return r


# ----------------------------------------------------------------------------------------------
# Once per generation
# ----------------------------------------------------------------------------------------------


class DiTCondition(nn.Module):
    """(x, ts, ctx, ctx_mask) -> mod, cross_k, cross_v, ctx_bias, rope_cos, rope_sin.

    x (N, c, t, h, w): only its shape is read (the RoPE grid); ts (S,): the sampler's times;
    ctx (N, L, 384), ctx_mask bool (N, L): one row per DiT row (conditional, then unconditional).
    mod (S, N, 1, M), M = (6 * depth + 2) * D: per block shift1, 1 + scale1, gate1, shift2,
    1 + scale2, gate2, then the final layer's shift, 1 + scale; cross_k (depth, N, nh, hs, L)
    and cross_v (depth, N, nh, L, hs); ctx_bias (N, 1, 1, L); rope_cos / rope_sin (tokens, 1, hs).
    """

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, ts: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor):
        d = self.dit
        N, L, _ = ctx.shape
        pt, ph, pw = d.patch
        heads = d.spec.heads
        hs = d.spec.dim // heads

        maskf = ctx_mask.to(ctx.dtype).unsqueeze(-1)  # (N, L, 1)
        pooled = (ctx * maskf).sum(1) / maskf.sum(1).clamp_min(1.0)  # (N, 384)
        cond = d.t_embed(timestep_features(ts)).unsqueeze(1) + d.pool_embed(pooled).unsqueeze(0)  # (S, N, D)
        act = F.silu(cond)
        mods = []
        for block in d.blocks:
            sh1, sc1, g1, sh2, sc2, g2 = block.ada(act).chunk(6, dim=-1)  # each (S, N, D)
            mods += [sh1, 1 + sc1, g1, sh2, 1 + sc2, g2]
        shift, scale = d.final.ada(act).chunk(2, dim=-1)
        mods += [shift, 1 + scale]
        mod = torch.cat(mods, dim=-1).unsqueeze(2)  # (S, N, 1, M)

        ctx_tokens = d.ctx_embed(ctx)  # (N, L, D)
        ks, vs = [], []
        for block in d.blocks:
            k, v = block.cross.kv(ctx_tokens).chunk(2, dim=-1)  # (N, L, D)
            k = rms_norm(k.reshape(N, L, heads, hs), block.cross.k_norm)
            ks.append(k.permute(0, 2, 3, 1))  # (N, nh, hs, L): transposed for q @ k
            vs.append(v.reshape(N, L, heads, hs).transpose(1, 2))
        ctx_bias = (1.0 - maskf.transpose(1, 2)).unsqueeze(1) * -1e4  # (N, 1, 1, L), as DiT.forward

        _, _, T, H, W = x.shape
        cos, sin = rope_cos_sin(T // pt, H // ph, W // pw, hs, x.device)  # (tokens, hs)
        return mod, torch.stack(ks), torch.stack(vs), ctx_bias, cos.unsqueeze(1), sin.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Once per step
# ----------------------------------------------------------------------------------------------


class DiTStep(nn.Module):
    """(x, mod, cross_k, cross_v, ctx_bias, rope_cos, rope_sin) -> v (N, c, t, h, w).

    `mod` is one step's row of `DiTCondition`'s (N, 1, M); the rest as it returns them.
    Attention is written out (matmul, softmax, matmul) with the 1/sqrt(hs) scale folded into
    the query norm's weight: exported SDPA adds a scale multiply and reshapes around K's
    transpose, ten kernels per attention that ORT does not fuse on CPU.
    """

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit
        hs = dit.spec.dim // dit.spec.heads
        self.register_buffer("rot", rotate_half_matrix(hs), persistent=False)
        scale = hs ** -0.5
        # q and k of a block share one norm and one RoPE: heads [0, nh) are q, [nh, 2nh) are k.
        for i, b in enumerate(dit.blocks):
            q_w, k_w = b.attn.q_norm.detach() * scale, b.attn.k_norm.detach()  # (hs,), shared by heads
            weight = torch.stack([q_w] * dit.spec.heads + [k_w] * dit.spec.heads)  # (2nh, hs)
            self.register_buffer(f"qk_weight{i}", weight, persistent=False)
        # Normed with unit weight first: ORT fuses only a norm whose weight spans the last axis.
        self.register_buffer("unit", torch.ones(hs), persistent=False)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                ctx_bias: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        d = self.dit
        B, c, T, H, W = x.shape
        pt, ph, pw = d.patch
        gt, gh, gw = T // pt, H // ph, W // pw
        D, heads = d.spec.dim, d.spec.heads
        hs = D // heads
        scale = hs ** -0.5
        pieces = mod.split(D, dim=-1)  # each (N, 1, D)
        tokens = d.x_embed(x).flatten(2).transpose(1, 2)  # (N, n, D)
        n = tokens.shape[1]
        for i, block in enumerate(d.blocks):
            sh1, sc1, g1, sh2, sc2, g2 = pieces[6 * i: 6 * i + 6]
            # self-attention: q and k normed and rotated together in (N, n, 2nh, hs)
            h = block.norm1(tokens) * sc1 + sh1
            qk, v = block.attn.qkv(h).reshape(B, n, 3 * heads, hs).split([2 * heads, heads], dim=2)
            qk = rms_norm(qk, self.unit) * getattr(self, f"qk_weight{i}")
            qk = qk * rope_cos + (qk @ self.rot) * rope_sin
            q, k = qk.split(heads, dim=2)  # (N, n, nh, hs)
            att = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1), dim=-1)  # (N, nh, n, n)
            y = att @ v.transpose(1, 2)  # (N, nh, n, hs)
            tokens = tokens + g1 * block.attn.proj(y.transpose(1, 2).reshape(B, n, D))
            # cross-attention to the precomputed caption keys (N, nh, hs, L) and values
            q = rms_norm(block.cross.q(block.norm2(tokens)).reshape(B, n, heads, hs), block.cross.q_norm.detach() * scale)
            att = torch.softmax(q.transpose(1, 2) @ cross_k[i] + ctx_bias, dim=-1)  # (N, nh, n, L)
            y = att @ cross_v[i]
            tokens = tokens + block.cross.proj(y.transpose(1, 2).reshape(B, n, D))
            tokens = tokens + g2 * block.mlp(block.norm3(tokens) * sc2 + sh2)
        shift, scale_f = pieces[-2], pieces[-1]
        out = d.final.linear(d.final.norm(tokens) * scale_f + shift)  # (N, n, c*pt*ph*pw)
        out = out.reshape(B, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(B, c, T, H, W)
