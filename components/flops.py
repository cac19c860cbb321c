"""FLOPs of a training step, counted by PyTorch on the real model, and a matmul peak to compare with.

`train_step_flops` runs one forward and backward pass of the real model on a real batch under
`torch.utils.flop_counter.FlopCounterMode`, which adds up every matmul, convolution and attention
the autograd engine dispatches: what the hardware was asked to do, not a formula of the
architecture that could drift from it. The optimizer step is elementwise and not counted (nor is
it in the MFU convention of PaLM, Chowdhery et al. 2022, App. B).

The CPU attention kernel (`_scaled_dot_product_flash_attention_for_cpu`) has no formula in
PyTorch's registry, so it would count as zero; we give it the same formula as the GPU kernels.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                       **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward


def counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)


def train_step_flops(model: nn.Module, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]],
                     batch: Any) -> int:
    """FLOPs of `loss_fn(model, batch)` and its backward pass, leaving no trace on the model.

    Gradients are cleared and buffers (e.g. BatchNorm statistics) restored afterwards, and the
    global RNG state is forked, so training continues exactly as if it had not been counted.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        with counter() as fc:
            loss, _ = loss_fn(model, batch)
            loss.backward()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    for p in model.parameters():
        p.grad = None
    return int(fc.get_total_flops())


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matrix multiply (2 n^3 FLOPs) on `device`."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b, out=out)  # warm-up: first-call allocation and kernel selection
    sync()
    best = float("inf")
    inner = 1 if device.type == "cpu" else 20  # a GPU matmul is too short to time alone
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2.0 * n**3 / best
