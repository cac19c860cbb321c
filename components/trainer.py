"""One training loop for every model (captioner, judge, VAE, DiT), after minGPT's trainer.

The loop knows nothing of the model: it calls `loss_fn(model, batch) -> (loss, metrics)` on the
batches that `batch_fn(step, generator)` draws, and reports through `log(step, metrics)`.

Determinism and resume: every step draws its randomness from a generator seeded by
(seed, step), so a run killed at any moment and resumed from its last checkpoint reaches the same
weights as a run never interrupted (on CPU). Checkpoints are written atomically.

Scale: bf16 autocast when the model is on a GPU (never on a CPU, where bf16 matmuls are slow and
change the numbers), optional `torch.compile`, and DistributedDataParallel when launched by
`torchrun` (`components/distributed.py`): every rank draws the same global batch from the same
generator and keeps its own rows, DDP averages the gradients, and only rank 0 writes checkpoints
and reports. Throughput is reported as steps, samples and tokens per second and as achieved
FLOP/s, from the FLOPs of one training step counted on the real model (`components/flops.py`).
"""

from __future__ import annotations

import contextlib
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

from components import distributed
from components.checkpoint import atomic_torch_save
from components.flops import train_step_flops

Batch = Any
LogFn = Callable[[int, dict[str, float]], None]
EXECUTION_FIELDS = ("bf16", "compile")


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
    bf16: bool = True  # autocast to bfloat16 when the model is on CUDA; ignored on CPU
    compile: bool = False  # torch.compile the model for the training steps

    def fingerprint(self, extra: dict | None = None) -> str:
        # How the steps execute is not what they train: a checkpoint resumes across these.
        spec = {k: v for k, v in asdict(self).items() if k not in EXECUTION_FIELDS}
        blob = json.dumps({"spec": spec, "extra": extra or {}}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class FitResult:
    model: nn.Module
    ema: nn.Module | None
    steps: int
    final_loss: float
    resumed_from: int
    seconds: float
    flops_per_step: int | None = None  # forward + backward of the global batch, counted


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


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed a rank's step generator is moved to once the global batch is drawn, so the
    randomness the loss draws (noise, timesteps, dropout) differs between ranks."""
    return (seed * 1_000_003 + step) * 1_009 + 1 + rank


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on this process's CPU threads (x86 FTZ/DAZ), as GPUs do.

    As a model trains, some activations and gradients fall below 1.2e-38, and every operation on
    such a number takes the CPU's slow path: the judge's training ran at 250 samples/s at its
    start and 90 at its end on the 2-core machine, and finished in 92 s against 124 s with them
    flushed (BENCHMARKS.md). The weights change only where a value was already smaller than any
    that matters. Process-wide and idempotent; False where the CPU cannot (then nothing changes).
    """
    return torch.set_flush_denormal(True)


def data_digest(*parts: Any) -> str:
    """A short hash of what a run trains on, for `fit`'s `fingerprint_extra`.

    Parts are tensors (their bytes), strings, lists of strings or of tensors, and dicts of those
    (keys sorted). Without it a checkpoint resumes whenever the settings and the clip count
    match: a judge written for one VAE's reconstructions came back, finished, for another VAE's.
    """
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # its buffer, no copy
        elif isinstance(x, str):
            h.update(x.encode())
        elif isinstance(x, dict):
            for key in sorted(x):
                h.update(f"\x00{key}\x00".encode())
                feed(x[key])
        elif isinstance(x, (list, tuple)) and all(isinstance(v, str) for v in x):
            h.update("\n".join(x).encode())
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            raise TypeError(f"data_digest hashes tensors, strings, lists and dicts, not {type(x).__name__}")

    for part in parts:
        feed(part)
    return h.hexdigest()[:16]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # One multi-tensor kernel, not a Python loop of ~100 small ones: on a CPU the loop cost the
    # DiT step more than its attention did.
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def make_optimizer(params: list[nn.Parameter], spec: "TrainSpec") -> torch.optim.AdamW:
    """AdamW, fused (one kernel for every tensor) where PyTorch has it for these parameters.

    PyTorch picks the multi-tensor path by itself only on CUDA; on a CPU it steps each tensor in
    a Python loop (six small ops per tensor), which on the tiny DiT took longer than its matmuls.
    The fused kernel computes the same update (bit-for-bit results across runs stay
    deterministic; the resume and DDP tests hold with it)."""
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                for p in params)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.99),
                             fused=fused or None)


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
    tokens_per_batch: int | None = None,
    count_flops: bool = True,
) -> FitResult:
    """Train `model` for `spec.steps` optimizer steps, resuming from `ckpt_dir` when it matches.

    `fingerprint_extra` (e.g. the model config) is hashed with the spec: a checkpoint written
    under another configuration is ignored rather than silently resumed.

    `samples_per_batch` is the global batch size that `batch_fn` draws (and `tokens_per_batch`
    the tokens in it, for tokens/s). Under torchrun each rank keeps its `1 / world` of every
    tensor whose first dimension is that size, so it is required there. `count_flops` counts
    one step's FLOPs before training (on a batch of its own; the run is unchanged by it).
    """
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    flush_denormals()
    if world > 1 and not samples_per_batch:
        raise ValueError(f"[{desc}] fit under torchrun ({world} processes) needs samples_per_batch, the global "
                         "batch size batch_fn draws, to give each process its share")
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, spec)
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
            if main:
                print(f"[{desc}] resuming from step {start} ({ckpt_path})", file=sys.stderr, flush=True)

    distributed.agree(start, "the step to resume from")

    def save(step: int) -> None:
        if ckpt_path is None or not main:
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

    def draw(step: int) -> Batch:
        gen = step_generator(spec.seed, step)
        batch = batch_fn(step, gen)
        if world > 1:
            batch = distributed.shard_batch(batch, samples_per_batch, rank, world)
            gen.manual_seed(rank_seed(spec.seed, step, rank))
        return batch

    first = next(model.parameters(), None)
    on_cuda = first is not None and first.device.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and spec.bf16
                else contextlib.nullcontext())

    def forward(m: nn.Module, batch: Batch):
        with autocast:
            return loss_fn(m, batch)

    model.train()
    flops_per_step = None
    if count_flops and start < spec.steps:
        flops_per_step = train_step_flops(model, forward, draw(start)) * world

    step_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's weights now and averages gradients in backward().
        step_model = DistributedDataParallel(model, device_ids=[first.device.index] if on_cuda else None)
    if spec.compile:
        step_model = torch.compile(step_model)

    progress = _Progress(spec.steps, start, desc) if main else None
    t0 = time.time()
    t_window, n_window = time.time(), 0
    loss_value = float("nan")
    read_every_step = not on_cuda  # on a CPU the loss is ready when the step returns: free to read
    nonfinite = torch.zeros((), dtype=torch.bool, device=first.device) if on_cuda else False
    rate: dict[str, float] = {}  # the last window's throughput, shown live beside the loss
    try:
        for step in range(start, spec.steps):
            lr = lr_at(step, spec)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = draw(step)
            loss, metrics = forward(step_model, batch)
            global_loss = distributed.mean_scalar(loss.detach())  # == loss for one process
            done = step + 1
            logged = done % spec.log_every == 0 or done == spec.steps
            saved = spec.ckpt_every > 0 and done % spec.ckpt_every == 0
            if read_every_step or logged or saved:
                # On a GPU, reading the loss waits for the step: only at a log or checkpoint step, so
                # the host queues the next steps meanwhile. A non-finite loss since the last read
                # stops the run there, before a checkpoint can keep it.
                bad_now = not bool(torch.isfinite(global_loss))
                if bad_now or bool(nonfinite):
                    what = (f"became {global_loss.item()} at step {step}" if bad_now
                            else f"was not finite at a step before step {step}")
                    raise FloatingPointError(
                        f"[{desc}] loss {what}: lower the learning rate (now {spec.lr}) or enable "
                        "gradient clipping"
                    )
                loss_value = float(global_loss)
            else:
                nonfinite = nonfinite | ~torch.isfinite(global_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip > 0:
                grad_norm = nn.utils.clip_grad_norm_(params, spec.grad_clip, foreach=True)
                if read_every_step or logged:
                    metrics["grad_norm"] = float(grad_norm)
            opt.step()
            if ema is not None:
                ema_update(ema, model, spec.ema)
            n_window += 1
            if logged:
                elapsed = max(1e-9, time.time() - t_window)
                steps_per_s = n_window / elapsed
                metrics = {"loss": loss_value, "lr": lr, **{k: float(v) for k, v in metrics.items()},
                           "steps_per_s": steps_per_s}
                if samples_per_batch:
                    metrics["samples_per_s"] = samples_per_batch * steps_per_s
                if tokens_per_batch:
                    metrics["tokens_per_s"] = tokens_per_batch * steps_per_s
                if flops_per_step:
                    metrics["flops_per_step"] = float(flops_per_step)
                    metrics["flop_per_s"] = flops_per_step * steps_per_s
                if log is not None and main:
                    log(done, metrics)
                rate = ({"samples/s": metrics["samples_per_s"]} if samples_per_batch
                        else {"steps/s": steps_per_s})
                t_window, n_window = time.time(), 0
            if progress is not None:
                # On a GPU the loss is read at log steps: nothing to show before the first one.
                shown = {} if math.isnan(loss_value) else {"loss": loss_value}
                progress.update(done, {**shown, "lr": lr, **rate})
            if saved and done < spec.steps:
                save(done)
    finally:
        if progress is not None:
            progress.close()
    save(spec.steps)
    distributed.barrier()  # no rank moves on (and reads what rank 0 wrote) before it is written
    model.eval()
    if ema is not None:
        ema.eval()
    return FitResult(model, ema, spec.steps, loss_value, start, time.time() - t0, flops_per_step)
