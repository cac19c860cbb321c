"""Export the serving bundle: three ONNX graphs, the tokenizer and `bundle.json`.

`text_encoder.onnx` (input_ids, attention_mask -> tokens), `dit.onnx` (one velocity evaluation:
x, t, ctx, ctx_mask -> v) and `vae_decoder.onnx` (z -> video), names as docs/architecture.md
fixes them; plus the same DiT split for serving (`components/dit_serving.py`):
`dit_condition.onnx` (once per generation) and `dit_step.onnx` (once per step), which the
runtime prefers. The sampling loop is not exported: it is a few lines of numpy in
`components/onnx_runtime.py`, sharing `components/schedule.py` with PyTorch.

Each graph is exported with the dynamo exporter first (it worked in calibration), the
TorchScript exporter if that fails, then checked against PyTorch in ONNX Runtime (CPU) at a batch
size never seen at export. Every graph is rewritten by ONNX Runtime's offline (BASIC) optimiser
before its parity check, so the check covers the file that ships. `dit_fp16.onnx` and
`vae_decoder_fp16.onnx` are half-precision copies for the CUDA provider. The bundle is written to
a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from components.config import Config
from components import schedule
from components.dit import DiT, load_dit
from components.dit_serving import DiTCondition, DiTStep
from components.onnx_runtime import FP16_FILES
from components.text_encoder import TOKENIZER_FILES, TEXT_DIM, TextEncoder, model_path
from components.vae import VideoVAE, load_vae

EXPORT_BATCH = 2  # example batch at export; parity runs at PARITY_BATCH to prove the axis is dynamic
PARITY_BATCH = 3
# The per-step DiT graph is exported at least at opset 20, where GELU is one `Gelu` node;
# below it the exporter writes five elementwise nodes per block (Div, Erf, Add, Mul, Mul),
# which ORT's basic optimiser does not fuse. ONNX Runtime 1.17+ runs opset 20.
DIT_STEP_MIN_OPSET = 20


class VAEDecoder(nn.Module):
    """z (B, c, t, h, w), denormalised -> video (B, 3, T, H, W) in [-1, 1]."""

    def __init__(self, vae: VideoVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


# ----------------------------------------------------------------------------------------------
# Export and parity helpers
# ----------------------------------------------------------------------------------------------


def onnx_export(module: nn.Module, args: tuple, path: Path, input_names: list[str],
                output_names: list[str], dynamic: dict[str, dict[int, str]], opset: int) -> tuple[str, dict]:
    """Export `module(*args)` to `path`, then optimise it offline (`optimise_graph`).

    -> the exporter that succeeded ("dynamo" or "torchscript") and the node counts.

    `dynamic` maps input names to {axis: name}; output axes follow from the graph (dynamo) or
    are declared batch-only (TorchScript).
    """
    module = module.eval()
    errors = []
    try:
        dyn_shapes = {name: {axis: torch.export.Dim.AUTO for axis in axes} for name, axes in dynamic.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                     input_names=input_names, output_names=output_names,
                                     dynamic_shapes=dyn_shapes, verbose=False)
        prog.save(str(path))
        return "dynamo", optimise_graph(path)
    except Exception as exc:  # noqa: BLE001 - any exporter failure falls back to TorchScript
        errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:300]}")
    try:
        axes = dict(dynamic)
        axes.update({name: {0: "batch"} for name in output_names})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=axes)
        return "torchscript", optimise_graph(path)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"torchscript: {type(exc).__name__}: {str(exc)[:300]}")
    raise RuntimeError(f"ONNX export of {path.name} failed with both exporters: " + " | ".join(errors))


def optimise_graph(path: Path) -> dict:
    """Rewrite `path` in place with ONNX Runtime's offline graph optimisations; -> node counts.

    BASIC level only (constant folding, redundant-node elimination, standard-op fusions): its
    output is plain ONNX that every provider runs. EXTENDED/ALL fuse into provider-specific
    contrib ops, so they are left to the session at load time (ORT_ENABLE_ALL in
    `components/onnx_runtime.py`), where the provider is known.
    """
    import onnx
    import onnxruntime as ort

    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    tmp = path.with_name(f".{path.name}.opt.tmp")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        after = len(onnx.load(str(tmp), load_external_data=False).graph.node)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"nodes_before": before, "nodes_after": after}


def _topological_sort(graph) -> None:
    """Reorder `graph.node` so every node follows the producers of its inputs (Kahn's order)."""
    produced_by = {out: i for i, n in enumerate(graph.node) for out in n.output}
    nodes = list(graph.node)
    done: set[int] = set()
    order: list[int] = []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:  # iterative DFS: graphs have thousands of nodes
            i, expanded = stack.pop()
            if i in done:
                continue
            if expanded:
                done.add(i)
                order.append(i)
                continue
            stack.append((i, True))
            for name in nodes[i].input:
                j = produced_by.get(name)
                if j is not None and j not in done:
                    stack.append((j, False))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def export_fp16(src: Path, dst: Path) -> dict:
    """`src` (float32) -> `dst` with fp16 weights and arithmetic, float32 inputs and outputs.

    For the CUDA provider (tensor cores); on CPU ORT runs fp16 mostly through casts, so the
    runtime picks these graphs only on a GPU. Tested against PyTorch where a GPU exists.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=False)
    # The converter names every inserted Cast after the tensor it casts, so a tensor cast twice
    # (it feeds two fp32-only ops) yields two identical Casts with one output, which ONNX
    # rejects (not SSA): keep the first.
    kept, producers = [], {}
    for node in model.graph.node:
        key = (node.op_type, tuple(node.input), str(node.attribute))
        clash = [producers[o] for o in node.output if o in producers]
        if clash:
            if any(c != key for c in clash):
                raise RuntimeError(f"{src.name}: fp16 conversion produced two different nodes writing "
                                   f"{list(node.output)}; export fp32 only (delete the fp16 step)")
            continue
        producers.update({o: key for o in node.output})
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _topological_sort(model.graph)  # it also appends the input Casts last; ONNX wants them first
    onnx.checker.check_model(model)
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return {"bytes": dst.stat().st_size}


def parity(path: Path, module: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Max |ONNX Runtime (CPU) - PyTorch| on `inputs`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {k: v.cpu().numpy() for k, v in inputs.items()}
    (got,) = sess.run(None, feeds)
    with torch.no_grad():
        want = module(*inputs.values()).cpu().numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"{path.name}: ONNX output shape {got.shape} != PyTorch {want.shape}")
    return float(np.abs(got - want).max())


def _dit_inputs(dit: DiT, batch: int, latent: tuple[int, int, int, int], max_tokens: int,
                gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.zeros(batch, max_tokens, dtype=torch.bool)
    for i in range(batch):
        mask[i, : 2 + (3 * i) % (max_tokens - 1)] = True
    return {
        "x": torch.randn(batch, *latent, generator=gen),
        "t": torch.rand(batch, generator=gen),
        "ctx": torch.randn(batch, max_tokens, TEXT_DIM, generator=gen),
        "ctx_mask": mask,
    }


def _with_timing(fn: Callable[[], tuple[str, dict]]) -> tuple[tuple[str, dict], float]:
    t0 = time.time()
    out = fn()
    return out, time.time() - t0


# ----------------------------------------------------------------------------------------------
# Graphs
# ----------------------------------------------------------------------------------------------


def export_dit(dit: DiT, path: Path, latent: tuple[int, int, int, int], max_tokens: int,
               opset: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    args = _dit_inputs(dit, EXPORT_BATCH, latent, max_tokens, gen)
    dynamic = {"x": {0: "batch", 2: "t", 3: "h", 4: "w"}, "t": {0: "batch"}, "ctx": {0: "batch"},
               "ctx_mask": {0: "batch"}}
    (exporter, optimised), seconds = _with_timing(lambda: onnx_export(
        dit, tuple(args.values()), path, list(args), ["v"], dynamic, opset))
    diff = parity(path, dit, _dit_inputs(dit, PARITY_BATCH, latent, max_tokens, gen))
    out = {"exporter": exporter, "seconds": seconds, "max_abs_diff": diff, "optimised": optimised}
    c, t, h, w = latent
    pt = dit.patch[0]
    if t > pt:  # a shorter clip proves the time axis is dynamic too (the service may ask for it)
        try:
            short = (c, t - pt, h, w)
            out["max_abs_diff_short"] = parity(path, dit, _dit_inputs(dit, PARITY_BATCH, short, max_tokens, gen))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: batch is what serving needs
            out["dynamic_time_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def _split_parity(cond_path: Path, step_path: Path, dit: DiT, inputs: dict[str, torch.Tensor],
                   ts: torch.Tensor) -> float:
    """Max |DiT.forward - (dit_condition.onnx then dit_step.onnx)| at every time of `ts`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    cond = ort.InferenceSession(str(cond_path), sess_options=opts, providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(step_path), sess_options=opts, providers=["CPUExecutionProvider"])
    x, ctx, mask = inputs["x"], inputs["ctx"], inputs["ctx_mask"]
    mod, *fixed = cond.run(None, {"x": x.numpy(), "ts": ts.numpy(), "ctx": ctx.numpy(),
                                  "ctx_mask": mask.numpy()})
    names = ["cross_k", "cross_v", "ctx_bias", "rope_cos", "rope_sin"]
    worst = 0.0
    for k in range(len(ts)):
        (got,) = step.run(None, {"x": x.numpy(), "mod": mod[k], **dict(zip(names, fixed))})
        with torch.no_grad():
            want = dit(x, ts[k].expand(x.shape[0]), ctx, mask).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def export_dit_split(dit: DiT, cond_path: Path, step_path: Path, latent: tuple[int, int, int, int],
                     max_tokens: int, opset: int, steps: int) -> dict:
    """`dit_condition.onnx` and `dit_step.onnx` (components/dit_serving.py), checked together
    against `DiT.forward` at a batch, a schedule length and (where it can) a clip length never
    seen at export."""
    gen = torch.Generator().manual_seed(2)
    cond, step = DiTCondition(dit).eval(), DiTStep(dit).eval()
    args = _dit_inputs(dit, EXPORT_BATCH, latent, max_tokens, gen)
    ts = torch.from_numpy(schedule.timesteps(steps))  # (S,), S = steps + 1
    cond_args = (args["x"], ts, args["ctx"], args["ctx_mask"])
    cond_dynamic = {"x": {0: "batch", 2: "t", 3: "h", 4: "w"}, "ts": {0: "times"}, "ctx": {0: "rows"},
                    "ctx_mask": {0: "rows"}}
    outputs = ["mod", "cross_k", "cross_v", "ctx_bias", "rope_cos", "rope_sin"]
    (cond_exporter, cond_optimised), cond_seconds = _with_timing(lambda: onnx_export(
        cond, cond_args, cond_path, ["x", "ts", "ctx", "ctx_mask"], outputs, cond_dynamic, opset))
    with torch.no_grad():
        mod, *fixed = cond(*cond_args)
    step_args = (args["x"], mod[0], *fixed)
    step_dynamic = {"x": {0: "batch", 2: "t", 3: "h", 4: "w"}, "mod": {0: "batch"}, "cross_k": {1: "batch"},
                    "cross_v": {1: "batch"}, "ctx_bias": {0: "batch"}, "rope_cos": {0: "tokens"},
                    "rope_sin": {0: "tokens"}}
    (step_exporter, step_optimised), step_seconds = _with_timing(lambda: onnx_export(
        step, step_args, step_path, ["x", *outputs], ["v"], step_dynamic,
        max(opset, DIT_STEP_MIN_OPSET)))
    parity_ts = torch.from_numpy(schedule.timesteps(max(1, steps // 2 + 1)))
    out = {"exporter": step_exporter, "condition_exporter": cond_exporter,
           "seconds": cond_seconds + step_seconds,
           "max_abs_diff": _split_parity(cond_path, step_path, dit,
                                         _dit_inputs(dit, PARITY_BATCH, latent, max_tokens, gen), parity_ts),
           "optimised": step_optimised, "condition_optimised": cond_optimised}
    c, t, h, w = latent
    pt = dit.patch[0]
    if t > pt:
        try:
            short = _dit_inputs(dit, PARITY_BATCH, (c, t - pt, h, w), max_tokens, gen)
            out["max_abs_diff_short"] = _split_parity(cond_path, step_path, dit, short, parity_ts)
        except Exception as exc:  # noqa: BLE001 - reported, as for dit.onnx
            out["dynamic_time_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def export_vae_decoder(vae: VideoVAE, path: Path, latent: tuple[int, int, int, int], opset: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    decoder = VAEDecoder(vae).eval()
    z = torch.randn(EXPORT_BATCH, *latent, generator=gen) * vae.latent_std.view(1, -1, 1, 1, 1).cpu()
    dynamic = {"z": {0: "batch", 2: "t", 3: "h", 4: "w"}}  # every bucket shape, an image included
    (exporter, optimised), seconds = _with_timing(
        lambda: onnx_export(decoder, (z,), path, ["z"], ["video"], dynamic, opset))
    z2 = torch.randn(PARITY_BATCH, *latent, generator=gen) * vae.latent_std.view(1, -1, 1, 1, 1).cpu()
    out = {"exporter": exporter, "seconds": seconds, "max_abs_diff": parity(path, decoder, {"z": z2}),
           "optimised": optimised}
    # Native sizes: one landscape image (a single latent frame) proves the t, h and w axes dynamic.
    c, _, h, w = latent
    try:
        z3 = torch.randn(1, c, 1, h, w + w // 2, generator=gen) * vae.latent_std.view(1, -1, 1, 1, 1).cpu()
        out["max_abs_diff_other_shape"] = parity(path, decoder, {"z": z3})
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the trained shape is what ships
        out["dynamic_shape_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def _text_cache_key(opset: int, max_tokens: int) -> str:
    """The frozen encoder's graph depends only on these (weights file, exporter, shapes)."""
    weights = model_path() / "model.safetensors"
    blob = f"{torch.__version__}|{opset}|{max_tokens}|{weights.stat().st_size}|{Path(__file__).stat().st_size}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def export_text_encoder(text: TextEncoder, path: Path, opset: int, cache_dir: Path | None = None) -> dict:
    """Export MiniLM; with `cache_dir`, reuse an earlier export of the same frozen graph."""
    ids, mask = text.tokenize(["a red circle", "a small blue square moving left slowly"])
    dynamic = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}}
    cached = Path(cache_dir) / f"text_encoder-{_text_cache_key(opset, ids.shape[1])}.onnx" if cache_dir else None
    if cached is not None and cached.exists():
        shutil.copy2(cached, path)
        (exporter, optimised), seconds = ("cached", {}), 0.0  # optimised before it was cached
    else:
        (exporter, optimised), seconds = _with_timing(lambda: onnx_export(
            text.model, (ids, mask), path, ["input_ids", "attention_mask"], ["tokens"], dynamic, opset))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            shutil.copy2(path, tmp)
            tmp.replace(cached)
    ids3, mask3 = text.tokenize(["", "a large white triangle staying still on a noise background",
                                 "green circle up"])
    diff = parity(path, text.model, {"input_ids": ids3, "attention_mask": mask3})
    return {"exporter": exporter, "seconds": seconds, "max_abs_diff": diff, "optimised": optimised}


# ----------------------------------------------------------------------------------------------
# Bundle
# ----------------------------------------------------------------------------------------------


def bundle_metadata(vae: VideoVAE, dit: DiT, cfg: Config) -> dict:
    """`bundle.json`: everything `components/onnx_runtime.BundleInfo` needs to sample as PyTorch does."""
    return {
        "latent_channels": vae.cfg.latent_channels,
        "latent_mean": [float(v) for v in vae.latent_mean.cpu()],
        "latent_std": [float(v) for v in vae.latent_std.cpu()],
        "time_down": vae.cfg.time_down,
        "space_down": vae.cfg.space_down,
        "frames": cfg.data.frames,
        "max_frames": cfg.data.frames,
        "size": cfg.data.size,
        # The clip shapes (FRAMESxHEIGHTxWIDTH) the VAE, and so the DiT, trained on: native sizes.
        # Serving takes any height and width of a multiple of 8; these are the ones it has seen.
        "buckets": list(getattr(vae, "data", {}).get("buckets", [])),
        "fps": cfg.data.fps,
        "max_tokens": cfg.text.max_tokens,
        "sample": {"steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
                   "sampler": cfg.sample.sampler},
        # No fixed shift: schedule.token_shift(latent tokens, shift_base, shift_tokens),
        # tokens = t*h*w / prod(patch), as the DiT was trained.
        "shift": None,
        "shift_rule": "schedule.token_shift(num_tokens, shift_base, shift_tokens)",
        "shift_base": float(getattr(dit, "train_config", {}).get("shift", cfg.dit.shift)),
        "shift_tokens": int(getattr(dit, "train_config", {}).get("shift_tokens", cfg.dit.shift_tokens)),
        "patch": list(dit.patch),
        "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 last hidden states",
    }


def export_bundle(vae_path: str | Path, dit_path: str | Path, out_dir: str | Path, cfg: Config,
                  cache_dir: Path | None = None) -> dict:
    """Write the ONNX bundle to `out_dir` (atomically) and return per-graph parity and timings."""
    t0 = time.time()
    out_dir = Path(out_dir)
    device = "cpu"  # export and parity run on CPU: ONNX Runtime's CPU provider is the reference
    vae = load_vae(vae_path, device)
    dit = load_dit(dit_path, device)
    text = TextEncoder(cfg.text.max_tokens, device)
    latent = vae.latent_shape(cfg.data.frames, cfg.data.size, cfg.data.size)
    opset = cfg.export.opset

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        graphs = {
            "text_encoder": export_text_encoder(text, tmp / "text_encoder.onnx", opset, cache_dir),
            "dit": export_dit(dit, tmp / "dit.onnx", latent, cfg.text.max_tokens, opset),
            "dit_step": export_dit_split(dit, tmp / "dit_condition.onnx", tmp / "dit_step.onnx", latent,
                                         cfg.text.max_tokens, opset, cfg.sample.steps),
            "vae_decoder": export_vae_decoder(vae, tmp / "vae_decoder.onnx", latent, opset),
        }
        # Half-precision DiT and decoder for GPUs; their parity is tested where a GPU exists
        # (tests/test_onnx_runtime.py) with components.parity.FP16_TOLERANCE.
        for name, fp16_name in FP16_FILES.items():
            graphs[name]["fp16"] = export_fp16(tmp / f"{name}.onnx", tmp / fp16_name)
        src = model_path()
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        meta = bundle_metadata(vae, dit, cfg)
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.glob("*.onnx.data"):  # external weights would break the single-file contract
            raise RuntimeError(f"{f.name}: exporter wrote external data; the bundle expects single files")
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {p.name: p.stat().st_size for p in out_dir.glob("*.onnx")}  # fp16 graphs included
    return {
        "max_abs_diff": {k: v["max_abs_diff"] for k, v in graphs.items()},
        "graphs": graphs,
        "bytes": sizes,
        "opset": opset,
        "seconds": time.time() - t0,
    }
