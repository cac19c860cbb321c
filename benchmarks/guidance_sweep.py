"""Guidance sweep: grade one trained DiT's videos at several classifier-free guidance weights.

Reuses a finished project (run `make run` first): its VAE, a DiT (the project's own, or one that
`benchmarks/dit_ablation.py` trained), and the evaluation stage's judge (trained once per project
and cached, as in dit_ablation.py). Every weight generates the same prompts from the same noise
(`--prompts` per split, drawn as the evaluation stage draws them, in batches of 32 with the
project's seed), so the rows differ only in the guidance weight.

    .venv/bin/python benchmarks/guidance_sweep.py --project . --guidance 2,3,4,6
    .venv/bin/python benchmarks/guidance_sweep.py --project . --dit .zoetrope/ablation/seed1/dit.pt
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from dit_ablation import judge_for  # noqa: E402

from components import config, world  # noqa: E402
from components.evaluation import adherence, eval_prompts  # noqa: E402
from components.generate import T2VPipeline  # noqa: E402

BATCH = 32


def generate_videos(pipe: T2VPipeline, captions: list[str], cfg: config.Config, guidance: float) -> torch.Tensor:
    """uint8 (N, 3, T, H, W) videos of `captions`, in batches of BATCH from the project's seed: the
    same noise for every variant graded on the same prompts."""
    return torch.cat([
        torch.from_numpy(pipe.generate(captions[i:i + BATCH], seed=cfg.seed, steps=cfg.sample.steps,
                                       guidance=guidance, sampler=cfg.sample.sampler)).permute(0, 4, 1, 2, 3)
        for i in range(0, len(captions), BATCH)]).contiguous()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=Path("."))
    ap.add_argument("--dit", type=Path, default=None, help="default: PROJECT/models/dit/dit.pt")
    ap.add_argument("--guidance", default="2,3,4,6", help="comma-separated weights")
    ap.add_argument("--prompts", type=int, default=96, help="prompts per split")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--out", type=Path, default=Path(".zoetrope/ablation"), help="where the judge is cached")
    args = ap.parse_args(argv)

    project = args.project.resolve()
    cfg = config.load(project / "params.yaml", args.profile, {"eval": {"prompts_per_split": args.prompts}})
    judge = judge_for(project, cfg, args.out / "judge.pt")
    pipe = T2VPipeline.from_paths(project / "models/vae/vae.pt", args.dit or project / "models/dit/dit.pt",
                                  max_tokens=cfg.text.max_tokens, device="cpu")
    prompts = eval_prompts(cfg, random.Random(cfg.seed + 101))
    for g in (float(x) for x in args.guidance.split(",")):
        row: dict[str, object] = {"guidance": g}
        for split, attrs in prompts.items():
            pred = judge.predict(generate_videos(pipe, [world.caption(a) for a in attrs], cfg, g))
            row.update({f"{split}_{a}": round(v, 3) for a, v in adherence(pred, attrs).items()})
            shapes = collections.Counter(f"{a['shape']}->{p}" for a, p in zip(attrs, pred["shape"]))
            row[f"{split}_shape_confusion"] = dict(sorted(shapes.items()))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
