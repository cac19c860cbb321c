"""Native sizes, as Sora: clips grouped by shape (frames, height, width), each batch from one group.

A bucket is a clip shape written `FRAMESxHEIGHTxWIDTH` (e.g. "17x32x48", landscape). Training on
buckets lets one model learn landscape, square and portrait clips of different lengths without
cropping or padding: every batch stacks clips of one shape, the bucket drawn with probability
proportional to its clip count, so each clip is seen equally often whatever its shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        m = _SHAPE.match(str(text).strip())
        if m is None:
            raise ValueError(f"bucket {text!r} is invalid: write FRAMESxHEIGHTxWIDTH, e.g. 17x32x48")
        return cls(*(int(g) for g in m.groups()))

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> str:
        if self.height == self.width:
            return "square"
        return "landscape" if self.width > self.height else "portrait"

    def check(self, time_down: int, side_multiple: int) -> None:
        """Raise unless the causal VAE and the DiT's patches divide this shape."""
        if self.frames < 1 or (self.frames - 1) % time_down:
            raise ValueError(f"bucket {self}: frames={self.frames} is invalid: use 1 + k*{time_down}")
        for name, side in (("height", self.height), ("width", self.width)):
            if side < side_multiple or side % side_multiple:
                raise ValueError(f"bucket {self}: {name}={side} is invalid: use a multiple of "
                                 f"{side_multiple} (VAE space_down x DiT patch)")


def group_by_shape(shapes: list[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Item indices per distinct shape, shapes in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return groups


class BucketSampler:
    """Draws (bucket number, indices within it) batches; a bucket's chance is its share of items."""

    def __init__(self, sizes: list[int]):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"bucket sizes {sizes} are invalid: every bucket needs at least one item")
        self.sizes = list(sizes)
        self.weights = torch.tensor(self.sizes, dtype=torch.float64)

    def draw(self, batch_size: int, gen: torch.Generator) -> tuple[int, torch.Tensor]:
        # One bucket draws nothing extra: its batches are those of unbucketed training, bit for bit.
        b = 0 if len(self.sizes) == 1 else int(torch.multinomial(self.weights, 1, generator=gen))
        return b, torch.randint(self.sizes[b], (batch_size,), generator=gen)
