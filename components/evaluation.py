"""The evaluate stage: reconstruction and generation metrics, and the promotion gates.

Generated videos are graded by a judge (components/judge.py) trained here on real clips' ground
truth mixed with VAE reconstructions (a judge that never saw decoder output under-rates it;
shared/CALIBRATION.md lesson 5). Prompts are canonical captions of attribute combinations seen in
training and of held-out colour-shape-motion triples (compositional generalisation).

Beside adherence: paraphrase robustness (seen prompts reworded with the synonyms of
components/expand.py, generated as written and as prompt expansion rewrites them), a Fréchet
distance between the judge's features of generated and real clips next to the same distance
between two real sets (its floor at this sample size), temporal consistency of consecutive
frames (generated and real), and the DiT's flow-matching validation loss at fixed timesteps.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from components import world
from components.config import Config

LogFn = Callable[[int, dict[str, float]], None]
SAMPLE_GIFS = 32  # per split, one GIF per prompt; the split's grid shows every generated video
ASPECT_SAMPLES = 8  # seen prompts generated at each other native shape (size, length), for the report


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


# ----------------------------------------------------------------------------------------------
# Paraphrases: the seen prompts reworded
# ----------------------------------------------------------------------------------------------

# Word orders of a paraphrase; the canonical order is `world.caption`'s.
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {motion}{speed} on a {background}",
    "on a {background}, a {color} {shape}, {size}, {motion}{speed}",
)
# Shape synonyms that are adjectives ("a round shape", not "a round").
_SHAPE_ADJECTIVES = ("round", "triangular")


def synonyms(attr: str, value: str) -> tuple[str, ...]:
    """The anchor phrases of components/expand.py for `value` that do not contain its caption
    word (nor the word inside them: "quick" of "quickly"): "crimson" for red, never "cherry red"."""
    from components.expand import ANCHORS

    canonical = {value}
    if attr == "motion":
        canonical.add(world.MOTION_PHRASES[value].split()[-1])  # "diagonally", "still"
    if attr == "speed":
        canonical.add(world.SPEED_WORDS[value])  # "slowly"
    out = tuple(p for p in ANCHORS[attr][value]
                if not any(c in p or p in c for c in canonical))
    if not out:  # every value of the world has one today; a new value must bring its own
        raise ValueError(f"no synonym of {attr}={value!r} in components/expand.py ANCHORS: add one")
    return out


def paraphrase(attrs: dict[str, str], rng: random.Random, template: int = 0) -> str:
    """A caption of `attrs` in other words: a synonym of every attribute the caption names, e.g.
    'a tiny crimson ball heading westward swiftly on a noisy background'."""
    words = {a: rng.choice(synonyms(a, attrs[a])) for a in ("size", "color", "shape", "motion", "background")}
    if words["shape"] in _SHAPE_ADJECTIVES:
        words["shape"] += " shape"
    if "background" not in words["background"]:
        words["background"] += " background"
    if attrs["motion"] == "still":
        words["motion"] = "that is " + words["motion"]  # stationary, not moving, ...
    elif not words["motion"].endswith("ing"):
        words["motion"] = "heading " + words["motion"]  # westward, at an angle
    adverbs = [w for w in synonyms("speed", attrs["speed"]) if w.endswith("ly")]
    words["speed"] = "" if attrs["motion"] == "still" else " " + rng.choice(adverbs)
    text = PARAPHRASE_TEMPLATES[template % len(PARAPHRASE_TEMPLATES)].format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def paraphrase_prompts(attrs_list: list[dict[str, str]], seed: int) -> list[str]:
    """One paraphrase per attribute set, alternating word orders; seeded, so the same every run."""
    rng = random.Random(seed + 303)
    return [paraphrase(a, rng, i) for i, a in enumerate(attrs_list)]


# ----------------------------------------------------------------------------------------------
# Distribution and consistency metrics
# ----------------------------------------------------------------------------------------------


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets (N, D) and (M, D) (FID/FVD's
    formula, Heusel et al. 2017): |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2).

    tr((C_a C_b)^1/2) is computed as the trace of (C_a^1/2 C_b C_a^1/2)^1/2, a symmetric PSD
    matrix, with eigendecompositions: stable when N < D makes the covariances singular. The
    estimate is biased upward at small N; compare it with two real sets of the same size.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance takes two feature sets (N, D) with the same D and N >= 2, "
                         f"got {a.shape} and {b.shape}")
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sa = _sqrt_psd(ca)
    cross = np.sqrt(np.linalg.eigvalsh(sa @ cb @ sa).clip(min=0)).sum()
    fd = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)
    return max(fd, 0.0)  # rounding can leave -1e-12 for identical sets


def temporal_consistency(videos: torch.Tensor) -> dict[str, float]:
    """uint8 (B, 3, T, H, W) -> mean over consecutive frame pairs of their cosine similarity (on the
    [-1, 1] scale, so uniform noise scores ~0 and an unchanging frame 1) and mean |difference|
    (on the [0, 1] scale: 0 for a still video, ~1/3 for uniform noise)."""
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[2] < 2:
        raise ValueError(f"temporal_consistency takes uint8 (B, 3, T, H, W) videos with T >= 2, "
                         f"got {videos.dtype} {tuple(videos.shape)}")
    x = videos.double() / 127.5 - 1.0
    a, b = x[:, :, :-1].transpose(1, 2).flatten(2), x[:, :, 1:].transpose(1, 2).flatten(2)  # (B, T-1, 3HW)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)  # (B, T-1)
    return {"cosine": float(cos.mean()), "l1": float((a - b).abs().mean() / 2)}


def flow_val_loss(encoded_dir: Path, dit: torch.nn.Module, seed: int,
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """The train_dit stage's validation loss (fixed timesteps, fixed noise) on the val latents of
    data/encoded, for the model being evaluated; {} when there are no val latents."""
    from components.train_dit import VAL_CLIPS, load_encoded, split_buckets, val_loss

    lat, text = load_encoded(encoded_dir)
    val = torch.tensor([i for i, s in enumerate(lat["split"]) if s == "val"][:VAL_CLIPS], dtype=torch.long)
    if len(val) == 0:
        return {}
    used = max(2, int(text["mask"].sum(1).max()))  # as train_dit: padding is masked anyway
    total = 0.0
    for x, ids in split_buckets(lat["latents"], val):  # per latent shape (native sizes), as train_dit
        c = lat["caption_index"][ids]
        total += val_loss(dit, x.to(device), text["tokens"][c, :used].float().to(device),
                          text["mask"][c, :used].to(device), seed) * len(ids)
    return {"flow_val_loss": total / len(val), "flow_val_clips": float(len(val))}


def _caption_distribution(encoded_dir: Path) -> dict[str, dict[str, float]] | None:
    """The training captions' attribute frequencies, which expansion fills open attributes from
    (what `zoetrope generate` reads from data/captions)."""
    from components.expand import distribution_from_captions
    from components.train_dit import load_encoded

    lat, text = load_encoded(encoded_dir)
    train = [text["captions"][int(c)] for c, s in zip(lat["caption_index"], lat["split"]) if s == "train"]
    return distribution_from_captions(train) if train else None


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
                 ckpt_dir: Path | None = None, device: str | torch.device = "cpu",
                 encoded_dir: Path | None = None) -> dict:
    """Every metric of the stage, the gates and the primary metric; writes `out_dir/report.md` and
    `out_dir/samples/`. `encoded_dir` (data/encoded) adds the flow-matching validation loss and the
    training captions' distribution that prompt expansion fills from."""
    from components.clips import load_clips
    from components.generate import T2VPipeline
    from components.judge import train_judge
    from components.metrics import psnr, ssim
    from components.vae import load_vae, to_unit
    from components.video_io import write_video

    t0 = time.time()
    rng = random.Random(cfg.seed + 101)
    torch.manual_seed(cfg.seed)
    clips = load_clips(clips_dir, cfg.data.size, cfg.data.frames)
    vae = load_vae(vae_path, device)
    metrics: dict[str, float] = {}

    # 1. Reconstruction on clips the VAE never trained on (val + held-out), each at its native
    # size; the mean over clips, and per aspect (per length: `_9f`) when the data has more than one.
    rows = clips.rows
    unseen = [i for i, r in enumerate(rows) if r["split"] in ("val", "heldout")]
    rng.shuffle(unseen)
    unseen = sorted(unseen[: cfg.eval.recon_clips])
    real_unseen = clips.video[unseen]  # the square view, for the judge
    shapes, recon_unseen = reconstruct_native(clips, vae, unseen, cfg, device)
    per_aspect: dict[str, list[tuple[int, float, float]]] = {}
    per_length: dict[str, list[tuple[int, float, float]]] = {}
    for bucket, real, recon in shapes:
        part = (len(real), psnr(to_unit(recon), to_unit(real)), ssim(to_unit(recon), to_unit(real)))
        per_aspect.setdefault(bucket.aspect, []).append(part)
        per_length.setdefault(f"{bucket.frames}f", []).append(part)
    for suffix, parts in [("", [p for ps in per_aspect.values() for p in ps]),
                          *((f"_{a}", ps) for a, ps in per_aspect.items() if len(per_aspect) > 1),
                          *((f"_{n}", ps) for n, ps in per_length.items() if len(per_length) > 1)]:
        n = sum(k for k, _, _ in parts)
        metrics[f"vae_psnr{suffix}"] = float(sum(k * p for k, p, _ in parts) / n)
        metrics[f"vae_ssim{suffix}"] = float(sum(k * q for k, _, q in parts) / n)

    # 2. The judge (`judge_training_set`): it grades one-object square generations of data.frames.
    judge_video, labels = judge_training_set(clips, vae, cfg, device)
    judge = train_judge(judge_video, labels, cfg.eval, cfg.seed, log=_prefixed(log, "judge/"),
                        ckpt_dir=ckpt_dir)
    graded = _graded_rows(rows, cfg.data.size, cfg.data.frames)
    single = [k for k, i in enumerate(unseen) if graded(rows[i])]
    unseen_labels = {a: [rows[unseen[k]][a] for k in single] for a in world.GRADED}
    for name, video in (("real", real_unseen[single]), ("recon", recon_unseen[single])):
        for attr, acc in judge.accuracy(video, unseen_labels).items():
            metrics[f"judge_{name}_{attr}"] = float(acc)

    # 3. Generation from canonical captions, graded by the judge.
    pipe = T2VPipeline.from_paths(vae_path, dit_path, max_tokens=cfg.text.max_tokens, device=device)
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)

    def generate(prompts: list[str]) -> torch.Tensor:  # -> uint8 (B, 3, T, H, W)
        videos = pipe.generate(prompts, seed=cfg.seed, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                               num_frames=cfg.data.frames, sampler=cfg.sample.sampler)  # (B, T, H, W, 3)
        return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).contiguous()

    generated: dict[str, tuple[list[dict[str, str]], torch.Tensor]] = {}
    for split, attrs_list in eval_prompts(cfg, rng).items():
        prompts = [world.caption(a) for a in attrs_list]
        videos = generate(prompts)
        generated[split] = (attrs_list, videos)
        for a, v in adherence(judge.predict(videos), attrs_list).items():
            metrics[f"adherence_{split}_{a}"] = v
        frames = np.ascontiguousarray(videos.permute(0, 2, 3, 4, 1).numpy())  # (B, T, H, W, 3)
        for i, (prompt, video) in enumerate(zip(prompts[:SAMPLE_GIFS], frames)):
            write_video(samples_dir / f"{split}_{i:02d}_{prompt.replace(' ', '_')[:60]}.gif", video, cfg.data.fps)
        write_video(samples_dir / f"grid_{split}.gif", _grid(frames), cfg.data.fps)

    # 3b. Samples at the data's other native shapes (landscape, portrait; shorter clips): seen
    # prompts generated at each such clip shape, for the report; the judge grades only the square
    # ones of data.frames frames above. `grid_<aspect>.gif` at data.frames, `grid_<aspect>_<T>f.gif`
    # at a shorter length.
    aspect_samples = []
    if "seen" in generated:
        seen_prompts = [world.caption(a) for a in generated["seen"][0][:ASPECT_SAMPLES]]
        graded_shape = (cfg.data.frames, cfg.data.size, cfg.data.size)
        for bucket in sorted(b for b in clips.shapes if (b.frames, b.height, b.width) != graded_shape):
            videos = pipe.generate(seen_prompts, seed=cfg.seed, steps=cfg.sample.steps,
                                   guidance=cfg.sample.guidance, num_frames=bucket.frames,
                                   sampler=cfg.sample.sampler, height=bucket.height, width=bucket.width)
            name = bucket.aspect if bucket.frames == cfg.data.frames else f"{bucket.aspect}_{bucket.frames}f"
            write_video(samples_dir / f"grid_{name}.gif", _grid(videos), cfg.data.fps)
            aspect_samples.append(name)

    # 4. Paraphrase robustness: the first seen prompts reworded, as written and as expanded.
    if cfg.eval.paraphrase_prompts and "seen" in generated:
        t1 = time.time()
        metrics.update(_paraphrase_metrics(generated["seen"], cfg, generate, judge, encoded_dir, samples_dir))
        metrics["paraphrase_seconds"] = time.time() - t1

    # 5. Fréchet distance of judge features and temporal consistency, generated against real clips
    # the judge never trained on, of the generations' length (a shorter clip's square view ends
    # still); two disjoint real sets of the same size give the distance's floor.
    gen_videos = torch.cat([v for _, v in generated.values()])
    pool = [i for i, r in enumerate(rows) if r["split"] in ("val", "heldout") and r["frames"] == cfg.data.frames]
    random.Random(cfg.seed + 202).shuffle(pool)  # its own stream: the prompts above stay as they were
    n = min(len(gen_videos), len(pool) // 2)
    if n >= 2:
        real_a, real_b = clips.video[sorted(pool[:n])], clips.video[sorted(pool[n:2 * n])]
        feats = {name: judge.features(v) for name, v in (("gen", gen_videos[:n]), ("a", real_a), ("b", real_b))}
        metrics["fd_generated"] = frechet_distance(feats["gen"], feats["a"])
        metrics["fd_real_baseline"] = frechet_distance(feats["b"], feats["a"])
        metrics["fd_clips"] = float(n)
        for name, videos in (("generated", gen_videos), ("real", real_a)):
            for k, v in temporal_consistency(videos).items():
                metrics[f"temporal_{k}_{name}"] = v

    # 6. The flow-matching loss at fixed timesteps on the val latents, for the evaluated weights.
    if encoded_dir is not None:
        metrics.update(flow_val_loss(encoded_dir, pipe.dit, cfg.seed, device))

    caption_metrics = caption_metrics or {}
    metrics["caption_accuracy"] = float(caption_metrics.get("val_acc_mean", float("nan")))
    thresholds = {g.name: getattr(cfg.gates, g.name) for g in GATES}
    gates = check_gates(metrics, thresholds)
    metrics["evaluate_seconds"] = time.time() - t0
    report = {"metrics": metrics, "gates": gates, "passed": all(g["passed"] for g in gates),
              "primary": primary_metric(metrics, cfg), "aspect_samples": aspect_samples}
    (out_dir / "report.md").write_text(report_markdown(report))
    return report


def adherence(pred: dict[str, list[str]], attrs_list: list[dict[str, str]]) -> dict[str, float]:
    """Share of videos whose judged attribute is the prompt's, per graded attribute and `all`."""
    hits = {a: [pred[a][i] == attrs[a] for i, attrs in enumerate(attrs_list)] for a in world.GRADED}
    out = {a: float(np.mean(h)) for a, h in hits.items()}
    out["all"] = float(np.mean([all(hits[a][i] for a in world.GRADED) for i in range(len(attrs_list))]))
    return out


def _paraphrase_metrics(seen: tuple[list[dict[str, str]], torch.Tensor], cfg: Config, generate, judge,
                        encoded_dir: Path | None, samples_dir: Path) -> dict[str, float]:
    """`paraphrase_<attr>`: adherence of the reworded prompts as written; `paraphrase_expanded_<attr>`:
    after prompt expansion (what `zoetrope generate` does by default); each `_gap_` is the
    canonical wording's adherence on the same attribute sets minus it (0: robust). The same seed
    gives the same starting noise to the k-th video of any batch (schedule.initial_noise draws
    row by row), so each paraphrase is compared with its canonical video on the same noise."""
    from components.expand import expand
    from components.video_io import write_video

    attrs_all, canonical_videos = seen
    k = min(cfg.eval.paraphrase_prompts, len(attrs_all))
    attrs_list, canonical_videos = attrs_all[:k], canonical_videos[:k]
    canonical = adherence(judge.predict(canonical_videos), attrs_list)
    texts = paraphrase_prompts(attrs_list, cfg.seed)
    raw = generate(texts)
    out: dict[str, float] = {"paraphrase_prompts": float(k)}
    for a, v in adherence(judge.predict(raw), attrs_list).items():
        out[f"paraphrase_{a}"] = v
        out[f"paraphrase_gap_{a}"] = canonical[a] - v
    distribution = _caption_distribution(encoded_dir) if encoded_dir is not None else None
    expanded = [expand(t, seed=cfg.seed, cfg=cfg.expand, distribution=distribution) for t in texts]
    out["paraphrase_grounded"] = float(np.mean([all(e["attributes"][a] == attrs[a] for a in world.GRADED)
                                                for e, attrs in zip(expanded, attrs_list)]))
    captions = [e["caption"] for e in expanded]
    # Expansion that lands on the canonical captions makes the canonical videos: reuse them.
    same = captions == [world.caption(a) for a in attrs_list]
    videos = canonical_videos if same else generate(captions)
    for a, v in adherence(judge.predict(videos), attrs_list).items():
        out[f"paraphrase_expanded_{a}"] = v
        out[f"paraphrase_expanded_gap_{a}"] = canonical[a] - v
    write_video(samples_dir / "grid_paraphrase.gif", _grid(np.ascontiguousarray(raw.permute(0, 2, 3, 4, 1).numpy())), cfg.data.fps)
    (samples_dir / "paraphrases.txt").write_text(
        "".join(f"{i:02d}\t{world.caption(a)}\t{t}\t{c}\n" for i, (a, t, c) in enumerate(zip(attrs_list, texts, captions))))
    return out


def primary_metric(metrics: dict[str, float], cfg: Config) -> dict:
    """The figure champion/challenger compares (`gates.primary_metric`, `gates.primary_direction`)."""
    name = cfg.gates.primary_metric
    if name not in metrics:
        raise KeyError(f"gates.primary_metric={name!r} is not an evaluation metric: use one of "
                       f"{', '.join(sorted(metrics))}")
    return {"metric": name, "direction": cfg.gates.primary_direction, "value": float(metrics[name])}


def _fmt(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.4g}" if key in metrics else "–"


def report_markdown(report: dict) -> str:
    """The run's evaluation report: gates, the primary metric, generation metrics side by side,
    every metric, and the sample grids (paths relative to the report, as in MLflow's artifacts)."""
    m = report["metrics"]
    lines = ["# Evaluation", "", "## Gates", "", "| gate | value | threshold | result | margin |",
             "|---|---|---|---|---|"]
    for g in report["gates"]:
        lines.append(f"| {g['name']} | {g['value']:.4g} | {g['op']} {g['threshold']:.4g} | "
                     f"{'pass' if g['passed'] else '**FAIL**'} | {g['margin']:+.4g} |")
    primary = report.get("primary")
    if primary:
        lines += ["", f"Primary metric (champion/challenger): `{primary['metric']}` = {primary['value']:.4g} "
                      f"({primary['direction']} is better)."]
    lines += ["", "## Prompt adherence", "",
              "| attribute | seen | held-out | paraphrased | paraphrased, expanded |", "|---|---|---|---|---|"]
    for a in (*world.GRADED, "all"):
        lines.append(f"| {a} | {_fmt(m, f'adherence_seen_{a}')} | {_fmt(m, f'adherence_heldout_{a}')} | "
                     f"{_fmt(m, f'paraphrase_{a}')} (gap {_fmt(m, f'paraphrase_gap_{a}')}) | "
                     f"{_fmt(m, f'paraphrase_expanded_{a}')} (gap {_fmt(m, f'paraphrase_expanded_gap_{a}')}) |")
    lines += ["", f"Paraphrases: {_fmt(m, 'paraphrase_prompts')} seen prompts reworded (`samples/paraphrases.txt`); "
                  f"share that prompt expansion grounded to the intended attributes: {_fmt(m, 'paraphrase_grounded')}. "
                  "Gap: canonical wording's adherence on the same prompts minus the paraphrase's.",
              "", "## Distribution and consistency", "", "| metric | generated | real |", "|---|---|---|",
              f"| Fréchet distance of judge features ({_fmt(m, 'fd_clips')} clips per set) | "
              f"{_fmt(m, 'fd_generated')} | {_fmt(m, 'fd_real_baseline')} (two disjoint real sets) |",
              f"| temporal consistency: cosine of consecutive frames | {_fmt(m, 'temporal_cosine_generated')} | "
              f"{_fmt(m, 'temporal_cosine_real')} |",
              f"| temporal consistency: mean abs. frame difference | {_fmt(m, 'temporal_l1_generated')} | "
              f"{_fmt(m, 'temporal_l1_real')} |",
              f"| VAE reconstruction PSNR / SSIM (native sizes) | – | {_fmt(m, 'vae_psnr')} dB / {_fmt(m, 'vae_ssim')} |",
              *(f"| VAE reconstruction PSNR / SSIM, {a} clips | – | {_fmt(m, f'vae_psnr_{a}')} dB / "
                f"{_fmt(m, f'vae_ssim_{a}')} |" for a in ("square", "landscape", "portrait") if f"vae_psnr_{a}" in m),
              *(f"| VAE reconstruction PSNR / SSIM, {k[len('vae_psnr_'):-1]}-frame clips | – | {_fmt(m, k)} dB / "
                f"{_fmt(m, 'vae_ssim_' + k[len('vae_psnr_'):])} |"
                for k in sorted(m, key=lambda k: (len(k), k)) if re.fullmatch(r"vae_psnr_\d+f", k)),
              f"| flow-matching validation loss (fixed timesteps, {_fmt(m, 'flow_val_clips')} clips) | "
              f"{_fmt(m, 'flow_val_loss')} | – |"]
    lines += ["", "## Every metric", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(m.items())]
    lines += ["", "## Samples", ""]
    for name, key in (("seen", "adherence_seen_all"), ("heldout", "adherence_heldout_all"),
                      ("paraphrase", "paraphrase_all")):
        if key in m:
            lines.append(f"![{name}](samples/grid_{name}.gif)")
    for aspect in report.get("aspect_samples", []):  # seen prompts at the data's other native sizes
        lines.append(f"![{aspect}](samples/grid_{aspect}.gif)")
    return "\n".join(lines) + "\n"


def reconstruct_native(clips, vae, idx: list[int], cfg: Config, device: str | torch.device = "cpu"
                       ) -> tuple[list[tuple[Any, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Clips `idx` reconstructed at their native sizes -> per shape (bucket, real, recon), both
    uint8, and every reconstruction's square view in `idx` order (for the judge)."""
    from components.clips import to_square
    from components.vae import reconstruct, to_uint8

    pos = {i: k for k, i in enumerate(idx)}
    square = torch.empty((len(idx), 3, cfg.data.frames, cfg.data.size, cfg.data.size), dtype=torch.uint8)
    shapes = []
    for bucket, ids, real in clips.native(idx):
        recon = to_uint8(reconstruct(vae, real, device))
        square[[pos[i] for i in ids]] = to_square(recon, cfg.data.size, cfg.data.frames)
        shapes.append((bucket, real, recon))
    return shapes, square


def judge_training_set(clips, vae, cfg: Config, device: str | torch.device = "cpu"
                       ) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """The judge's training clips (uint8 square views) and labels: real one-object train clips
    plus VAE reconstructions of half of them (a judge that never saw decoder output under-rates it).

    It grades one-object prompts, and a second object would make its labels (the first's)
    ambiguous. A fixed-size classifier, it grades square generations, so it learns from square
    clips where the data has them: a landscape clip squeezed into a square turns circles into
    ellipses (with all three aspects its shape accuracy on unseen real clips fell from 0.98 to
    0.92). Likewise it learns from clips of `data.frames` frames, the length it grades: a shorter
    clip's square view ends on repeated frames (components/clips.py), a motion that stops, which
    no generation shows.
    """
    rows = clips.rows
    graded = _graded_rows(rows, cfg.data.size, cfg.data.frames)
    train_idx = [i for i, r in enumerate(rows) if r["split"] == "train" and graded(r)]
    recon_idx = train_idx[::2]
    _, recon = reconstruct_native(clips, vae, recon_idx, cfg, device)
    video = torch.cat([clips.video[train_idx], recon])
    labels = {a: [rows[i][a] for i in train_idx] + [rows[i][a] for i in recon_idx] for a in world.GRADED}
    return video, labels


def _graded_rows(rows: list[dict], size: int, frames: int | None = None):
    """The test for clips like the ones the judge grades: one object, square `size` x `size` (or
    any shape when the data holds no square clip: the judge then sees square views of them) and
    `frames` long (or any length when no clip is that long)."""
    square = any((r["height"], r["width"]) == (size, size) for r in rows)
    full = frames is not None and any(r["frames"] == frames for r in rows)
    return lambda r: (_one_object(r) and (not square or (r["height"], r["width"]) == (size, size))
                      and (not full or r["frames"] == frames))


def _one_object(row: dict) -> bool:
    """One object, or unknown (older manifests): the clips the judge trains on and grades."""
    return row.get("objects") in (None, 1)


def _prefixed(log: LogFn | None, prefix: str) -> LogFn | None:
    if log is None:
        return None
    return lambda step, m: log(step, {f"{prefix}{k}": v for k, v in m.items()})
