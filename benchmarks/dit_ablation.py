"""DiT ablation: retrain the DiT of a finished run with other settings and grade its videos.

Reuses a project's `data/clips`, `data/encoded` and `models/vae` (run `make run` first), trains
the DiT with `--set` overrides on top of params.yaml, and grades `--prompts` generated videos per
split (seen / held-out combinations) with the evaluation stage's judge, printing adherence per
attribute and the motion confusion counts. The judge is trained once per project and cached.

    .venv/bin/python benchmarks/dit_ablation.py --project . --tag shift1 --set dit.shift=1.0
    .venv/bin/python benchmarks/dit_ablation.py --project . --tag shift2 --set dit.shift=2.0
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from components import config, world
from components.clips import load_clips
from components.evaluation import eval_prompts, judge_training_set
from components.generate import T2VPipeline
from components.judge import Judge, train_judge
from components.train_dit import run_train_dit
from components.vae import load_vae


def judge_for(project: Path, cfg: config.Config, cache: Path, vae_path: Path | None = None,
              clips=None) -> Judge:
    """The evaluation stage's judge, trained on the stage's own selection of clips
    (`components.evaluation.judge_training_set`) and the reconstructions of the VAE at `vae_path`
    (default: the project's); `clips`, the project's when already loaded."""
    if cache.exists():
        return Judge.load(cache)
    clips = clips or load_clips(project / "data/clips", cfg.data.size, cfg.data.frames)
    vae = load_vae(vae_path or project / "models/vae/vae.pt", "cpu")
    video, labels = judge_training_set(clips, vae, cfg)
    judge = train_judge(video, labels, cfg.eval, cfg.seed)
    judge.save(cache)
    return judge


def variant_arguments(ap: argparse.ArgumentParser, prompts: int, out: str) -> None:
    """The options of an ablation: the project, the variant's tag and `--set` overrides, the
    profile, the prompts graded per split and the output folder."""
    ap.add_argument("--project", type=Path, default=Path("."))
    ap.add_argument("--tag", required=True, help="name of this variant (its output folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--prompts", type=int, default=prompts, help="prompts per split")
    ap.add_argument("--out", type=Path, default=Path(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variant_arguments(ap, prompts=64, out=".zoetrope/ablation")
    args = ap.parse_args()

    project = args.project.resolve()
    cfg = config.load(project / "params.yaml", args.profile, config.overrides_to_dict(args.overrides))
    out = args.out / args.tag
    out.mkdir(parents=True, exist_ok=True)
    judge = judge_for(project, cfg, args.out / "judge.pt")

    t0 = time.time()
    train = run_train_dit(project / "data/encoded", out, cfg)
    pipe = T2VPipeline.from_paths(project / "models/vae/vae.pt", out / "dit.pt",
                                  max_tokens=cfg.text.max_tokens, device="cpu")
    prompt_cfg = config.load(project / "params.yaml", args.profile, config.deep_merge(
        config.overrides_to_dict(args.overrides), {"eval": {"prompts_per_split": args.prompts}}))
    result: dict[str, float] = {}
    for split, attrs in eval_prompts(prompt_cfg, random.Random(cfg.seed + 101)).items():
        prompts = [world.caption(a) for a in attrs]
        videos = np.concatenate([
            pipe.generate(prompts[i:i + 16], seed=cfg.seed + i, steps=cfg.sample.steps,
                          guidance=cfg.sample.guidance, sampler=cfg.sample.sampler)
            for i in range(0, len(prompts), 16)])
        pred = judge.predict(torch.from_numpy(videos).permute(0, 4, 1, 2, 3).contiguous())
        for a in world.GRADED:
            result[f"{split}_{a}"] = float(np.mean([pred[a][i] == attrs[i][a] for i in range(len(attrs))]))
        confusion = collections.Counter(f"{attrs[i]['motion']}->{pred['motion'][i]}" for i in range(len(attrs)))
        print(f"{split} motion confusion (true->judged):", dict(sorted(confusion.items())))
        shapes = collections.Counter(f"{attrs[i]['shape']}/{attrs[i]['size']}->{pred['shape'][i]}" for i in range(len(attrs)))
        print(f"{split} shape confusion (true/size->judged):", dict(sorted(shapes.items())))
    print(json.dumps({"tag": args.tag, "overrides": args.overrides, "prompts_per_split": args.prompts,
                      "train_seconds": round(train["train_seconds"], 1), "val_loss": train.get("val_loss"),
                      **{k: round(v, 3) for k, v in result.items()},
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
