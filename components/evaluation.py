"""The evaluate stage: reconstruction and generation metrics, and the promotion gates.

Generated videos are graded by a judge (components/judge.py) trained here on real clips' ground
truth mixed with VAE reconstructions (a judge that never saw decoder output under-rates it;
shared/CALIBRATION.md lesson 5). Prompts are canonical captions of attribute combinations seen in
training and of held-out colour-shape-motion triples (compositional generalisation).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from components import world
from components.config import Config

LogFn = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class Gate:
    name: str  # the key in params.yaml `gates:`
    metric: str  # the metric it reads
    op: str  # ">=" or "<="


GATES: tuple[Gate, ...] = (
    Gate("vae_psnr_min", "vae_psnr", ">="),
    Gate("caption_accuracy_min", "caption_accuracy", ">="),
    Gate("adherence_color_min", "adherence_seen_color", ">="),
    Gate("adherence_shape_min", "adherence_seen_shape", ">="),
    Gate("adherence_motion_min", "adherence_seen_motion", ">="),
)


def check_gates(metrics: dict[str, float], thresholds: dict[str, float],
                gates: tuple[Gate, ...] = GATES) -> list[dict]:
    """Each gate's value, threshold, verdict and margin (positive = passed by that much)."""
    out = []
    for g in gates:
        if g.metric not in metrics:
            raise KeyError(f"gate {g.name} reads metric {g.metric!r}, which evaluation did not produce")
        value, threshold = float(metrics[g.metric]), float(thresholds[g.name])
        margin = value - threshold if g.op == ">=" else threshold - value
        out.append({"name": g.name, "metric": g.metric, "op": g.op, "value": value,
                    "threshold": threshold, "passed": bool(margin >= 0), "margin": margin})
    return out


def eval_prompts(cfg: Config, rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Attribute sets to generate: `seen` combinations and `heldout` triples."""
    held = world.heldout_triples(cfg.data.heldout_fraction, cfg.seed)
    seen = [t for t in world.all_triples() if t not in held]
    out: dict[str, list[dict[str, str]]] = {}
    for split, pool in (("seen", seen), ("heldout", sorted(held))):
        if not pool:
            continue
        pool = list(pool)
        rng.shuffle(pool)  # product order would make the first prompts all one colour
        picks = [pool[i % len(pool)] for i in range(cfg.eval.prompts_per_split)]
        out[split] = [
            {"color": c, "shape": s, "motion": m, "speed": rng.choice(list(world.SPEEDS)),
             "size": rng.choice(list(world.SIZES)), "background": rng.choice(world.BACKGROUNDS)}
            for c, s, m in picks
        ]
    return out


def _grid(videos: np.ndarray, cols: int = 8) -> np.ndarray:
    """(B, T, H, W, 3) -> one (T, rows*H, cols*W, 3) video with 2-pixel gutters."""
    b, t, h, w, _ = videos.shape
    rows = (b + cols - 1) // cols
    grid = np.full((t, rows * (h + 2), cols * (w + 2), 3), 32, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[:, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = videos[i]
    return grid


def run_evaluate(clips_dir: Path, vae_path: Path, dit_path: Path, out_dir: Path, cfg: Config,
                 log: LogFn | None = None, caption_metrics: dict | None = None,
                 ckpt_dir: Path | None = None, device: str | torch.device = "cpu") -> dict:
    from components.clips import load_clips
    from components.generate import T2VPipeline
    from components.judge import train_judge
    from components.metrics import psnr, ssim
    from components.vae import load_vae, to_uint8, to_unit
    from components.vae import reconstruct as vae_reconstruct
    from components.video_io import write_video

    t0 = time.time()
    rng = random.Random(cfg.seed + 101)
    torch.manual_seed(cfg.seed)
    clips = load_clips(clips_dir)
    vae = load_vae(vae_path, device)
    metrics: dict[str, float] = {}

    # 1. Reconstruction on clips the VAE never trained on (val + held-out).
    rows = clips.rows
    unseen = [i for i, r in enumerate(rows) if r["split"] in ("val", "heldout")]
    rng.shuffle(unseen)
    unseen = sorted(unseen[: cfg.eval.recon_clips])
    real_unseen = clips.video[unseen]
    recon_unseen = to_uint8(vae_reconstruct(vae, real_unseen, device))
    metrics["vae_psnr"] = float(psnr(to_unit(recon_unseen), to_unit(real_unseen)))
    metrics["vae_ssim"] = float(ssim(to_unit(recon_unseen), to_unit(real_unseen)))

    # 2. The judge: real one-object train clips plus reconstructions of half of them. It grades
    # one-object prompts, and a second object would make its labels (the first's) ambiguous.
    train_idx = [i for i, r in enumerate(rows) if r["split"] == "train" and _one_object(r)]
    recon_idx = train_idx[::2]
    recon = to_uint8(vae_reconstruct(vae, clips.video[recon_idx], device))
    judge_video = torch.cat([clips.video[train_idx], recon])
    labels = {a: [rows[i][a] for i in train_idx] + [rows[i][a] for i in recon_idx] for a in world.GRADED}
    judge = train_judge(judge_video, labels, cfg.eval, cfg.seed, log=_prefixed(log, "judge/"),
                        ckpt_dir=ckpt_dir)
    single = [k for k, i in enumerate(unseen) if _one_object(rows[i])]
    unseen_labels = {a: [rows[unseen[k]][a] for k in single] for a in world.GRADED}
    for name, video in (("real", real_unseen[single]), ("recon", recon_unseen[single])):
        for attr, acc in judge.accuracy(video, unseen_labels).items():
            metrics[f"judge_{name}_{attr}"] = float(acc)

    # 3. Generation from canonical captions, graded by the judge.
    pipe = T2VPipeline.from_paths(vae_path, dit_path, max_tokens=cfg.text.max_tokens, device=device)
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    for split, attrs_list in eval_prompts(cfg, rng).items():
        prompts = [world.caption(a) for a in attrs_list]
        videos = pipe.generate(prompts, seed=cfg.seed, steps=cfg.sample.steps,
                               guidance=cfg.sample.guidance, num_frames=cfg.data.frames,
                               sampler=cfg.sample.sampler)  # (B, T, H, W, 3) uint8
        pred = judge.predict(torch.from_numpy(videos).permute(0, 4, 1, 2, 3).contiguous())
        hits = {a: [pred[a][i] == attrs_list[i][a] for i in range(len(prompts))] for a in world.GRADED}
        for a in world.GRADED:
            metrics[f"adherence_{split}_{a}"] = float(np.mean(hits[a]))
        metrics[f"adherence_{split}_all"] = float(np.mean([all(hits[a][i] for a in world.GRADED)
                                                           for i in range(len(prompts))]))
        for i, (prompt, video) in enumerate(zip(prompts, videos)):
            write_video(samples_dir / f"{split}_{i:02d}_{prompt.replace(' ', '_')[:60]}.gif", video, cfg.data.fps)
        write_video(samples_dir / f"grid_{split}.gif", _grid(videos), cfg.data.fps)

    caption_metrics = caption_metrics or {}
    metrics["caption_accuracy"] = float(caption_metrics.get("val_acc_mean", float("nan")))
    thresholds = {g.name: getattr(cfg.gates, g.name) for g in GATES}
    gates = check_gates(metrics, thresholds)
    metrics["evaluate_seconds"] = time.time() - t0
    report = {"metrics": metrics, "gates": gates, "passed": all(g["passed"] for g in gates)}
    (out_dir / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    lines = ["# Evaluation", "", "| gate | value | threshold | result | margin |", "|---|---|---|---|---|"]
    for g in report["gates"]:
        lines.append(f"| {g['name']} | {g['value']:.4g} | {g['op']} {g['threshold']:.4g} | "
                     f"{'pass' if g['passed'] else '**FAIL**'} | {g['margin']:+.4g} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(report["metrics"].items())]
    lines += ["", "Sample grids: `samples/grid_seen.gif`, `samples/grid_heldout.gif`."]
    return "\n".join(lines) + "\n"


def _one_object(row: dict) -> bool:
    """One object, or unknown (older manifests): the clips the judge trains on and grades."""
    return row.get("objects") in (None, 1)


def _prefixed(log: LogFn | None, prefix: str) -> LogFn | None:
    if log is None:
        return None
    return lambda step, m: log(step, {f"{prefix}{k}": v for k, v in m.items()})
