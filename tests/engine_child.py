"""A tiny real DiT trained by `components.trainer.fit` in a process of its own.

The kill-and-resume test (tests/test_engine.py) SIGKILLs it and starts it again; the DDP test
(tests/test_ddp.py) launches it under `torchrun`. Run as `python tests/engine_child.py --help`.

Two objectives:
- `rf`: the rectified-flow loss of `components.rectified_flow`, which draws its timesteps and
  noise from the step generator inside the loss (what the train_dit stage does);
- `fixed`: the same flow-matching loss with timesteps and noise drawn in `batch_fn` for the whole
  global batch, so a rank's rows see exactly the noise they would in one process and the DDP
  loss curve can be compared with one process's to float rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `components` importable
    sys.path.insert(0, str(ROOT))

from components import distributed  # noqa: E402
from components.checkpoint import atomic_torch_save, atomic_write_json  # noqa: E402
from components.dit import DiT, DiTSpec  # noqa: E402
from components.rectified_flow import rf_loss  # noqa: E402
from components.trainer import TrainSpec, fit  # noqa: E402

SPEC = DiTSpec(in_channels=4, dim=32, depth=2, heads=2, mlp_ratio=2.0, patch_t=1, patch_h=2, patch_w=2)
N, L = 16, 6  # training clips, caption tokens


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(N, 4, 3, 4, 4, generator=g) * 0.5 + torch.linspace(-1, 1, 4).view(1, 4, 1, 1, 1)
    ctx = torch.randn(N, L, 384, generator=g)
    mask = torch.arange(L)[None] < torch.randint(2, L + 1, (N, 1), generator=g)
    return x0, ctx, mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="folder for final weights, result and loss log")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (resume from it)")
    ap.add_argument("--objective", choices=("rf", "fixed"), default="rf")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--ckpt-per-rank", action="store_true", help="a checkpoint folder per rank (as on "
                    "nodes without a shared file system)")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to idle per step (a slower run to kill)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # the same reduction order in every run: bit-identical weights
    out = Path(args.out)
    with distributed.session() as env:
        x0, ctx, mask = data()
        B = args.batch

        if args.objective == "rf":
            def batch_fn(step: int, gen: torch.Generator):
                i = torch.randint(N, (B,), generator=gen)
                if args.sleep:
                    time.sleep(args.sleep)
                return x0[i], ctx[i], mask[i], gen

            def loss_fn(m, b):
                return rf_loss(m, b[0], b[1], b[2], b[3], ctx[:1], mask[:1], 0.25)
        else:
            def batch_fn(step: int, gen: torch.Generator):
                i = torch.randint(N, (B,), generator=gen)
                t = torch.rand(B, generator=gen)
                noise = torch.randn(B, *x0.shape[1:], generator=gen)
                return x0[i], ctx[i], mask[i], t, noise

            def loss_fn(m, b):
                x, c, k, t, noise = b
                tb = t.view(-1, 1, 1, 1, 1)
                v = m((1 - tb) * x + tb * noise, t, c, k)
                return (v - (noise - x)).pow(2).mean(), {"rows": float(len(x))}

        losses: dict[int, float] = {}

        def log(step: int, metrics: dict[str, float]) -> None:
            losses[step] = metrics["loss"]
            atomic_write_json(out / f"log-rank{env.rank}.json", {"losses": losses, "last": metrics})

        torch.manual_seed(0)
        model = DiT(SPEC)
        spec = TrainSpec(steps=args.steps, lr=3e-3, warmup=3, grad_clip=1.0, ema=0.9,
                         ckpt_every=args.ckpt_every, log_every=1, seed=7)
        ckpt = f"{args.ckpt}-rank{env.rank}" if args.ckpt and args.ckpt_per_rank else args.ckpt
        res = fit(model, loss_fn, batch_fn, spec, ckpt_dir=ckpt, log=log, desc="child",
                  samples_per_batch=B, tokens_per_batch=B * model.num_tokens(3, 4, 4))
        if env.is_main:
            atomic_torch_save({"model": res.model.state_dict(), "ema": res.ema.state_dict()}, out / "final.pt")
            atomic_write_json(out / "result.json", {
                "resumed_from": res.resumed_from, "world_size": env.world_size,
                "flops_per_step": res.flops_per_step, "final_loss": res.final_loss,
            })
    return 0


if __name__ == "__main__":
    sys.exit(main())
