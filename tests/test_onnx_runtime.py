"""ONNX Runtime pipeline on a really exported tiny bundle: providers, determinism, errors, parity.

`export_tiny_bundle` writes random-initialised tiny VAE and DiT checkpoints in the checkpoint
format and runs the real `components.export.export_bundle` on them (about a minute: MiniLM goes
through the dynamo exporter). It runs once per test session; test_serving.py reuses it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from components.onnx_runtime import OnnxT2V, available_providers, has_gpu

TINY = dict(frames=9, size=16, fps=8, max_tokens=16)
PROMPTS, SEEDS = ["a red circle moving left", "a small blue square"], [7, 3]


@dataclasses.dataclass(frozen=True)
class TinyModels:
    vae: Path
    dit: Path
    bundle: Path
    max_tokens: int
    report: dict  # export_bundle's: per-graph parity, exporter, node counts


@functools.cache
def export_tiny_bundle(root: Path) -> TinyModels:
    from components.checkpoint import save_model
    from components.config import Config, DataConfig, SampleConfig, TextConfig, VAEConfig
    from components.dit import DiT, DiTSpec, dit_config_dict
    from components.export import export_bundle
    from components.vae import VideoVAE

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = Config(
        data=DataConfig(size=TINY["size"], frames=TINY["frames"], fps=TINY["fps"]),
        text=TextConfig(max_tokens=TINY["max_tokens"]),
        vae=VAEConfig(base_channels=8, latent_channels=4, time_down=4, space_down=4),
        sample=SampleConfig(steps=3, guidance=3.0, sampler="euler"),
    )
    vae = VideoVAE(cfg.vae)
    save_model(root / "vae.pt", "vae", dataclasses.asdict(cfg.vae), vae.state_dict(),
               latent_mean=[0.1, -0.2, 0.0, 0.3], latent_std=[0.5, 1.5, 1.0, 0.8],
               data={k: TINY[k] for k in ("frames", "size", "fps")})
    spec = DiTSpec(in_channels=4, dim=32, depth=1, heads=2, mlp_ratio=2.0, patch_t=1, patch_h=2, patch_w=2)
    dit = DiT(spec)
    with torch.no_grad():  # adaLN-Zero starts at v = 0 whatever the prompt: wake every weight
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(root / "dit.pt", "dit", dit_config_dict(spec, cfg.dit), dit.state_dict())
    report = export_bundle(root / "vae.pt", root / "dit.pt", root / "onnx", cfg)
    return TinyModels(root / "vae.pt", root / "dit.pt", root / "onnx", TINY["max_tokens"], report)


def tiny_config():
    """The Config the tiny bundle was exported with (sampling: 3 Euler steps, guidance 3)."""
    from components.config import Config, DataConfig, SampleConfig, TextConfig

    return Config(data=DataConfig(size=TINY["size"], frames=TINY["frames"], fps=TINY["fps"]),
                  text=TextConfig(max_tokens=TINY["max_tokens"]),
                  sample=SampleConfig(steps=3, guidance=3.0, sampler="euler"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    return export_tiny_bundle(tmp_path_factory.getbasetemp() / "tiny-export")


@pytest.fixture(scope="module")
def runtime(tiny) -> OnnxT2V:
    return OnnxT2V(tiny.bundle)


@pytest.fixture(scope="module")
def torch_pipeline(tiny):
    from components.generate import T2VPipeline

    return T2VPipeline.from_paths(tiny.vae, tiny.dit, tiny.max_tokens, "cpu")


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


def test_providers_are_cpu_only_without_a_gpu(runtime):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    assert available_providers() == ["CPUExecutionProvider"]
    assert runtime.provider == "CPUExecutionProvider"


def test_providers_without_gpu_preference_are_cpu():
    assert available_providers(prefer_gpu=False) == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def test_video_has_the_bundle_shape(runtime):
    video = runtime.generate(PROMPTS[0], seed=0)
    assert video.dtype == np.uint8
    assert video.shape == (TINY["frames"], TINY["size"], TINY["size"], 3)
    assert runtime.generate(PROMPTS[0], seed=0, num_frames=5, sampler="heun").shape == (5, 16, 16, 3)
    assert runtime.limits.allowed_frames() == [1, 5, 9]


def test_same_seed_same_video_and_different_seeds_differ(runtime):
    a = runtime.generate(PROMPTS[1], seed=7)
    np.testing.assert_array_equal(a, runtime.generate(PROMPTS[1], seed=7))
    assert not np.array_equal(a, runtime.generate(PROMPTS[1], seed=8))
    assert not np.array_equal(a, runtime.generate(PROMPTS[0], seed=7))


def test_batch_reproduces_single_videos(runtime):
    batch = runtime.generate_batch(PROMPTS, SEEDS)
    for video, prompt, seed in zip(batch, PROMPTS, SEEDS):
        assert np.abs(video.astype(int) - runtime.generate(prompt, seed=seed)).max() <= 1


@pytest.mark.parametrize("sampler, guidance", [("euler", 3.0), ("heun", 4.5), ("euler", 1.0)])
def test_matches_the_pytorch_pipeline(runtime, torch_pipeline, sampler, guidance):
    """Same noise, schedule, shift, guidance and integrator as `components.generate`."""
    want = torch_pipeline.generate(PROMPTS, SEEDS, steps=3, guidance=guidance, sampler=sampler)
    got = runtime.generate_batch(PROMPTS, SEEDS, steps=3, guidance=guidance, sampler=sampler)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= 1


def test_tokenizer_matches_the_pytorch_text_encoder(runtime, torch_pipeline):
    texts = ["", "a red circle moves left", "a very long caption " * 20, "Ünïcode, CAPS & dashes — ok"]
    ids, mask = torch_pipeline.text.tokenize(texts)
    got_ids, got_mask = runtime.tokenize(texts)
    np.testing.assert_array_equal(got_ids, ids.numpy())
    np.testing.assert_array_equal(got_mask, mask.numpy())


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [0, 4, 8, 13, 1000, "9", 9.0])
def test_bad_num_frames_raises_naming_it(runtime, num_frames):
    with pytest.raises(ValueError, match="num_frames"):
        runtime.generate("x", num_frames=num_frames)


@pytest.mark.parametrize("kwargs, name", [
    ({"steps": 0}, "steps"), ({"guidance": -1.0}, "guidance"), ({"sampler": "ddim"}, "sampler"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_raise_naming_them(runtime, kwargs, name):
    with pytest.raises(ValueError, match=name):
        runtime.generate("x", **kwargs)


def test_missing_bundle_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dit.onnx"):
        OnnxT2V(tmp_path)


# ----------------------------------------------------------------------------------------------
# Export: optimised graphs, whole-generation parity, fp16
# ----------------------------------------------------------------------------------------------


def test_graphs_are_optimised_offline_and_parity_holds_at_unseen_shapes(tiny):
    import onnx

    graphs = tiny.report["graphs"]
    for name in ("dit", "vae_decoder"):
        counts = graphs[name]["optimised"]
        assert counts["nodes_after"] <= counts["nodes_before"]
        shipped = onnx.load(str(tiny.bundle / f"{name}.onnx"))
        assert len(shipped.graph.node) == counts["nodes_after"]  # the optimised graph is what ships
        assert graphs[name]["max_abs_diff"] < 1e-4  # checked at batch 3; export used batch 2
    assert graphs["dit"]["max_abs_diff_short"] < 1e-4  # and at a shorter clip (time axis)
    assert graphs["text_encoder"]["max_abs_diff"] < 1e-4


def test_whole_generation_matches_pytorch_within_the_stated_tolerance(tiny):
    from components.parity import FP32_TOLERANCE, generation_parity

    out = generation_parity(tiny.bundle, tiny.vae, tiny.dit, tiny_config(), seed=11)
    assert out["precision"] == "fp32"
    assert out["latent_max_abs_diff"] <= FP32_TOLERANCE
    assert out["video_max_abs_diff"] <= FP32_TOLERANCE


def test_fp16_graphs_keep_float32_io_and_hold_fp16_weights(tiny):
    import onnx

    from components.onnx_runtime import FP16_FILES

    for fp32_name, fp16_name in FP16_FILES.items():
        fp16 = onnx.load(str(tiny.bundle / fp16_name))
        fp32 = onnx.load(str(tiny.bundle / f"{fp32_name}.onnx"))
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in (*m.graph.input, *m.graph.output)]  # noqa: E731
        assert io(fp16) == io(fp32)  # a drop-in replacement for the runtime
        dtypes = {init.data_type for init in fp16.graph.initializer if len(init.dims) > 1}
        assert dtypes == {onnx.TensorProto.FLOAT16}


@pytest.mark.skipif(not has_gpu(), reason="fp16 and IO binding are GPU paths: no GPU here")
def test_fp16_generation_on_gpu_matches_pytorch_within_its_tolerance(tiny):
    from components.parity import FP16_TOLERANCE, generation_parity

    out = generation_parity(tiny.bundle, tiny.vae, tiny.dit, tiny_config(), seed=11,
                            providers=["CUDAExecutionProvider", "CPUExecutionProvider"], precision="fp16")
    assert out["provider"] == "CUDAExecutionProvider"
    assert out["max_abs_diff"] <= FP16_TOLERANCE


@pytest.mark.skipif(not has_gpu(), reason="fp16 and IO binding are GPU paths: no GPU here")
def test_cuda_fp32_with_io_binding_matches_cpu(tiny):
    from components.parity import FP32_TOLERANCE

    gpu = OnnxT2V(tiny.bundle, precision="fp32")
    cpu = OnnxT2V(tiny.bundle, providers=["CPUExecutionProvider"])
    assert gpu.provider == "CUDAExecutionProvider" and gpu.describe()["io_binding"]
    z_gpu, z_cpu = (r.sample_latents(PROMPTS, SEEDS, steps=3, guidance=[2.0, 4.0]) for r in (gpu, cpu))
    # TF32/cuDNN kernels differ from MLAS in the last bits; the same tolerance as against PyTorch
    assert np.abs(z_gpu - z_cpu).max() <= FP32_TOLERANCE * 10


def test_io_binding_path_gives_the_same_latents(tiny, runtime):
    """The IO-binding code path (CUDA's) run on CPU: same inputs bound, same output."""
    bound = OnnxT2V(tiny.bundle, providers=["CPUExecutionProvider"], io_binding=True)
    assert bound.describe()["io_binding"] and not runtime.describe()["io_binding"]
    for guidance in ([2.0, 4.0], 1.0):
        want = runtime.sample_latents(PROMPTS, SEEDS, steps=2, guidance=guidance, sampler="heun")
        got = bound.sample_latents(PROMPTS, SEEDS, steps=2, guidance=guidance, sampler="heun")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Per-row guidance and negative prompts (what the service batches)
# ----------------------------------------------------------------------------------------------


def test_per_row_guidance_and_negatives_reproduce_single_calls(runtime):
    negatives = ["", "a red circle"]
    batch = runtime.generate_batch(PROMPTS, SEEDS, guidance=[2.0, 5.0], negative_prompts=negatives)
    for video, prompt, seed, g, neg in zip(batch, PROMPTS, SEEDS, [2.0, 5.0], negatives):
        single = runtime.generate(prompt, seed=seed, guidance=g, negative_prompt=neg)
        assert np.abs(video.astype(int) - single).max() <= 1


def test_negative_prompt_changes_the_video(runtime):
    plain = runtime.generate(PROMPTS[0], seed=5, guidance=4.0)
    steered = runtime.generate(PROMPTS[0], seed=5, guidance=4.0, negative_prompt="a small blue square")
    assert not np.array_equal(plain, steered)


@pytest.mark.parametrize("kwargs, name", [
    ({"guidance": [1.0]}, "guidance"), ({"guidance": [1.0, float("nan")]}, "guidance"),
    ({"negative_prompts": ["only one"]}, "negative_prompts"), ({"negative_prompts": "x"}, "negative_prompts"),
])
def test_bad_batch_arguments_raise_naming_them(runtime, kwargs, name):
    with pytest.raises(ValueError, match=name):
        runtime.generate_batch(PROMPTS, SEEDS, **kwargs)


def test_unknown_precision_and_missing_fp16_are_named(tiny, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="precision"):
        OnnxT2V(tiny.bundle, precision="int8")
    bare = tmp_path / "bundle"
    shutil.copytree(tiny.bundle, bare)
    (bare / "dit_step_fp16.onnx").unlink()  # the split DiT's fp16 step graph
    with pytest.raises(FileNotFoundError, match="dit_step_fp16.onnx"):
        OnnxT2V(bare, precision="fp16")
    assert OnnxT2V(bare, providers=["CPUExecutionProvider"]).precision == "fp32"  # auto falls back


# ----------------------------------------------------------------------------------------------
# The split DiT (components/dit_serving.py): conditioning once per generation, then per step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, batch", [(9, 3), (5, 1)])
def test_condition_then_step_equals_the_dit_forward_in_pytorch(frames, batch):
    from components.dit import DiT, DiTSpec
    from components.dit_serving import DiTCondition, DiTStep

    torch.manual_seed(0)
    dit = DiT(DiTSpec(in_channels=4, dim=48, depth=2, heads=3, mlp_ratio=2.0, patch_t=1, patch_h=2, patch_w=2))
    with torch.no_grad():
        for p in dit.parameters():  # adaLN-Zero starts as the identity: wake every weight
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(batch, 4, 1 + (frames - 1) // 4, 4, 4)
    ctx, mask = torch.randn(batch, 7, 384), torch.rand(batch, 7) < 0.6
    mask[:, 0] = True
    ts = torch.tensor([1.0, 0.7, 0.2, 0.0])
    with torch.no_grad():
        mod, *fixed = DiTCondition(dit)(x, ts, ctx, mask)
        for k in range(len(ts)):
            want = dit(x, ts[k].expand(batch), ctx, mask)
            torch.testing.assert_close(DiTStep(dit)(x, mod[k], *fixed), want, rtol=0, atol=1e-5)


def test_rotate_half_matrix_is_the_rope_rotation():
    from components.dit import apply_rope
    from components.dit_serving import rotate_half_matrix

    q = torch.randn(2, 5, 3, 8)
    cos, sin = torch.randn(5, 1, 8), torch.randn(5, 1, 8)
    want = apply_rope(q.transpose(1, 2), cos.squeeze(1), sin.squeeze(1)).transpose(1, 2)
    torch.testing.assert_close(q * cos + (q @ rotate_half_matrix(8)) * sin, want)


def test_the_bundle_ships_the_split_dit_and_the_runtime_prefers_it(tiny, runtime):
    graphs = tiny.report["graphs"]["dit_step"]
    assert graphs["max_abs_diff"] < 1e-4 and graphs["max_abs_diff_short"] < 1e-4  # unseen batch, clip
    assert runtime.split_dit and runtime.describe()["dit_graphs"] == "dit_condition + dit_step"
    single = OnnxT2V(tiny.bundle, split_dit=False)
    assert single.describe()["dit_graphs"] == "dit"
    for sampler, guidance in [("euler", [2.0, 4.0]), ("heun", 1.0)]:
        want = single.sample_latents(PROMPTS, SEEDS, steps=3, guidance=guidance, sampler=sampler)
        got = runtime.sample_latents(PROMPTS, SEEDS, steps=3, guidance=guidance, sampler=sampler)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_bundle_without_the_split_dit_runs_dit_onnx(tiny, tmp_path):
    import shutil

    from components.onnx_runtime import SPLIT_DIT_FILES

    old = tmp_path / "bundle"
    shutil.copytree(tiny.bundle, old)
    for name in SPLIT_DIT_FILES:
        (old / name).unlink()
    runtime = OnnxT2V(old, providers=["CPUExecutionProvider"])
    assert not runtime.split_dit
    assert runtime.generate(PROMPTS[0], seed=1, steps=2).shape == (TINY["frames"], TINY["size"], TINY["size"], 3)
    with pytest.raises(FileNotFoundError, match="dit_condition.onnx"):
        OnnxT2V(old, split_dit=True)
