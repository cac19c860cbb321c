"""The training stages' components on one device: caption, train_vae, encode, train_dit, evaluate.

    python benchmarks/stages_on_device.py --clips PROJECT/data/clips --out /tmp/stages \
        [--device cuda] [--profile ci] [--set KEY=VALUE ...] [--json out.json]

Runs what `flows/stages.py` runs for those stages, without Prefect, MLflow or DVC, on
`--device` (default: `components.distributed.device()`, the stages' own choice: the GPU when
there is one, or `$ZOETROPE_DEVICE`), and prints each stage's seconds and headline figures. It
checks that every stage runs on a GPU, end to end, and how long each takes there; the clips come
from a prepare stage's output (`data/clips`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from components import config as C, distributed  # noqa: E402
from components.captioner import run_caption_stage  # noqa: E402
from components.encode import run_encode  # noqa: E402
from components.evaluation import run_evaluate  # noqa: E402
from components.train_dit import run_train_dit  # noqa: E402
from components.vae import run_train_vae  # noqa: E402

HEADLINES = ("train_seconds", "steps_per_s", "flop_per_s", "val_psnr", "val_ssim", "heldout_color",
             "heldout_shape", "heldout_motion", "val_loss", "adherence_seen_color",
             "adherence_seen_shape", "adherence_seen_motion", "clips")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=Path, required=True, help="a prepare stage's data/clips")
    ap.add_argument("--out", type=Path, required=True, help="folder for models, captions and reports")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the stages' choice)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = C.load(args.params, args.profile, C.overrides_to_dict(args.overrides))
    device = torch.device(args.device) if args.device else distributed.device()
    out = args.out
    for d in ("captions", "captioner", "vae", "encoded", "dit", "eval"):
        (out / d).mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "profile": args.profile, "overrides": args.overrides}

    def stage(name: str, fn) -> None:
        t0 = time.time()
        metrics = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.time() - t0
        flat = metrics.get("metrics", metrics)
        report[name] = {"seconds": round(seconds, 2),
                        **{k: flat[k] for k in HEADLINES if isinstance(flat.get(k), (int, float))}}
        print(f"{name}: {json.dumps(report[name])}", flush=True)

    stage("caption", lambda: run_caption_stage(args.clips, out / "captions", out / "captioner", cfg,
                                               device=device))
    stage("train_vae", lambda: run_train_vae(args.clips, out / "vae", cfg, device=device))
    stage("encode", lambda: run_encode(args.clips, out / "captions", out / "vae/vae.pt", out / "encoded", cfg,
                                       device=device))
    stage("train_dit", lambda: run_train_dit(out / "encoded", out / "dit", cfg, device=device))
    stage("evaluate", lambda: run_evaluate(args.clips, out / "vae/vae.pt", out / "dit/dit.pt", out / "eval", cfg,
                                           device=device, encoded_dir=out / "encoded"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
