"""Decoder ablation: retrain the VAE's decoder phase of a finished run with other settings and
grade what it draws, with the run's encoder, latents and DiT left as they are.

Reuses a project (run `make run` first). The VAE stage is rerun in `--out/TAG` on a copy of the
project's VAE checkpoints with `--set` overrides of the decoder phase (`vae.decoder_*`): the joint
phase resumes finished, so only the decoder phase trains (a setting outside the decoder phase
would retrain the whole VAE and change the latents the DiT learned from: refused). Then, with a
judge trained as the evaluation stage trains it (real clips plus this VAE's reconstructions):

- reconstructions of unseen square one-object clips (val and held-out splits), their latents
  with Gaussian noise of each `--noise` level (times each channel's std) added, judged shape by
  object size: how exact a latent this decoder needs to draw the right shape;
- the project's DiT's videos for `--prompts` prompts per split, drawn as the evaluation stage
  draws them, from the same noise for every variant, decoded by this VAE: adherence per
  attribute and shape by size.

    .venv/bin/python benchmarks/decoder_ablation.py --project . --tag base
    .venv/bin/python benchmarks/decoder_ablation.py --project . --tag noise25 --set vae.decoder_noise=0.25
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from dit_ablation import judge_for, variant_arguments  # noqa: E402
from guidance_sweep import BATCH, generate_videos  # noqa: E402

from components import config, world  # noqa: E402
from components.clips import load_clips  # noqa: E402
from components.evaluation import adherence, eval_prompts  # noqa: E402
from components.generate import T2VPipeline  # noqa: E402
from components.vae import load_vae, run_train_vae, to_uint8, to_unit  # noqa: E402

PROBE_CLIPS = 400


def by_size(attrs: list[dict[str, str]], judged: list[str]) -> dict[str, float]:
    """Shape accuracy overall and per object size."""
    def share(keep) -> float:
        hits = [a["shape"] == p for a, p in zip(attrs, judged) if keep(a)]
        return round(sum(hits) / max(1, len(hits)), 3)

    return {"shape": share(lambda a: True), **{size: share(lambda a, s=size: a["size"] == s) for size in world.SIZES}}


@torch.no_grad()
def noisy_reconstructions(vae, video: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """uint8 clips -> uint8 decodes of their posterior means plus `level` x channel-std noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(video), BATCH):
        mu, _ = vae.encode(to_unit(video[i:i + BATCH]))
        noise = torch.randn(mu.shape, generator=gen) * vae.latent_std.view(1, -1, 1, 1, 1)
        out.append(to_uint8(vae.decode(mu + level * noise)))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variant_arguments(ap, prompts=96, out=".zoetrope/decoder_ablation")
    ap.add_argument("--noise", default="0,0.1,0.2,0.3,0.5", help="latent noise levels of the probe")
    args = ap.parse_args(argv)

    project = args.project.resolve()
    overrides = config.overrides_to_dict(args.overrides)
    outside = [k for k in args.overrides if not k.split("=", 1)[0].startswith("vae.decoder_")]
    if outside:
        ap.error(f"only vae.decoder_* settings keep the run's latents and DiT: {', '.join(outside)}")
    cfg = config.load(project / "params.yaml", args.profile, config.deep_merge(
        overrides, {"eval": {"prompts_per_split": args.prompts}}))
    out = (args.out / args.tag).resolve()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    ckpt = out / "checkpoints"
    if not ckpt.exists():
        shutil.copytree(project / ".zoetrope/checkpoints/train_vae", ckpt)
    vae_metrics = run_train_vae(project / "data/clips", out, cfg, ckpt_dir=ckpt)
    vae = load_vae(out / "vae.pt", "cpu")
    reference = load_vae(project / "models/vae/vae.pt", "cpu")
    if not torch.equal(vae.latent_std, reference.latent_std):
        raise SystemExit("the retrained VAE's latents differ from the project's: its joint phase did not resume")
    train_s = time.time() - t0

    clips = load_clips(project / "data/clips", cfg.data.size, cfg.data.frames)
    judge = judge_for(project, cfg, out / "judge.pt", vae_path=out / "vae.pt", clips=clips)

    row: dict[str, object] = {"tag": args.tag, "overrides": args.overrides,
                              "val_psnr": round(vae_metrics["val_psnr"], 2), "val_ssim": round(vae_metrics["val_ssim"], 3),
                              "vae_train_seconds": round(train_s, 1)}
    rows = clips.rows
    probe = [i for i, r in enumerate(rows) if r["split"] in ("val", "heldout") and r.get("objects") in (None, 1)
             and (r["height"], r["width"]) == (cfg.data.size, cfg.data.size) and r["frames"] == cfg.data.frames]
    probe = probe[:PROBE_CLIPS]
    if probe:
        real = clips.video[probe]
        attrs = [{a: rows[i][a] for a in ("shape", "size")} for i in probe]
        for level in (float(x) for x in args.noise.split(",")):
            judged = judge.predict(noisy_reconstructions(vae, real, level, cfg.seed))["shape"]
            row[f"recon_noise{level:g}"] = by_size(attrs, judged)

    pipe = T2VPipeline.from_paths(out / "vae.pt", project / "models/dit/dit.pt",
                                  max_tokens=cfg.text.max_tokens, device="cpu")
    for split, attrs in eval_prompts(cfg, random.Random(cfg.seed + 101)).items():
        pred = judge.predict(generate_videos(pipe, [world.caption(a) for a in attrs], cfg, cfg.sample.guidance))
        row.update({f"{split}_{a}": round(v, 3) for a, v in adherence(pred, attrs).items()})
        row[f"{split}_shape_by_size"] = by_size(attrs, pred["shape"])
        misses = collections.Counter(f"{a['size']} {a['shape']}->{p}" for a, p in zip(attrs, pred["shape"])
                                     if a["shape"] != p)
        row[f"{split}_shape_misses"] = dict(misses.most_common(4))
    row["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
