"""Typed configuration: one frozen dataclass per `params.yaml` section, key for key.

`params.yaml` owns every number. Its top level is the default profile (`tiny`); named profiles
under `profiles:` overlay it, and `--set section.key=value` overlays that. The merged mapping is
validated here: an unknown key, a wrong type or an impossible value fails with its dotted name.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad key or value in params.yaml, a profile or an override."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    num_videos: int = 3000  # synthetic videos written by the generator
    raw_size: int = 64  # the generator writes MP4 at this size; prepare resizes to `size`
    size: int = 32  # training clip height and width
    frames: int = 17  # frames per (longest) clip, 1 + 4k so the causal VAE's time axis divides
    fps: int = 8
    caption_fraction: float = 0.2  # share of clips whose ground-truth caption training may see
    heldout_fraction: float = 0.15  # share of colour-shape-motion triples never trained on
    val_fraction: float = 0.05  # share of seen clips kept for validation metrics
    max_bad_fraction: float = 0.2  # prepare fails when more input files than this are broken
    shard_size: int = 512  # clips per shard
    workers: int = 2  # decoding processes (0: one per CPU core)
    source: str = "synthetic"  # "synthetic" (the embedded world) or a folder of your own videos
    two_object_fraction: float = 0.25  # share of synthetic videos with a second object
    min_duration: float = 2.0  # synthetic video length range in seconds (at least one clip long)
    max_duration: float = 4.0
    # Native clip sizes "HxW" (Sora trains on native aspects): each video is resized to the one
    # nearest its aspect ratio. Empty: one square `size` x `size`. `size` stays the side of the
    # square view that the fixed-size captioner and judge see (components/clips.py).
    aspects: tuple[str, ...] = ()
    # Clip lengths in frames (each 1 + 4k, the longest `frames`): prepare cuts one clip per video,
    # its length drawn balanced over these entries (seeded), so listing a length twice draws it
    # twice as often. Empty: every clip `frames` long. `frames` stays the length the captioner
    # and the judge see and evaluation generates (shorter clips: components/clips.py).
    clip_frames: tuple[int, ...] = ()

    @property
    def clip_lengths(self) -> list[int]:
        """The distinct clip lengths (frames), shortest first."""
        return sorted(set(self.clip_frames)) or [self.frames]

    @property
    def clip_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every native clip size, in `aspects` order."""
        return [parse_aspect(a) for a in self.aspects] or [(self.size, self.size)]

    def raw_side(self, side: int) -> int:
        """The synthetic MP4's side for a clip side: `raw_size / size` times it."""
        return side * self.raw_size // self.size

    def validate(self) -> None:
        _check(bool(self.source.strip()), "data.source", self.source,
               "use synthetic or the path of a folder of videos")
        _check(self.workers >= 0, "data.workers", self.workers, "use 0 (one per core) or more")
        _check((self.frames - 1) % 4 == 0, "data.frames", self.frames, "use 1 + 4k frames (5, 9, 17, 33)")
        _check(self.size % 8 == 0, "data.size", self.size, "use a multiple of 8")
        _check(self.raw_size >= self.size, "data.raw_size", self.raw_size, "must be >= data.size")
        for name in ("caption_fraction", "heldout_fraction", "val_fraction", "max_bad_fraction"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"data.{name}", v, "use a fraction in [0, 1)")
        _check(self.num_videos >= 50, "data.num_videos", self.num_videos, "use at least 50")
        # A second object's colour comes after the first's, so 1/7 of videos (white first) have none.
        _check(0.0 <= self.two_object_fraction <= 0.8, "data.two_object_fraction",
               self.two_object_fraction, "use a fraction in [0, 0.8]")
        _check(self.min_duration > 0, "data.min_duration", self.min_duration, "use seconds > 0")
        _check(self.max_duration >= self.min_duration, "data.max_duration", self.max_duration,
               f"use at least data.min_duration ({self.min_duration})")
        for n in self.clip_frames:
            _check(n >= 5 and (n - 1) % 4 == 0, "data.clip_frames entry", n,
                   "use 1 + 4k frames of at least 5 (5, 9, 13, 17): the causal VAE's time_down is 4")
        if self.clip_frames:
            _check(max(self.clip_frames) == self.frames, "data.clip_frames", list(self.clip_frames),
                   f"make data.frames ({self.frames}) the longest length: it is the length the captioner, "
                   f"the judge and evaluation use (changing data.frames, set data.clip_frames with it, "
                   f"e.g. [{self.frames}])")
        ratios: dict[float, str] = {}
        for a in self.aspects:
            try:
                h, w = parse_aspect(a)
            except ValueError:
                raise ConfigError(f"data.aspects entry {a!r} is invalid: write HEIGHTxWIDTH, "
                                  f"e.g. 24x40 (landscape)") from None
            _check(h % 8 == 0 and w % 8 == 0 and h > 0 and w > 0, "data.aspects entry", a,
                   "use sides that are multiples of 8 (VAE space_down 4 x DiT patch 2), e.g. 24x40")
            _check(h * self.raw_size % self.size == 0 and w * self.raw_size % self.size == 0,
                   "data.aspects entry", a, f"the synthetic video is data.raw_size / data.size = "
                   f"{self.raw_size}/{self.size} times each side: use sides it scales to whole pixels")
            # prepare gives each video the size nearest its aspect ratio: two sizes of one ratio
            # could never both be chosen.
            _check(h / w not in ratios, "data.aspects entry", a,
                   f"it has the aspect ratio of {ratios.get(h / w)}: keep one size per ratio")
            ratios[h / w] = a


@dataclass(frozen=True)
class IngestConfig:
    """Ingesting a folder of the user's own videos (`data.source` a path; components/ingest.py)."""

    scene_threshold: float = 0.3  # mean |frame difference| in [0, 1] (at data.fps) that is a cut
    max_clips_per_scene: int = 4  # consecutive non-overlapping clips taken from one scene
    min_motion: float = 0.0  # drop clips whose motion_score is below this; 0 keeps still clips
    dedup_max_distance: int = 12  # perceptual-hash bits (of 192) within which two clips are duplicates

    def validate(self) -> None:
        _check(0.0 < self.scene_threshold <= 1.0, "ingest.scene_threshold", self.scene_threshold,
               "use a mean frame difference in (0, 1]")
        _check(self.max_clips_per_scene >= 1, "ingest.max_clips_per_scene", self.max_clips_per_scene,
               "use at least 1")
        _check(0.0 <= self.min_motion < 1.0, "ingest.min_motion", self.min_motion,
               "use [0, 1); 0 disables the motion filter")
        _check(0 <= self.dedup_max_distance < 192, "ingest.dedup_max_distance", self.dedup_max_distance,
               "use 0 (exact duplicates only) to 191 bits")


@dataclass(frozen=True)
class ExpandConfig:
    """Prompt expansion (components/expand.py)."""

    backend: str = "minilm"  # minilm (embedded, offline) | openai (any OpenAI-compatible endpoint)
    min_similarity: float = 0.5  # cosine a non-anchor word needs to ground to its nearest anchor
    llm_url: str = ""  # e.g. http://localhost:8000/v1; or $ZOETROPE_LLM_URL. Key: $ZOETROPE_LLM_API_KEY
    llm_model: str = ""
    llm_timeout: float = 30.0

    def validate(self) -> None:
        _check(self.backend in ("minilm", "openai"), "expand.backend", self.backend, "use minilm or openai")
        _check(0.0 < self.min_similarity <= 1.0, "expand.min_similarity", self.min_similarity,
               "use a cosine in (0, 1]")
        _check(self.llm_timeout > 0, "expand.llm_timeout", self.llm_timeout, "use a positive number of seconds")


@dataclass(frozen=True)
class CaptionConfig:
    width: int = 64  # video-encoder channels and decoder width
    layers: int = 2  # decoder layers
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    max_words: int = 24
    # Per-frame H/4 tokens and one token per palette colour (ObjectReader) in the decoder's memory,
    # with per-object auxiliary heads: for data with two objects a clip. They cost 1.26x a training
    # step and about 2.5x the captioning time, and one-object data needs none of it.
    object_tokens: bool = False
    # With object_tokens: each word's input carries the object token of the colour named last
    # (Captioner.slots), so the words after a colour describe that colour's object.
    object_slots: bool = False
    # Share of each training batch's one-object clips given a second object pasted from a
    # labelled black-background clip (`captioner.ObjectPaster`): two-object examples for the
    # object tokens to learn from beyond the few labelled two-object clips. 0 turns it off.
    paste_fraction: float = 0.0

    def validate(self) -> None:
        _check(self.steps > 0, "caption.steps", self.steps, "use a positive number of steps")
        _check(self.object_tokens or not self.object_slots, "caption.object_slots", self.object_slots,
               "set caption.object_tokens=true too (the slots are its object tokens)")
        _check(0.0 <= self.paste_fraction <= 1.0, "caption.paste_fraction", self.paste_fraction,
               "use a share between 0 and 1")


@dataclass(frozen=True)
class VAEConfig:
    base_channels: int = 32
    latent_channels: int = 4
    time_down: int = 4  # temporal compression (1, 2 or 4); causal: first frame stands alone
    space_down: int = 4  # spatial compression (4 or 8)
    patch: int = 2  # pixel (un)shuffle factor before the first conv; the rest of space_down is strided
    kl_weight: float = 1e-6
    mse_weight: float = 1.0  # L2 beside the L1 reconstruction loss: PSNR is an L2 measure
    edge_weight: float = 0.0  # extra weight of the reconstruction error at the clip's edges
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    grad_clip: float = 1.0
    # Frames of the window each training batch crops from its clips (0: the whole clip). The VAE
    # is convolutional and causal, so a shorter window teaches it the same mapping at a fraction of
    # the cost per step; it is still evaluated (and used) on whole clips.
    train_frames: int = 0
    # The share of the steps, at the end, that trains on whole clips: windows never show the later
    # latent frames, which a causal VAE tells apart from the first (blurrier without these steps).
    full_clip_fraction: float = 0.0
    # A second phase after the joint training: the encoder frozen (so the latents, and what the
    # DiT learns from them, do not change), the decoder alone trained on whole clips for this many
    # steps at decoder_lr, its error weighted by decoder_edge_weight (see edge_weight). 0: none.
    decoder_steps: int = 0
    decoder_lr: float = 1e-3
    decoder_edge_weight: float = 0.0
    # Noise added to the latents the decoder phase decodes: per clip a level drawn uniformly in
    # [0, decoder_noise], in units of each latent channel's std. 0: none.
    decoder_noise: float = 0.0

    def validate(self) -> None:
        _check(self.decoder_steps >= 0, "vae.decoder_steps", self.decoder_steps,
               "use 0 (no decoder phase) or a positive number of steps")
        _check(self.decoder_lr > 0, "vae.decoder_lr", self.decoder_lr, "use a positive learning rate")
        _check(self.decoder_noise >= 0, "vae.decoder_noise", self.decoder_noise,
               "use a noise level >= 0 (0 adds none)")
        _check(self.edge_weight >= 0 and self.decoder_edge_weight >= 0, "vae.edge_weight / decoder_edge_weight",
               (self.edge_weight, self.decoder_edge_weight), "use weights >= 0 (0 turns the edge weight off)")
        _check(self.train_frames == 0 or (self.train_frames - 1) % self.time_down == 0, "vae.train_frames",
               self.train_frames, f"use 0 (whole clips) or 1 + k * vae.time_down ({self.time_down}) frames")
        _check(0.0 <= self.full_clip_fraction <= 1.0, "vae.full_clip_fraction", self.full_clip_fraction,
               "use a share of the steps in [0, 1]")
        _check(self.time_down in (1, 2, 4), "vae.time_down", self.time_down, "use 1, 2 or 4")
        _check(self.space_down in (4, 8), "vae.space_down", self.space_down, "use 4 or 8")
        _check(self.patch in (1, 2, 4) and self.patch <= self.space_down, "vae.patch", self.patch,
               "use 1, 2 or 4, at most vae.space_down")


@dataclass(frozen=True)
class TextConfig:
    max_tokens: int = 32  # MiniLM tokens kept per caption (padding is masked)


@dataclass(frozen=True)
class DiTConfig:
    preset: str = "tiny"  # size preset from components.dit.DIT_PRESETS
    patch_t: int = 1
    patch_h: int = 2
    patch_w: int = 2
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.995
    cond_dropout: float = 0.1  # caption dropout that teaches the unconditional branch for CFG
    shift: float = 2.0  # timestep shift at `shift_tokens` latent tokens (schedule.token_shift)
    shift_tokens: int = 80  # the token count `shift` is set for; it grows as sqrt(tokens / this)
    # REPA (Yu et al. 2024): block `repa_block`'s tokens, through a small projector, are pulled
    # towards the captioner's video features of the clean clip (cosine), weighted by this; 0 = off.
    repa_weight: float = 0.0
    repa_block: int = 2

    def validate(self) -> None:
        _check(0.0 <= self.ema < 1.0, "dit.ema", self.ema, "use a decay in [0, 1)")
        _check(self.shift >= 1.0, "dit.shift", self.shift, "use a shift >= 1 (1 = no shift)")
        _check(self.shift_tokens >= 1, "dit.shift_tokens", self.shift_tokens, "use a positive token count")
        _check(0.0 <= self.cond_dropout < 1.0, "dit.cond_dropout", self.cond_dropout, "use [0, 1)")
        _check(self.repa_weight >= 0.0, "dit.repa_weight", self.repa_weight, "use a weight >= 0 (0 = off)")
        _check(self.repa_block >= 1, "dit.repa_block", self.repa_block, "use a block number from 1")


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 25
    guidance: float = 6.0
    sampler: str = "euler"  # euler | heun

    def validate(self) -> None:
        _check(self.sampler in ("euler", "heun"), "sample.sampler", self.sampler, "use euler or heun")
        _check(self.steps > 0, "sample.steps", self.steps, "use a positive number of steps")


@dataclass(frozen=True)
class EvalConfig:
    judge_steps: int = 600  # attribute classifier that grades generated videos
    judge_batch_size: int = 32
    judge_width: int = 64  # judge's video-encoder channels
    judge_lr: float = 2e-3
    prompts_per_split: int = 24  # generated videos per split (seen / held-out combinations)
    recon_clips: int = 128  # held-out clips for VAE PSNR/SSIM
    paraphrase_prompts: int = 16  # seen prompts also generated reworded (paraphrase robustness); 0: off

    def validate(self) -> None:
        _check(self.paraphrase_prompts >= 0, "eval.paraphrase_prompts", self.paraphrase_prompts,
               "use 0 (off) or a positive number of prompts")


@dataclass(frozen=True)
class GatesConfig:
    vae_psnr_min: float = 22.0
    caption_accuracy_min: float = 0.8
    adherence_color_min: float = 0.6  # chance is 1/7
    adherence_shape_min: float = 0.5  # chance is 1/3
    adherence_motion_min: float = 0.4  # chance is 1/6
    onnx_max_abs_diff: float = 1e-3
    # Champion/challenger: a version passing every gate takes `champion` only when it is at least
    # as good as the current champion on this evaluation metric (flows/registry.py).
    primary_metric: str = "adherence_seen_all"
    primary_direction: str = "higher"  # higher | lower: which way is better

    def validate(self) -> None:
        _check(self.primary_direction in ("higher", "lower"), "gates.primary_direction",
               self.primary_direction, "use higher or lower")
        _check(bool(self.primary_metric.strip()), "gates.primary_metric", self.primary_metric,
               "name a metric of reports/evaluation.json, e.g. adherence_seen_all")


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18


@dataclass(frozen=True)
class DaskConfig:
    """Where prepare and caption run their per-shard work (flows/shards.py, prefect-dask).

    Not a DVC param of any stage: the outputs are the same wherever the shards ran."""

    enabled: bool = True  # false: the same per-shard functions in a plain loop (no Prefect, no Dask)
    address: str = ""  # "" starts a local cluster per stage; else a scheduler, e.g. tcp://10.0.0.5:8786
    workers: int = 2  # local cluster workers (0: one per CPU core)
    processes: bool = True  # local workers as processes (false: threads of the stage process)

    def validate(self) -> None:
        _check(self.workers >= 0, "dask.workers", self.workers, "use 0 (one per core) or more")
        _check(self.address == "" or "://" in self.address, "dask.address", self.address,
               'use "" for a local cluster or a scheduler address such as tcp://HOST:8786')


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    expand: ExpandConfig = field(default_factory=ExpandConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dask: DaskConfig = field(default_factory=DaskConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        _check(self.vae.train_frames <= self.data.frames, "vae.train_frames", self.vae.train_frames,
               f"use at most data.frames ({self.data.frames}), or 0 for whole clips")

    def to_dict(self) -> dict[str, Any]:
        # Lists, not tuples: YAML (safe_dump) and JSON readers take them.
        return dataclasses.asdict(self, dict_factory=lambda kv: {k: list(v) if isinstance(v, tuple) else v
                                                                 for k, v in kv})

    def flat(self) -> dict[str, Any]:
        """`{"dit.lr": 0.002, ...}`: the flat, comparable form logged as MLflow params."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


# ----------------------------------------------------------------------------------------------
# Loading, profiles, overrides
# ----------------------------------------------------------------------------------------------


def parse_aspect(text: str) -> tuple[int, int]:
    """"24x40" -> (24, 40): a clip size written HEIGHTxWIDTH."""
    h, sep, w = str(text).strip().lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise ValueError(f"clip size {text!r} is invalid: write HEIGHTxWIDTH, e.g. 24x40")
    return int(h), int(w)


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` (no decimal point) as a string
            return float(value)
        except ValueError:
            pass
    if tp == tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{name}={value!r} should be a list of strings, e.g. [32x32, 24x40]")
        return tuple(items)
    if tp == tuple[int, ...]:
        items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)) or not all(type(v) is int for v in items):
            raise ConfigError(f"{name}={value!r} should be a list of integers, e.g. [9, 17]")
        return tuple(items)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{name}={value!r} should be {tp.__name__}, got {type(value).__name__}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover - internal invariant


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'params'} should be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}: known keys are {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        full = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, full)
        else:
            kwargs[name] = _coerce(value, tp, full)
    return cls(**kwargs)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"dit.lr=1e-3"` -> (["dit", "lr"], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} should look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return path, value


def overrides_to_dict(overrides: typing.Iterable[str]) -> dict:
    out: dict = {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def resolve(raw: dict, profile: str = "tiny", overrides: dict | None = None) -> Config:
    """Merge the default profile, a named profile and overrides, then validate."""
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    if profile != "tiny":
        if profile not in profiles:
            known = ", ".join(["tiny", *sorted(profiles)])
            raise ConfigError(f"unknown profile {profile!r}: known profiles are {known}")
        raw = deep_merge(raw, profiles[profile])
    if overrides:
        raw = deep_merge(raw, overrides)
    cfg = _build(Config, raw, "")
    cfg.validate()
    return cfg


def load(path: str | Path, profile: str = "tiny", overrides: dict | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project folder or pass --params")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    return resolve(raw, profile, overrides)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as stored beside checkpoints)."""
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

