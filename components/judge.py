"""The judge: an attribute classifier that grades generated videos (one head per attribute).

Trained on real clips (and, in the evaluation stage, VAE reconstructions of them), it reads the
colour, shape and motion (`world.GRADED`), and size, speed and background where labelled, off a
video. Its pooled features also serve a Fréchet distance between real and generated clips.
Training blurs and noises clips at random so that softer, generated-looking videos are graded
like the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components import world
from components.captioner import VideoEncoder, to_float
from components.checkpoint import load_model, save_model
from components.config import EvalConfig
from components.trainer import LogFn, TrainSpec, data_digest, fit

NOISE_MAX = 0.06  # largest additive noise std, on the [-1, 1] scale


# Heads that read what a single frame shows; motion and speed read the spacetime features.
# Keeping them apart stops the shape head from guessing the shape from colour and motion
# (held-out triples make those correlated in training) instead of learning to see it.
APPEARANCE = ("color", "shape", "size", "background")


class Judge(nn.Module):
    def __init__(self, width: int, frames: int, size: int, attributes: list[str]):
        super().__init__()
        self.config = dict(width=width, frames=frames, size=size, attributes=list(attributes))
        self.attributes = list(attributes)
        self.encoder = VideoEncoder(width, frames, size)
        self.appearance = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.motion = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())
        self.heads = nn.ModuleDict({a: nn.Linear(width, len(world.ATTRIBUTES[a])) for a in attributes})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, T, H, W) in [-1, 1] -> features (B, 2w): appearance, then motion.

        Max-pooling over space and time: "is this pattern anywhere in the clip" is what shape,
        colour and motion detectors need.
        """
        frames = self.encoder.frame_features(x)  # (B, w, t, h, w')
        grid = self.encoder.spacetime(frames).flatten(2)  # (B, w, N)
        appearance = self.appearance(frames.amax((2, 3, 4)))
        motion = self.motion(torch.cat([grid.mean(-1), grid.amax(-1)], -1))
        return torch.cat([appearance, motion], -1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        appearance, motion = self.embed(x).chunk(2, dim=-1)
        return {a: head(appearance if a in APPEARANCE else motion) for a, head in self.heads.items()}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def _batched(self, videos: torch.Tensor, fn, batch_size: int = 256) -> list:
        self._check(videos)
        was_training = self.training
        self.eval()
        out = [fn(to_float(videos[i : i + batch_size].to(self.device))) for i in range(0, len(videos), batch_size)]
        self.train(was_training)
        return out

    def _check(self, videos: torch.Tensor) -> None:
        want = (3, self.config["frames"], self.config["size"], self.config["size"])
        if videos.dtype != torch.uint8 or videos.ndim != 5 or tuple(videos.shape[1:]) != want:
            raise ValueError(f"the judge grades uint8 (B, {', '.join(map(str, want))}) videos, got "
                             f"{videos.dtype} {tuple(videos.shape)}: convert with "
                             f"((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")

    def predict(self, videos: torch.Tensor) -> dict[str, list[str]]:
        """uint8 (B, 3, T, H, W) -> attribute name -> predicted value per video."""
        parts = self._batched(videos, lambda x: {a: l.argmax(-1).cpu() for a, l in self(x).items()})
        return {a: [world.ATTRIBUTES[a][i] for p in parts for i in p[a].tolist()] for a in self.attributes}

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, T, H, W) -> (B, D) float features, for Fréchet distances."""
        return torch.cat(self._batched(videos, lambda x: self.embed(x).cpu()))

    def accuracy(self, videos: torch.Tensor, labels: dict[str, list[str]]) -> dict[str, float]:
        """Share of videos graded right, per attribute in both `labels` and the judge
        (speed: moving clips only, when motion is labelled)."""
        pred = self.predict(videos)
        out = {}
        for a in self.attributes:
            if a not in labels:
                continue
            keep = [i for i in range(len(videos))
                    if a != "speed" or "motion" not in labels or labels["motion"][i] != "still"]
            out[a] = sum(pred[a][i] == labels[a][i] for i in keep) / max(1, len(keep))
        return out

    def save(self, path: Path) -> None:
        save_model(path, "judge", self.config, self.state_dict())

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> "Judge":
        obj = load_model(path, "judge")
        judge = cls(**obj["config"])
        judge.load_state_dict(obj["state_dict"])
        return judge.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random per-clip blur (blend towards a 3x3 box blur) and Gaussian noise; (B, 3, T, H, W)."""
    b = x.shape[0]
    amount = torch.rand(b, 1, 1, 1, 1, generator=gen).to(x.device)
    blurred = F.avg_pool3d(x, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    x = x + amount * (blurred - x)
    sigma = torch.rand(b, 1, 1, 1, 1, generator=gen).to(x.device) * NOISE_MAX
    return x + sigma * torch.randn(x.shape, generator=gen).to(x.device)


def encode_labels(labels: dict[str, list[str]], n: int) -> dict[str, torch.Tensor]:
    """Attribute words -> class indices; -100 (ignored) for speed on still clips."""
    missing = [a for a in world.GRADED if a not in labels]
    if missing:
        raise ValueError(f"judge labels lack {', '.join(missing)}: pass every graded attribute "
                         f"({', '.join(world.GRADED)})")
    out = {}
    for a, values in labels.items():
        if a not in world.ATTRIBUTES:
            raise ValueError(f"unknown attribute {a!r}: use {', '.join(world.ATTRIBUTES)}")
        if len(values) != n:
            raise ValueError(f"{len(values)} {a} labels for {n} videos: pass one label per video")
        vocab = world.ATTRIBUTES[a]
        bad = sorted({v for v in values if v not in vocab})
        if bad:
            raise ValueError(f"unknown {a} value(s) {bad}: use {', '.join(vocab)}")
        idx = [vocab.index(v) for v in values]
        if a == "speed" and "motion" in labels:
            idx = [-100 if m == "still" else i for i, m in zip(idx, labels["motion"])]
        out[a] = torch.tensor(idx)
    return out


def judge_loss(model: Judge, batch: tuple[torch.Tensor, dict]) -> tuple[torch.Tensor, dict]:
    x, targets = batch
    logits = model(x)
    losses = {a: F.cross_entropy(logits[a], targets[a], ignore_index=-100) for a in model.attributes}
    metrics = {f"loss_{a}": float(v.detach()) for a, v in losses.items()}
    return sum(losses.values()), metrics


def train_judge(
    videos: torch.Tensor,
    labels: dict[str, list[str]],
    cfg: EvalConfig,
    seed: int,
    log: LogFn | None = None,
    ckpt_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> Judge:
    """Train on uint8 clips (N, 3, T, H, W) labelled per attribute; returns the judge in eval mode."""
    if videos.dtype != torch.uint8 or videos.ndim != 5:
        raise ValueError(f"train_judge wants uint8 (N, 3, T, H, W) videos, got {videos.dtype} "
                         f"{tuple(videos.shape)}")
    targets = encode_labels(labels, len(videos))
    torch.manual_seed(seed)
    _, _, frames, size, _ = videos.shape
    model = Judge(cfg.judge_width, frames, size, list(targets)).to(device)

    def batch_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        idx = torch.randint(len(videos), (cfg.judge_batch_size,), generator=gen)
        x = augment(to_float(videos[idx]).to(device), gen)
        return x, {a: t[idx].to(device) for a, t in targets.items()}

    spec = TrainSpec(steps=cfg.judge_steps, lr=cfg.judge_lr, warmup=min(50, cfg.judge_steps // 10),
                     weight_decay=0.01, grad_clip=1.0, seed=seed)
    fit(model, judge_loss, batch_fn, spec, ckpt_dir=ckpt_dir, desc="judge", log=log,
        # The clips too: a judge for one VAE's reconstructions must not resume for another's.
        fingerprint_extra={"model": model.config, "n": len(videos), "data": data_digest(videos, labels)},
        samples_per_batch=cfg.judge_batch_size)
    return model.eval()
