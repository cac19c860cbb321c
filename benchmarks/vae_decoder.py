"""The VAE's decoder phase on a finished run: before / after reconstruction PSNR and SSIM.

    .venv/bin/python benchmarks/vae_decoder.py --project PROJECT --vae PATH [--set vae.decoder_steps=600 ...]

Loads a trained VAE (`--vae`, default PROJECT/models/vae/vae.pt, e.g. one trained with
`vae.decoder_steps: 0`), measures it on the project's val clips, runs the train_vae stage's
decoder phase (`components.vae.train_decoder`: the encoder frozen, the decoder trained on whole
train clips) with the `vae.decoder_*` settings of params.yaml and `--set`, and measures it again.
The latents do not change (the encoder is frozen), so the DiT's data stays as it was.
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

from components import config as C  # noqa: E402
from components.buckets import BucketSampler  # noqa: E402
from components.clips import load_clips  # noqa: E402
from components.vae import load_vae, recon_metrics_by_shape, train_decoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="a finished run (its data/clips)")
    ap.add_argument("--vae", type=Path, default=None, help="default: PROJECT/models/vae/vae.pt")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    cfg = C.load(ROOT / "params.yaml", args.profile, C.overrides_to_dict(args.overrides))
    clips = load_clips(args.project / "data/clips", cfg.data.size)
    train = clips.native(clips.indices("train"))
    val = [(b, video) for b, _, video in clips.native(clips.indices("val"))]
    vae = load_vae(args.vae or args.project / "models/vae/vae.pt", "cpu")

    def measure() -> dict[str, float]:
        return {k: round(v, 4) for k, v in recon_metrics_by_shape(vae.eval(), val, "cpu").items()}

    out = {"vae": str(args.vae), "overrides": args.overrides, "val_clips": sum(len(v) for _, v in val),
           "before": measure()}
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    t0 = time.time()
    res = train_decoder(vae, train, BucketSampler([len(ids) for _, ids, _ in train]), cfg)
    out["decoder"] = {"steps": cfg.vae.decoder_steps, "lr": cfg.vae.decoder_lr,
                      "edge_weight": cfg.vae.decoder_edge_weight, "train_seconds": round(res.seconds, 1),
                      "wall_seconds": round(time.time() - t0, 1)}
    out["encoder_unchanged"] = all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in encoder.items())
    out["after"] = measure()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
