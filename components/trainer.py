"""One training loop for every model (captioner, judge, VAE, DiT), after minGPT's trainer.

The loop knows nothing of the model: it calls `loss_fn(model, batch) -> (loss, metrics)` on the
batches that `batch_fn(step, generator)` draws, and reports through `log(step, metrics)`.

Determinism and resume: every step draws its randomness from a generator seeded by
(seed, step), so a run killed at any moment and resumed from its last checkpoint reaches the same
weights as a run never interrupted (on CPU). Checkpoints are written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from components.checkpoint import atomic_torch_save

Batch = Any
LogFn = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    warmup: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    ema: float = 0.0  # 0 disables EMA
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0

    def fingerprint(self, extra: dict | None = None) -> str:
        blob = json.dumps({"spec": asdict(self), "extra": extra or {}}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class FitResult:
    model: nn.Module
    ema: nn.Module | None
    steps: int
    final_loss: float
    resumed_from: int
    seconds: float


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr`."""
    if spec.warmup > 0 and step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    span = max(1, spec.steps - spec.warmup)
    progress = min(1.0, (step - spec.warmup) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.lr * (spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class _Progress:
    """A tqdm bar on a terminal; a line every few seconds otherwise (logs stay readable)."""

    def __init__(self, total: int, initial: int, desc: str):
        self.bar = None
        self.desc = desc
        self.total = total
        self.last = 0.0
        try:
            from tqdm.auto import tqdm

            if sys.stderr.isatty():
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm ships with the project's dependencies
            pass

    def update(self, step: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            return
        now = time.time()
        if now - self.last > 10 or step == self.total:
            self.last = now
            fields = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
            print(f"[{self.desc}] step {step}/{self.total} {fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]],
    batch_fn: Callable[[int, torch.Generator], Batch],
    spec: TrainSpec,
    *,
    ckpt_dir: str | Path | None = None,
    fingerprint_extra: dict | None = None,
    log: LogFn | None = None,
    desc: str = "train",
    samples_per_batch: int | None = None,
    params: list[nn.Parameter] | None = None,
) -> FitResult:
    """Train `model` for `spec.steps` optimizer steps, resuming from `ckpt_dir` when it matches.

    `fingerprint_extra` (e.g. the model config) is hashed with the spec: a checkpoint written
    under another configuration is ignored rather than silently resumed.
    """
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.99))
    ema = copy.deepcopy(model).requires_grad_(False) if spec.ema > 0 else None
    start = 0
    ckpt_path = None
    if ckpt_dir is not None:
        ckpt_path = Path(ckpt_dir) / f"state-{spec.fingerprint(fingerprint_extra)}.pt"
        if ckpt_path.exists():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            start = int(state["step"])
            print(f"[{desc}] resuming from step {start} ({ckpt_path})", file=sys.stderr, flush=True)

    def save(step: int) -> None:
        if ckpt_path is None:
            return
        atomic_torch_save(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
            },
            ckpt_path,
        )

    model.train()
    progress = _Progress(spec.steps, start, desc)
    t0 = time.time()
    t_window, n_window = time.time(), 0
    loss_value = float("nan")
    try:
        for step in range(start, spec.steps):
            lr = lr_at(step, spec)
            for group in opt.param_groups:
                group["lr"] = lr
            gen = step_generator(spec.seed, step)
            batch = batch_fn(step, gen)
            loss, metrics = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"[{desc}] loss became {loss.item()} at step {step}: lower the learning rate "
                    f"(now {spec.lr}) or enable gradient clipping"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip > 0:
                metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(params, spec.grad_clip))
            opt.step()
            if ema is not None:
                ema_update(ema, model, spec.ema)
            loss_value = float(loss.detach())
            n_window += 1
            done = step + 1
            if done % spec.log_every == 0 or done == spec.steps:
                elapsed = max(1e-9, time.time() - t_window)
                metrics = {"loss": loss_value, "lr": lr, **metrics, "steps_per_s": n_window / elapsed}
                if samples_per_batch:
                    metrics["samples_per_s"] = samples_per_batch * n_window / elapsed
                if log is not None:
                    log(done, metrics)
                t_window, n_window = time.time(), 0
            progress.update(done, {"loss": loss_value, "lr": lr})
            if spec.ckpt_every > 0 and done % spec.ckpt_every == 0 and done < spec.steps:
                save(done)
    finally:
        progress.close()
    save(spec.steps)
    model.eval()
    if ema is not None:
        ema.eval()
    return FitResult(model, ema, spec.steps, loss_value, start, time.time() - t0)
