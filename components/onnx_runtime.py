"""Text-to-video with ONNX Runtime: the serving backend, free of torch.

Reads the bundle that `components/export.py` writes (see docs/architecture.md, "models/onnx/")
and samples exactly as the PyTorch pipeline does: the same numpy schedule and seeded noise
(`components/schedule.py`), Euler or Heun from t = 1 to 0, classifier-free guidance with the
empty prompt as the unconditional branch, conditional and unconditional batched into one DiT call.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from components import schedule

BUNDLE_FILES = ("text_encoder.onnx", "dit.onnx", "vae_decoder.onnx", "tokenizer.json", "bundle.json")
# The DiT split for serving (components/dit_serving.py): its caption and timestep conditioning
# once per generation, then one cheaper graph per step. Bundles exported before it lack them and
# run `dit.onnx` every step.
SPLIT_DIT_FILES = ("dit_condition.onnx", "dit_step.onnx")
# Optional half-precision graphs for GPUs (float32 inputs and outputs, fp16 inside).
FP16_FILES = {"dit": "dit_fp16.onnx", "dit_step": "dit_step_fp16.onnx", "vae_decoder": "vae_decoder_fp16.onnx"}
PRECISIONS = ("auto", "fp32", "fp16")
SAMPLERS = ("euler", "heun")


# ----------------------------------------------------------------------------------------------
# Execution providers
# ----------------------------------------------------------------------------------------------


def _cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver). Honours CUDA_VISIBLE_DEVICES."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    try:
        if libcuda.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except AttributeError:  # a stub library without the driver API
        return 0


def _nvidia_smi_sees_gpu() -> bool:
    if not Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def has_gpu() -> bool:
    """True only when a CUDA GPU really exists.

    onnxruntime-gpu lists CUDAExecutionProvider whether or not there is a GPU, and logs errors
    when asked for it without one, so its provider list is no evidence.
    """
    return _cuda_device_count() > 0 or _nvidia_smi_sees_gpu()


def available_providers(prefer_gpu: bool = True) -> list[str]:
    """ONNX Runtime providers to request, best first: CUDA only where a GPU exists, then CPU."""
    providers = ["CPUExecutionProvider"]
    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers() and has_gpu():
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def _preload_cuda_libraries() -> None:
    # The CUDA and cuDNN pip wheels (onnxruntime-gpu[cuda,cudnn]) are not on the loader path;
    # ORT finds them only once preloaded. Without them it uses the system's libraries.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # noqa: BLE001 - missing wheels are fine where the system has CUDA
            pass


# ----------------------------------------------------------------------------------------------
# Bundle metadata
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this bundle: frames are 1 + k * time_down, at most max_frames."""

    time_down: int
    max_frames: int
    default_frames: int

    def check_frames(self, num_frames: Any) -> int:
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
            raise ValueError(f"num_frames={num_frames!r} is invalid: use an integer")
        n = int(num_frames)
        if n < 1 or (n - 1) % self.time_down != 0 or n > self.max_frames:
            raise ValueError(
                f"num_frames={n} is invalid: use 1 + k*{self.time_down} frames, "
                f"at most {self.max_frames} (e.g. {self.allowed_frames()})"
            )
        return n

    def allowed_frames(self) -> list[int]:
        return list(range(1, self.max_frames + 1, self.time_down))


def _bucket_sizes(buckets: list, path: Path) -> tuple[tuple[int, int], ...]:
    """(height, width) of each "FRAMESxHEIGHTxWIDTH" bucket in bundle.json, distinct, in order."""
    sizes: list[tuple[int, int]] = []
    for b in buckets:
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", str(b))
        if m is None:
            raise ValueError(f"{path}: bucket {b!r} is not FRAMESxHEIGHTxWIDTH: re-export the bundle")
        hw = (int(m.group(2)), int(m.group(3)))
        if hw not in sizes:
            sizes.append(hw)
    return tuple(sizes)


@dataclass(frozen=True)
class BundleInfo:
    """`bundle.json`, typed: a missing key fails with its name; `raw` keeps the whole file for /info.

    The timestep shift is `shift` when the bundle fixes one, else `schedule.token_shift` of the
    DiT's token count (`dit.num_tokens`: latent t*h*w over the `patch` volume) with the trained
    `shift_base` / `shift_tokens`, as in training.
    """

    latent_channels: int
    latent_mean: tuple[float, ...]
    latent_std: tuple[float, ...]
    time_down: int
    space_down: int
    frames: int
    size: int
    fps: int
    max_tokens: int
    steps: int
    guidance: float
    sampler: str
    shift: float | None  # fixed timestep shift; None: schedule.token_shift(latent tokens, ...)
    shift_base: float  # token_shift's shift at `shift_tokens` tokens (the DiT's dit.shift)
    shift_tokens: int
    patch: tuple[int, int, int]  # DiT patch (t, h, w): latent tokens = t*h*w / prod(patch)
    max_frames: int
    raw: dict
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width) of the trained clip shapes; () = square `size`

    @classmethod
    def load(cls, path: Path) -> BundleInfo:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read bundle metadata ({exc})") from None

        def need(key: str, where: dict = raw, prefix: str = "") -> Any:
            if key not in where:
                raise ValueError(f"{path}: missing key {prefix}{key}: re-export the bundle")
            return where[key]

        sample = need("sample")
        shift = raw.get("shift")
        if shift is None and "patch" not in raw:
            raise ValueError(f"{path}: needs `shift` (a number) or `patch` ([t, h, w]) to set the "
                             "sampling schedule: re-export the bundle")
        patch = raw.get("patch", (1, 1, 1))
        info = cls(
            latent_channels=int(need("latent_channels")),
            latent_mean=tuple(float(v) for v in need("latent_mean")),
            latent_std=tuple(float(v) for v in need("latent_std")),
            time_down=int(need("time_down")),
            space_down=int(need("space_down")),
            frames=int(need("frames")),
            size=int(need("size")),
            fps=int(need("fps")),
            max_tokens=int(need("max_tokens")),
            steps=int(need("steps", sample, "sample.")),
            guidance=float(need("guidance", sample, "sample.")),
            sampler=str(need("sampler", sample, "sample.")),
            shift=None if shift is None else float(shift),
            shift_base=float(raw.get("shift_base", schedule.LEGACY_SHIFT)),  # bundles before dit.shift
            shift_tokens=int(raw.get("shift_tokens", schedule.LEGACY_SHIFT_TOKENS)),
            patch=tuple(int(p) for p in patch),  # type: ignore[arg-type]
            max_frames=int(raw.get("max_frames", raw["frames"])),
            raw=raw,
            sizes=_bucket_sizes(raw.get("buckets") or [], path),
        )
        c = info.latent_channels
        if len(info.latent_mean) != c or len(info.latent_std) != c:
            raise ValueError(f"{path}: latent_mean/latent_std should have {c} values (latent_channels)")
        return info

    @property
    def aspects(self) -> dict[str, tuple[int, int]]:
        """"W:H" (reduced) -> (height, width) of each trained clip shape, square first."""
        sizes = self.sizes or ((self.size, self.size),)
        out: dict[str, tuple[int, int]] = {}
        for h, w in sorted(sizes, key=lambda hw: (hw[0] != hw[1], hw)):
            g = math.gcd(h, w)
            out.setdefault(f"{w // g}:{h // g}", (h, w))
        return out

    def size_for_aspect(self, aspect: str) -> tuple[int, int]:
        """(height, width) of the trained clip shape with this width:height; ValueError names them."""
        known = self.aspects
        if aspect not in known:
            raise ValueError(f"aspect={aspect!r} is invalid: this model was trained on "
                             f"{', '.join(f'{a} ({w}x{h})' for a, (h, w) in known.items())}; send one of those")
        return known[aspect]

    @property
    def limits(self) -> Limits:
        return Limits(time_down=self.time_down, max_frames=self.max_frames, default_frames=self.frames)

    def latent_shape(self, num_frames: int, height: int | None = None,
                     width: int | None = None) -> tuple[int, int, int, int]:
        """(c, t, h, w) for a video of `num_frames` frames of `height` x `width` (default: the
        trained `size` square); the causal VAE keeps frame 0 alone."""
        h, w = (height or self.size) // self.space_down, (width or self.size) // self.space_down
        return (self.latent_channels, 1 + (num_frames - 1) // self.time_down, h, w)

    def check_side(self, name: str, value: Any) -> int:
        """A video height or width: a positive multiple of what the VAE and the DiT's patches divide."""
        multiple = self.space_down * max(self.patch[1], self.patch[2])
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < multiple \
                or value % multiple:
            raise ValueError(f"{name}={value!r} is invalid: use a multiple of {multiple} "
                             f"(e.g. {self.size}, the trained size)")
        return int(value)

    def shift_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> float:
        if self.shift is not None:
            return self.shift
        _, t, h, w = self.latent_shape(num_frames, height, width)
        pt, ph, pw = self.patch
        return schedule.token_shift((t // pt) * (h // ph) * (w // pw), self.shift_base, self.shift_tokens)


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------


class OnnxT2V:
    """The exported text-to-video pipeline: prompt -> uint8 video (T, H, W, 3).

    `precision`: "fp32", "fp16" (the bundle's `*_fp16.onnx` DiT and decoder; inputs and outputs
    stay float32) or "auto": fp16 when the DiT runs on CUDA and the bundle has the fp16 graphs.
    On CUDA the DiT runs with IO binding: the text conditioning is copied to the GPU once per
    generation, not once per step (`io_binding`: None = on CUDA only). `threads`: ORT intra-op
    threads on CPU (benchmarks pin it). `split_dit`: run `dit_condition.onnx` once per
    generation and `dit_step.onnx` per step (None = when the bundle has them), else `dit.onnx`.
    """

    def __init__(self, bundle_dir: str | Path, providers: Sequence[str] | None = None,
                 precision: str = "auto", threads: int | None = None, io_binding: bool | None = None,
                 split_dit: bool | None = None):
        self.bundle_dir = Path(bundle_dir)
        missing = [f for f in BUNDLE_FILES if not (self.bundle_dir / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.bundle_dir}: not an ONNX bundle, missing {', '.join(missing)} "
                "(run the export stage, or point ZOETROPE_BUNDLE at models/onnx)"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid: use one of {', '.join(PRECISIONS)}")
        self.info = BundleInfo.load(self.bundle_dir / "bundle.json")
        providers = list(providers) if providers is not None else available_providers()
        if "CUDAExecutionProvider" in providers:
            _preload_cuda_libraries()
        has_split = all((self.bundle_dir / f).exists() for f in SPLIT_DIT_FILES)
        if split_dit and not has_split:
            raise FileNotFoundError(f"{self.bundle_dir}: split_dit=True needs {', '.join(SPLIT_DIT_FILES)}: "
                                    "re-export the bundle with components.export.export_bundle")
        self.split_dit = has_split if split_dit is None else bool(split_dit)
        fp16_needed = [FP16_FILES["dit_step" if self.split_dit else "dit"], FP16_FILES["vae_decoder"]]
        has_fp16 = all((self.bundle_dir / f).exists() for f in fp16_needed)
        if precision == "fp16" and not has_fp16:
            raise FileNotFoundError(f"{self.bundle_dir}: precision='fp16' needs {', '.join(fp16_needed)}: "
                                    "re-export the bundle with components.export.export_bundle")

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warns about every unused initialiser
        if threads is not None:  # default: ORT's choice (one per physical core)
            opts.intra_op_num_threads = threads

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(self.bundle_dir / name), sess_options=opts, providers=providers)

        self._text = session("text_encoder.onnx")
        cuda = "CUDAExecutionProvider" in providers
        # fp16 pays off only on a GPU; ORT's CPU provider runs most fp16 ops through casts.
        self.precision = "fp16" if precision == "fp16" or (precision == "auto" and cuda and has_fp16) else "fp32"
        dit_name = "dit_step" if self.split_dit else "dit"
        if self.precision == "fp16":
            self._dit, self._decoder = session(FP16_FILES[dit_name]), session(FP16_FILES["vae_decoder"])
        else:
            self._dit, self._decoder = session(f"{dit_name}.onnx"), session("vae_decoder.onnx")
        # The conditioning graph runs once per generation: float32 whatever the precision.
        self._dit_condition = session("dit_condition.onnx") if self.split_dit else None
        # IO binding pays where inputs cross a bus (CUDA); on CPU it is the same copy either way
        # and is only switched on explicitly (a test does, to run this code path without a GPU).
        self._io_binding = self.provider == "CUDAExecutionProvider" if io_binding is None else io_binding
        self._bind_device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self._tokenizer = Tokenizer.from_file(str(self.bundle_dir / "tokenizer.json"))
        # Pad and truncate to max_tokens here too, whatever tokenizer.json says: the DiT was
        # trained on exactly this many context tokens, padding masked out.
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(length=self.info.max_tokens, pad_id=0 if pad_id is None else pad_id)
        self._tokenizer.enable_truncation(self.info.max_tokens)
        # The empty caption (the unconditional branch of nearly every request) is encoded once,
        # as T2VPipeline does with its null_ctx.
        self._empty = self.encode_text([""])  # (1, L, 384), (1, L)
        self._mean = np.asarray(self.info.latent_mean, np.float32).reshape(1, -1, 1, 1, 1)
        self._std = np.asarray(self.info.latent_std, np.float32).reshape(1, -1, 1, 1, 1)

    @property
    def provider(self) -> str:
        """The provider the DiT really runs on (ORT falls back to CPU if CUDA fails to load)."""
        return self._dit.get_providers()[0]

    @property
    def limits(self) -> Limits:
        return self.info.limits

    @property
    def fps(self) -> int:
        return self.info.fps

    # ---- pieces ---------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids, attention_mask int64 (B, max_tokens), as `TextEncoder.tokenize` makes them."""
        if isinstance(prompts, str):
            raise ValueError("tokenize takes a list of prompts, not one string")
        encodings = self._tokenizer.encode_batch(list(prompts))
        ids = np.asarray([e.ids for e in encodings], np.int64)  # (B, L)
        mask = np.asarray([e.attention_mask for e in encodings], np.int64)  # (B, L)
        return ids, mask

    def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> tokens float32 (B, L, 384) and mask bool (B, L)."""
        ids, mask = self.tokenize(prompts)
        (tokens,) = self._text.run(["tokens"], {"input_ids": ids, "attention_mask": mask})
        return tokens.astype(np.float32, copy=False), mask.astype(bool)

    def _dit_runner(self, x: np.ndarray, ts: np.ndarray, ctx: np.ndarray, mask: np.ndarray):
        """-> run(x, k) -> v (N, c, t, h, w) at time ts[k], for a fixed text context ctx (N, L, 384)
        / mask (N, L); x (B, c, t, h, w) gives the latent shape (its values are not read).

        Split DiT: `dit_condition.onnx` runs here, once, for every step's conditioning; each
        call then runs `dit_step.onnx` on x and step k's row of it. Otherwise `dit.onnx` per
        call. On CUDA what stays fixed is copied to the GPU once and bound for every step (IO
        binding); x (and the step's conditioning row) are copied in, v is copied out.
        """
        n = ctx.shape[0]
        if self.split_dit:
            mod, cross_k, cross_v, ctx_bias, rope_cos, rope_sin = self._dit_condition.run(
                None, {"x": x, "ts": ts, "ctx": ctx, "ctx_mask": mask})  # mod (S, N, 1, M)
            fixed = {"cross_k": cross_k, "cross_v": cross_v, "ctx_bias": ctx_bias, "rope_cos": rope_cos,
                     "rope_sin": rope_sin}
            per_step = lambda k: {"mod": mod[k]}  # noqa: E731
        else:
            fixed = {"ctx": ctx, "ctx_mask": mask}
            per_step = lambda k: {"t": np.full((n,), ts[k], np.float32)}  # noqa: E731
        if not self._io_binding:
            def run(x: np.ndarray, k: int) -> np.ndarray:
                (v,) = self._dit.run(["v"], {"x": x, **per_step(k), **fixed})
                return v
            return run
        device = self._bind_device
        bound = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)
                 for name, value in fixed.items()}

        def run_bound(x: np.ndarray, k: int) -> np.ndarray:
            binding = self._dit.io_binding()
            binding.bind_cpu_input("x", np.ascontiguousarray(x))
            for name, value in per_step(k).items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name, value in bound.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("v", device, 0)
            self._dit.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return run_bound

    def decode_float(self, z_norm: np.ndarray) -> np.ndarray:
        """Normalised latents (B, c, t, h, w) -> float32 videos (B, 3, T, H, W) in about [-1, 1]."""
        z = (z_norm * self._std + self._mean).astype(np.float32)
        (video,) = self._decoder.run(["video"], {"z": z})
        return video

    def decode(self, z_norm: np.ndarray) -> np.ndarray:
        """Normalised latents (B, c, t, h, w) -> uint8 videos (B, T, H, W, 3)."""
        video = self.decode_float(z_norm)  # (B, 3, T, H, W) in [-1, 1]
        frames = np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)  # as vae.to_uint8
        return np.ascontiguousarray(frames.transpose(0, 2, 3, 4, 1))  # (B, T, H, W, 3)

    # ---- generation -----------------------------------------------------------------------

    def _resolve(self, steps: Any, num_frames: Any, sampler: Any) -> tuple[int, int, str]:
        steps = self.info.steps if steps is None else steps
        num_frames = self.info.frames if num_frames is None else num_frames
        sampler = self.info.sampler if sampler is None else sampler
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps={steps!r} is invalid: use a positive integer")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is invalid: use one of {', '.join(SAMPLERS)}")
        return int(steps), self.limits.check_frames(num_frames), sampler

    def _guidances(self, guidance: Any, b: int) -> np.ndarray:
        """One guidance per video: float32 (B,) from None (the bundle's), one number or B numbers."""
        guidance = self.info.guidance if guidance is None else guidance
        values = list(guidance) if isinstance(guidance, (list, tuple, np.ndarray)) else [guidance] * b
        if len(values) != b:
            raise ValueError(f"guidance has {len(values)} values for {b} prompts: pass one or one per prompt")
        for g in values:
            if isinstance(g, bool) or not isinstance(g, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(g) or g < 0:
                raise ValueError(f"guidance={g!r} is invalid: use a number >= 0")
        return np.asarray(values, np.float32)

    def sample_latents(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
                       guidance: float | Sequence[float] | None = None, num_frames: int | None = None,
                       sampler: str | None = None,
                       negative_prompts: Sequence[str] | None = None, *,
                       height: int | None = None, width: int | None = None) -> np.ndarray:
        """Normalised latents float32 (B, c, t, h, w), as `rectified_flow.sample` integrates them.

        `guidance` is one number or one per prompt; `negative_prompts` (one per prompt) replace
        the empty caption of the unconditional branch, as in Stable Diffusion's negative prompt.
        `height` / `width` (default: the trained square size) pick any native size, and
        `num_frames=1` an image: every graph has dynamic time and space axes.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts should be a list of strings")
        if len(prompts) == 0 or len(prompts) != len(seeds):
            raise ValueError(f"prompts and seeds should have the same non-zero length, "
                             f"got {len(prompts)} and {len(seeds)}")
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise ValueError(f"seed={seed!r} is invalid: use an integer >= 0")
        b = len(prompts)
        if negative_prompts is None:
            negative_prompts = [""] * b
        if isinstance(negative_prompts, str) or len(negative_prompts) != b \
                or not all(isinstance(n, str) for n in negative_prompts):
            raise ValueError(f"negative_prompts should be a list of {b} strings, one per prompt")
        steps, num_frames, sampler = self._resolve(steps, num_frames, sampler)
        height = self.info.size if height is None else self.info.check_side("height", height)
        width = self.info.size if width is None else self.info.check_side("width", width)
        g = self._guidances(guidance, b)

        shape = self.info.latent_shape(num_frames, height, width)
        # Each video's noise is drawn alone so a batch reproduces the single-prompt videos.
        x = np.concatenate([schedule.initial_noise(int(s), (1, *shape)) for s in seeds])  # (B, c, t, h, w)
        fresh = [n for n in dict.fromkeys(negative_prompts) if n != ""]  # each distinct one encoded once
        tokens, mask = self.encode_text([*prompts, *fresh])
        tokens, mask = np.concatenate([tokens, self._empty[0]]), np.concatenate([mask, self._empty[1]])
        row = {text: b + i for i, text in enumerate([*fresh, ""])}
        pick = [row[n] for n in negative_prompts]
        cond_only = bool(np.all(g == 1.0))  # guidance 1 is the conditional branch alone
        ts = schedule.timesteps(steps, self.info.shift_for(num_frames, height, width))
        if cond_only:
            run = self._dit_runner(x, ts, tokens[:b], mask[:b])
        else:
            run = self._dit_runner(x, ts, np.concatenate([tokens[:b], tokens[pick]]),  # (2B, L, 384)
                                   np.concatenate([mask[:b], mask[pick]]))  # (2B, L)
        gb = g.reshape(b, 1, 1, 1, 1)

        def velocity(x: np.ndarray, k: int) -> np.ndarray:
            """Guided v at ts[k], as `rectified_flow._velocity`: cond and uncond in one DiT call."""
            if cond_only:
                return run(x, k)
            v = run(np.concatenate([x, x]), k)  # (2B, c, t, h, w)
            v_cond, v_uncond = v[:b], v[b:]
            return v_uncond + gb * (v_cond - v_uncond)

        for k in range(steps):
            t, t_next = ts[k], ts[k + 1]
            dt = t_next - t  # negative: from noise towards data
            v = velocity(x, k)
            if sampler == "heun" and t_next > 0:
                x_euler = x + dt * v
                v_next = velocity(x_euler, k + 1)
                x = x + dt * 0.5 * (v + v_next)
            else:
                x = x + dt * v
        return x.astype(np.float32, copy=False)

    def generate_batch(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
                       guidance: float | Sequence[float] | None = None, num_frames: int | None = None,
                       sampler: str | None = None,
                       negative_prompts: Sequence[str] | None = None, *,
                       height: int | None = None, width: int | None = None) -> np.ndarray:
        """One video per (prompt, seed): uint8 (B, T, H, W, 3).

        Video i is `generate(prompts[i], seeds[i])` up to float rounding of the larger batch.
        """
        return self.decode(self.sample_latents(prompts, seeds, steps, guidance, num_frames, sampler,
                                               negative_prompts, height=height, width=width))

    def generate(self, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 num_frames: int | None = None, sampler: str | None = None,
                 negative_prompt: str = "", *, height: int | None = None,
                 width: int | None = None) -> np.ndarray:
        """uint8 video (T, H, W, 3) for one prompt (height x width: any native size)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r} is invalid: use a string")
        return self.generate_batch([prompt], [seed], steps, guidance, num_frames, sampler,
                                   [negative_prompt], height=height, width=width)[0]

    def describe(self) -> dict:
        """Provider and bundle metadata, as the service's /info reports them."""
        return {
            "provider": self.provider,
            "precision": self.precision,
            "io_binding": self._io_binding,
            "dit_graphs": "dit_condition + dit_step" if self.split_dit else "dit",
            "bundle": self.info.raw,
            "limits": {"time_down": self.limits.time_down, "max_frames": self.limits.max_frames,
                       "allowed_frames": self.limits.allowed_frames(),
                       "default_frames": self.limits.default_frames},
        }

