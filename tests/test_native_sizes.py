"""Generation at any native size through ONNX Runtime and PyTorch: an image (one frame) and a
landscape video from the one exported tiny bundle (tests/test_onnx_runtime.py builds it)."""

from __future__ import annotations

import numpy as np
import pytest

from components.onnx_runtime import OnnxT2V
from tests.test_onnx_runtime import TINY, export_tiny_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_tiny_bundle(tmp_path_factory.getbasetemp() / "tiny-export")


@pytest.fixture(scope="module")
def pipelines(tiny):
    from components.generate import T2VPipeline

    return OnnxT2V(tiny.bundle, providers=["CPUExecutionProvider"]), T2VPipeline.from_paths(
        tiny.vae, tiny.dit, max_tokens=tiny.max_tokens, device="cpu")


def test_exported_decoder_has_dynamic_space_and_time(tiny):
    graph = tiny.report["graphs"]["vae_decoder"]
    assert "dynamic_shape_error" not in graph
    assert graph["max_abs_diff_other_shape"] < 1e-4


@pytest.mark.parametrize("frames,height,width", [(1, 16, 16), (1, 16, 24), (9, 16, 24), (5, 24, 16)])
def test_onnx_generates_any_native_size_as_pytorch_does(pipelines, frames, height, width):
    onnx, torch_pipe = pipelines
    video = onnx.generate(PROMPT, seed=4, steps=2, num_frames=frames, height=height, width=width)
    assert video.shape == (frames, height, width, 3) and video.dtype == np.uint8
    assert video.std() > 0  # a picture, not a constant
    ref = torch_pipe.generate([PROMPT], seed=4, steps=2, guidance=onnx.info.guidance,
                              num_frames=frames, height=height, width=width)[0]
    assert ref.shape == video.shape
    assert np.abs(ref.astype(int) - video.astype(int)).max() <= 2  # uint8 rounding of float noise


def test_default_size_is_unchanged(pipelines):
    onnx, _ = pipelines
    default = onnx.generate(PROMPT, seed=4, steps=2)
    explicit = onnx.generate(PROMPT, seed=4, steps=2, height=TINY["size"], width=TINY["size"])
    assert default.shape == (TINY["frames"], TINY["size"], TINY["size"], 3)
    assert np.array_equal(default, explicit)


@pytest.mark.parametrize("kwargs,name", [({"height": 20}, "height"), ({"width": 0}, "width"),
                                         ({"width": 16.0}, "width")])
def test_bad_sizes_raise_naming_them(pipelines, kwargs, name):
    onnx, _ = pipelines
    with pytest.raises(ValueError, match=f"{name}=.* is invalid: use a multiple of 8"):
        onnx.generate(PROMPT, seed=0, steps=1, **kwargs)
