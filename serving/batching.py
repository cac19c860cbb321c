"""Adaptive batching of generations: concurrent requests share every DiT forward pass.

BentoML's own batching (`@bentoml.api(batchable=True)`) batches the *inputs of one API call*
and hands back one output per input; a video request is a whole sampling loop whose settings
(steps, frames) decide the latent shape, and whose answer is an MP4, not an array row. So the
batching sits one level down, where the loop starts: requests with the same loop settings
(`BatchKey`) that arrive while the runtime is busy, or within `max_latency_ms` of the first,
run as one `OnnxT2V.generate_batch` call. The window opens at the later of the oldest
request's arrival and the end of the previous batch: under load, the clients a batch has just
answered come back within a few milliseconds of each other, and without that wait every batch
would leave with the requests that happened to arrive first (batches alternating between two
halves of the clients, 3-5 videos out of 8). Prompts, negative prompts, seeds and guidance may
differ per row (the runtime takes them per row); each video is the one a single request would
get, up to float rounding.

Batches run on `lanes` workers at once (a lane is a worker thread with its share of the CPU
cores). On a CPU one video's sampling loop already keeps one core busy and a larger batch costs
as much per video as a single one (ONNX Runtime, this project's `tiny` DiT: 0.142 s a video in a
batch of 8 against 0.141 s alone, one thread), while one loop split over two intra-op threads
runs slower than on one (0.178 s): small kernels do not divide well. So the service runs one
single-threaded lane per core, and the batcher fills every lane: when several lanes are free,
the waiting requests are split evenly between them, with no window (requests that queued while
every lane was busy still share a loop). On a GPU one lane does it all, and batching is what
pays: there the window holds. Peak memory is bounded by `lanes * max_batch_size` videos.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class BatchKey:
    """Settings that fix the shape and length of the sampling loop: rows must share them."""

    steps: int
    num_frames: int
    sampler: str
    height: int | None = None  # None: the bundle's trained square size
    width: int | None = None


@dataclass(frozen=True)
class Job:
    prompt: str
    negative_prompt: str
    seed: int
    guidance: float


class QueueFull(RuntimeError):
    """More requests are waiting than the service accepts; the client should retry later."""


RunBatch = Callable[[BatchKey, Sequence[Job]], np.ndarray]  # -> uint8 (B, T, H, W, 3)


@dataclass
class _Pending:
    key: BatchKey
    job: Job
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """`await batcher.submit(key, job)` -> that job's video; `run_batch` runs in a worker thread."""

    def __init__(self, run_batch: RunBatch, max_batch_size: int, max_latency_ms: float,
                 on_batch: Callable[[int], None] | None = None, max_queued: int | None = None,
                 lanes: int = 1):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} is invalid: use at least 1")
        if lanes < 1:
            raise ValueError(f"lanes={lanes} is invalid: use at least 1 (batches run at once)")
        self.lanes = lanes
        self._busy = 0  # lanes running a batch now
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self.on_batch = on_batch  # told each batch's size (the service feeds a Prometheus histogram)
        self.max_queued = max_queued  # waiting requests beyond this are refused (QueueFull)
        self.batch_sizes: list[int] = []  # for tests and /info; bounded below
        self._pending: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._free_since = 0.0  # monotonic time the previous batch finished

    @property
    def queued(self) -> int:
        return len(self._pending)

    def full(self) -> bool:
        return self.max_queued is not None and len(self._pending) >= self.max_queued

    async def submit(self, key: BatchKey, job: Job) -> np.ndarray:
        if self.full():
            raise QueueFull(f"{len(self._pending)} requests are already waiting: retry later")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # started lazily: needs the server's loop
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        item = _Pending(key, job, loop.create_future())
        self._pending.append(item)
        self._wake.set()
        return await item.future

    def _take(self) -> list[_Pending]:
        """The oldest request and later ones with the same key: up to max_batch_size, and an even
        share of them when several lanes are free (8 waiting, 2 free lanes: 4 each)."""
        key = self._pending[0].key
        same = [p for p in self._pending if p.key == key]
        share = math.ceil(len(same) / max(1, self.lanes - self._busy))
        batch = same[: min(self.max_batch_size, share)]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return batch

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and self._busy < self.lanes:
                # Wait for company up to max_latency after the oldest arrival or the end of the
                # previous batch, whichever is later, unless a full batch is already there.
                oldest = self._pending[0]
                same = sum(p.key == oldest.key for p in self._pending)
                wait = max(oldest.arrived, self._free_since) + self.max_latency_s - time.monotonic()
                if same < self.max_batch_size and wait > 0:
                    await asyncio.sleep(wait)
                batch = [p for p in self._take() if not p.future.cancelled()]
                if not batch:
                    continue
                self._record(len(batch))
                self._busy += 1
                asyncio.get_running_loop().create_task(self._dispatch(batch))

    async def _dispatch(self, batch: list[_Pending]) -> None:
        """Run one batch on a lane (a worker thread) and answer its requests; frees the lane."""
        try:
            videos = await asyncio.to_thread(self.run_batch, batch[0].key, [p.job for p in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error, the loop lives on
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            for p, video in zip(batch, videos):
                if not p.future.done():
                    p.future.set_result(video)
        finally:
            self._busy -= 1
            self._free_since = time.monotonic()
            assert self._wake is not None
            self._wake.set()  # a lane is free: the loop looks at the queue again

    def _record(self, size: int) -> None:
        self.batch_sizes = [*self.batch_sizes[-999:], size]
        if self.on_batch is not None:
            self.on_batch(size)
