"""One DiT training step against this machine's matrix-multiply peak, both measured in one run.

    python benchmarks/dit_step.py [--profile tiny] [--steps 60] [--set KEY=VALUE ...] [--json out.json]

`--set` changes the step as `zoetrope run --set` changes a run, e.g. a larger preset on a GPU:
`--set dit.preset=base --set dit.batch_size=128 --set data.size=64`.

The step is the train_dit stage's: the `dit.preset` network at `dit.batch_size`, the latent shape
that `data` and `vae` give, the rectified-flow loss, gradient clipping, AdamW and EMA, run by
`components.trainer.fit` (which counts the step's FLOPs with FlopCounterMode). Captions are random
tensors of `text.max_tokens` tokens, the longest the stage can see (it trims to the longest
caption, so a real run attends to as many or fewer).

On a CPU the peak is the best of N fp32 2048^3 matrix multiplies on the same threads; the report
is achieved FLOP/s over that peak. On CUDA the step runs under bf16 autocast (as `fit` does) and
the report adds MFU: achieved FLOP/s over the GPU's dense bf16 peak from its datasheet (PaLM's
definition, Chowdhery et al. 2022), next to the measured bf16 matmul peak.

Numbers from a machine that is busy with other work mean nothing: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from components import config as C  # noqa: E402
from components.captioner import FEATURE_PARTS  # noqa: E402
from components.dit import DiT, DiTSpec  # noqa: E402
from components.flops import matmul_peak  # noqa: E402
from components.rectified_flow import rf_loss  # noqa: E402
from components.text_encoder import TEXT_DIM  # noqa: E402
from components.train_dit import RepaDiT, unwrap  # noqa: E402
from components.trainer import TrainSpec, fit  # noqa: E402

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, without sparsity). Checked in
# order: the first name fragment found in the device name wins.
GPU_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)
WINDOW = 10  # steps per timing window


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_peak(name: str) -> float | None:
    for fragment, peak in GPU_BF16_PEAK:
        if fragment in name:
            return peak
    return None


def dit_step(cfg: C.Config, device: torch.device, steps: int, compile: bool = False) -> dict:
    dcfg, vcfg, data = cfg.dit, cfg.vae, cfg.data
    t = (data.frames - 1) // vcfg.time_down + 1
    h = w = data.size // vcfg.space_down
    B, L = dcfg.batch_size, cfg.text.max_tokens
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(B * 4, vcfg.latent_channels, t, h, w, generator=g).to(device)
    ctx = torch.randn(B * 4, L, TEXT_DIM, generator=g).to(device)
    mask = torch.ones(B * 4, L, dtype=torch.bool, device=device)

    torch.manual_seed(0)
    model = DiT(DiTSpec.from_config(dcfg, vcfg.latent_channels)).to(device)
    tokens = model.num_tokens(t, h, w)

    trained: torch.nn.Module = model
    if dcfg.repa_weight > 0:  # the stage's step aligns block repa_block's tokens with the captioner's features
        width = cfg.caption.width * FEATURE_PARTS  # video_features: the grid's and the frames' channels
        targets = torch.randn(B * 4, tokens, width, generator=g).to(device)
        trained = RepaDiT(model, dcfg.repa_block, width, FEATURE_PARTS).to(device)

    def batch_fn(step: int, gen: torch.Generator):
        i = torch.randint(len(latents), (B,), generator=gen).to(device)
        if trained is model:
            return latents[i], ctx[i], mask[i], gen
        return latents[i], ctx[i], mask[i], gen, targets[i]

    def loss_fn(m, b):
        loss, info = rf_loss(m, b[0], b[1], b[2], b[3], ctx[:1], mask[:1], dcfg.cond_dropout)
        if len(b) == 4:
            return loss, info
        return loss + dcfg.repa_weight * unwrap(m).alignment_loss(b[4]), info

    windows: list[dict] = []
    spec = TrainSpec(steps=steps, lr=dcfg.lr, warmup=dcfg.warmup, grad_clip=dcfg.grad_clip,
                     ema=dcfg.ema, log_every=WINDOW, ckpt_every=0, compile=compile)
    res = fit(trained, loss_fn, batch_fn, spec, log=lambda s, m: windows.append(m), desc="bench",
              samples_per_batch=B, tokens_per_batch=B * tokens)
    timed = windows[1:] or windows  # the first window holds one-off allocation and warm-up
    rates = sorted(m["flop_per_s"] for m in timed)
    return {
        "preset": dcfg.preset,
        "params": sum(p.numel() for p in model.parameters()),
        "repa_weight": dcfg.repa_weight,
        "batch_size": B,
        "latent_shape": [vcfg.latent_channels, t, h, w],
        "tokens_per_sample": tokens,
        "caption_tokens": L,
        "flops_per_step": res.flops_per_step,
        "windows": len(timed),
        "steps_per_s_median": statistics.median(m["steps_per_s"] for m in timed),
        "samples_per_s_median": statistics.median(m["samples_per_s"] for m in timed),
        "tokens_per_s_median": statistics.median(m["tokens_per_s"] for m in timed),
        "flop_per_s_median": statistics.median(rates),
        "flop_per_s_best": rates[-1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny", help="params.yaml profile (default: tiny)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--steps", type=int, default=60, help=f"training steps, timed in windows of {WINDOW}")
    ap.add_argument("--repeats", type=int, default=10, help="matmuls for the peak (best of)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one params.yaml value (repeatable), as `zoetrope run --set`")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (TrainSpec.compile)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 2 * WINDOW:
        ap.error(f"--steps {args.steps} leaves no timed window: use at least {2 * WINDOW}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = C.load(args.params, args.profile, C.overrides_to_dict(args.overrides))
    out: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "profile": args.profile,
        "overrides": args.overrides,
        "compile": args.compile,
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 peak, not TF32
        out["fp32_matmul_peak"] = matmul_peak(2048, args.repeats, torch.float32, device)
        out["bf16_matmul_peak"] = matmul_peak(8192, args.repeats, torch.bfloat16, device)
    else:
        out["fp32_matmul_peak"] = matmul_peak(2048, args.repeats, torch.float32, device)
    out.update(dit_step(cfg, device, args.steps, args.compile))
    achieved = out["flop_per_s_median"]
    out["share_of_fp32_matmul_peak"] = achieved / out["fp32_matmul_peak"]
    if device.type == "cuda":
        out["share_of_bf16_matmul_peak"] = achieved / out["bf16_matmul_peak"]
        peak = gpu_peak(out["device"])
        out["bf16_datasheet_peak"] = peak
        out["mfu"] = achieved / peak if peak else None

    print(f"device {out['device']} ({out['threads']} threads), torch {out['torch']}")
    print(f"fp32 2048^3 matmul peak: {out['fp32_matmul_peak'] / 1e9:.1f} GFLOP/s (best of {args.repeats})")
    print(f"DiT {out['preset']} ({out['params'] / 1e6:.2f}M params), batch {out['batch_size']}, latent "
          f"{out['latent_shape']}, {out['tokens_per_sample']} tokens/sample, {out['caption_tokens']} caption tokens"
          + (f", REPA projector (weight {out['repa_weight']})" if out["repa_weight"] else ""))
    print(f"  FLOPs per training step (FlopCounterMode): {out['flops_per_step'] / 1e9:.2f} GFLOP")
    print(f"  {out['steps_per_s_median']:.2f} steps/s, {out['samples_per_s_median']:.1f} samples/s, "
          f"{out['tokens_per_s_median']:.0f} tokens/s (median of {out['windows']} windows of {WINDOW})")
    print(f"  achieved {achieved / 1e9:.1f} GFLOP/s (best window {out['flop_per_s_best'] / 1e9:.1f})")
    print(f"achieved / fp32 matmul peak: {out['share_of_fp32_matmul_peak']:.1%}")
    if device.type == "cuda":
        print(f"bf16 8192^3 matmul peak: {out['bf16_matmul_peak'] / 1e12:.1f} TFLOP/s; "
              f"achieved / that: {out['share_of_bf16_matmul_peak']:.1%}")
        if out["mfu"] is not None:
            print(f"MFU (bf16 datasheet peak {out['bf16_datasheet_peak'] / 1e12:.0f} TFLOP/s): {out['mfu']:.2%}")
        else:
            print("MFU: unknown GPU, add its datasheet bf16 peak to GPU_BF16_PEAK")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
