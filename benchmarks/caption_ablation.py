"""Captioner ablation: retrain the captioner of a finished run with other settings and grade it.

Reuses a project's `data/clips` (run `make run`, or the synth and prepare stages, first), trains
the captioner on the labelled training clips with `--set` overrides on top of params.yaml, as the
caption stage does, and grades its captions of the val and held-out clips with the stage's own
`evaluate` (first object's attributes, BLEU-4, second object on two-object clips), adding the
first object's shape on one- and two-object clips apart. Prints one JSON line.

    .venv/bin/python benchmarks/caption_ablation.py --project . --tag nopaste --set caption.paste_fraction=0
    .venv/bin/python benchmarks/caption_ablation.py --project . --tag seed1 --set seed=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from components import config, world
from components.captioner import evaluate, train_captioner
from components.clips import load_clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=Path("."))
    ap.add_argument("--tag", required=True, help="name of this variant (printed with its scores)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--profile", default="tiny")
    args = ap.parse_args()

    project = args.project.resolve()
    cfg = config.load(project / "params.yaml", args.profile, config.overrides_to_dict(args.overrides))
    clips = load_clips(project / "data/clips", cfg.data.size, cfg.data.frames)
    train = clips.indices("train", caption_visible=True)
    t0 = time.time()
    model = train_captioner(clips.video[train], clips.column("caption", train), cfg.caption, cfg.seed)
    out: dict = {"tag": args.tag, "seed": cfg.seed, "caption": dataclasses.asdict(cfg.caption),
                 "train_clips": len(train), "train_seconds": round(time.time() - t0, 1),
                 "threads": torch.get_num_threads()}
    for split in ("val", "heldout"):
        idx = clips.indices(split)
        if not idx:
            continue
        captions = model.generate(clips.video[idx])
        rows = [clips.rows[i] for i in idx]
        out.update({f"{split}_{k}": round(v, 4) for k, v in evaluate(captions, rows).items()})
        for n in (1, 2):
            pairs = [(c, r) for c, r in zip(captions, rows) if r.get("objects", 1) == n]
            if pairs:
                right = sum(world.parse_caption(c)["shape"] == r["shape"] for c, r in pairs)
                out[f"{split}_shape_objects{n}"] = round(right / len(pairs), 4)
                out[f"{split}_clips_objects{n}"] = len(pairs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
