"""Serving pieces in-process: the request schema and adaptive batching on the real tiny runtime.

The HTTP behaviour of the service (real `bentoml serve`) is in test_service_http.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

from components.onnx_runtime import OnnxT2V
from serving.batching import BatchKey, Batcher, Job
from serving.schema import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_STEPS, GenerateRequest
from tests.test_onnx_runtime import TINY, export_tiny_bundle


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> OnnxT2V:
    return OnnxT2V(export_tiny_bundle(tmp_path_factory.getbasetemp() / "tiny-export").bundle)


# ----------------------------------------------------------------------------------------------
# Schema: every limit in one place, each violation names its field
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("prompt", "a" * (MAX_PROMPT_CHARS + 1)), ("steps", MAX_STEPS + 1), ("guidance", MAX_GUIDANCE + 0.1),
    ("seed", -1), ("format", "webm"), ("aspect", "wide"), ("aspect", "0:1"), ("negative_prompt", None),
])
def test_schema_rejects_out_of_range_values_naming_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        GenerateRequest.model_validate({"prompt": "a circle", field: value})
    assert [e["loc"][0] for e in err.value.errors()] == [field]


def test_schema_defaults_and_bundle_checks(runtime):
    request = GenerateRequest(prompt="a circle")
    assert (request.format, request.aspect, request.expand, request.negative_prompt) == ("mp4", "1:1", False, "")
    side = TINY["size"]
    assert request.check_bundle(runtime.info) == (side, side)  # defaults always fit the bundle
    with pytest.raises(ValueError, match="size=32"):
        GenerateRequest(prompt="a", size=32).check_bundle(runtime.info)
    with pytest.raises(ValueError, match="num_frames=13"):
        GenerateRequest(prompt="a", num_frames=13).check_bundle(runtime.info)
    with pytest.raises(ValueError, match="aspect='5:3' is invalid: this model was trained on 1:1"):
        GenerateRequest(prompt="a", aspect="5:3").check_bundle(runtime.info)


def test_aspects_come_from_the_bundles_trained_shapes(runtime, tmp_path):
    import json

    from components.onnx_runtime import BundleInfo

    raw = json.loads((runtime.bundle_dir / "bundle.json").read_text())
    raw["buckets"] = ["9x16x16", "9x8x24", "9x24x8", "5x16x16"]
    (tmp_path / "bundle.json").write_text(json.dumps(raw))
    info = BundleInfo.load(tmp_path / "bundle.json")
    assert info.aspects == {"1:1": (16, 16), "1:3": (24, 8), "3:1": (8, 24)}
    assert GenerateRequest(prompt="a", aspect="3:1").check_bundle(info) == (8, 24)  # landscape: W:H
    with pytest.raises(ValueError, match="size=16 is invalid"):
        GenerateRequest(prompt="a", aspect="3:1", size=16).check_bundle(info)
    raw["buckets"] = ["9x16"]
    (tmp_path / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bucket '9x16' is not FRAMESxHEIGHTxWIDTH"):
        BundleInfo.load(tmp_path / "bundle.json")


# ----------------------------------------------------------------------------------------------
# Batching: concurrent requests share one generate_batch call and get their own videos
# ----------------------------------------------------------------------------------------------


def _batcher(runtime: OnnxT2V, calls: list, max_batch_size: int = 8) -> Batcher:
    def run_batch(key: BatchKey, jobs):
        calls.append((key, len(jobs)))
        return runtime.generate_batch([j.prompt for j in jobs], [j.seed for j in jobs], steps=key.steps,
                                      guidance=[j.guidance for j in jobs], num_frames=key.num_frames,
                                      sampler=key.sampler, negative_prompts=[j.negative_prompt for j in jobs])
    return Batcher(run_batch, max_batch_size=max_batch_size, max_latency_ms=5)


JOBS = [Job("a red circle moving left", "", 1, 3.0), Job("a small blue square", "a red circle", 2, 5.0),
        Job("a green triangle", "", 3, 1.0), Job("a white circle moving up", "", 4, 2.0)]
KEY = BatchKey(steps=2, num_frames=5, sampler="euler")


def test_requests_submitted_together_run_as_one_batch_and_match_single_runs(runtime):
    calls: list = []

    async def main():
        batcher = _batcher(runtime, calls)
        return await asyncio.gather(*(batcher.submit(KEY, job) for job in JOBS))

    videos = asyncio.run(main())
    assert calls == [(KEY, 4)]  # one DiT loop for the four requests
    for video, job in zip(videos, JOBS):
        single = runtime.generate(job.prompt, seed=job.seed, steps=2, guidance=job.guidance, num_frames=5,
                                  sampler="euler", negative_prompt=job.negative_prompt)
        assert video.shape == single.shape
        assert np.abs(video.astype(int) - single).max() <= 1


def test_batches_respect_max_size_and_never_mix_settings(runtime):
    calls: list = []
    other = BatchKey(steps=1, num_frames=1, sampler="euler")

    async def main():
        batcher = _batcher(runtime, calls, max_batch_size=3)
        keys = [KEY, other, KEY, KEY, KEY, other]
        return await asyncio.gather(*(batcher.submit(k, JOBS[i % 4]) for i, k in enumerate(keys)))

    videos = asyncio.run(main())
    assert calls == [(KEY, 3), (other, 2), (KEY, 1)]
    assert [v.shape[0] for v in videos] == [5, 1, 5, 5, 5, 1]


def test_requests_queued_during_a_batch_wait_for_company_after_it():
    """B arrives while A's batch runs, C just after it ends: B waits the window and leaves with C."""
    import threading

    calls: list[int] = []
    release = threading.Event()

    def run_batch(key: BatchKey, jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            release.wait(30)  # A's batch runs until B has queued
        return np.zeros((len(jobs), 1, 2, 2, 3), np.uint8)

    async def main():
        batcher = Batcher(run_batch, max_batch_size=8, max_latency_ms=1000)
        a = asyncio.ensure_future(batcher.submit(KEY, JOBS[0]))
        while not calls:  # A's batch has started (after its own window)
            await asyncio.sleep(0.01)
        b = asyncio.ensure_future(batcher.submit(KEY, JOBS[1]))
        await asyncio.sleep(1.5)  # B has now waited longer than the window
        release.set()
        await a
        c = await batcher.submit(KEY, JOBS[2])  # joins B: the window restarted when A's batch ended
        await b
        return c

    asyncio.run(main())
    assert calls == [1, 2]


def test_free_lanes_split_the_queue_and_run_their_batches_at_once():
    """8 waiting requests, 2 free lanes: two batches of 4 that run at the same time (each lane's
    batch waits at a barrier the other must reach), and every request gets its own video."""
    import threading

    calls: list[int] = []
    both = threading.Barrier(2, timeout=30)  # BrokenBarrierError unless the two batches overlap

    def run_batch(key: BatchKey, jobs):
        calls.append(len(jobs))
        both.wait()
        return np.stack([np.full((1, 2, 2, 3), j.seed, np.uint8) for j in jobs])

    async def main():
        batcher = Batcher(run_batch, max_batch_size=8, max_latency_ms=200, lanes=2)
        jobs = [Job(prompt=f"p{i}", negative_prompt="", seed=i, guidance=1.0) for i in range(8)]
        return await asyncio.gather(*(batcher.submit(KEY, j) for j in jobs))

    videos = asyncio.run(main())
    assert calls == [4, 4]
    assert [int(v[0, 0, 0, 0]) for v in videos] == list(range(8))


def test_one_lane_runs_one_batch_at_a_time():
    import threading

    running, peak = [0], [0]
    lock = threading.Lock()

    def run_batch(key: BatchKey, jobs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return np.zeros((len(jobs), 1, 2, 2, 3), np.uint8)

    async def main():
        batcher = Batcher(run_batch, max_batch_size=2, max_latency_ms=1, lanes=1)
        jobs = [Job(prompt=f"p{i}", negative_prompt="", seed=i, guidance=1.0) for i in range(6)]
        await asyncio.gather(*(batcher.submit(KEY, j) for j in jobs))
        return batcher.batch_sizes

    assert asyncio.run(main()) == [2, 2, 2]
    assert peak[0] == 1


def test_serving_lanes_follow_the_cores_and_name_a_bad_override(monkeypatch):
    import os

    from serving.service import LANES_ENV, serving_lanes

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv(LANES_ENV, raising=False)
    assert serving_lanes(gpu=False) == (cores, 1)
    assert serving_lanes(gpu=True) == (1, None)
    monkeypatch.setenv(LANES_ENV, "1")
    assert serving_lanes(gpu=False) == (1, cores)
    monkeypatch.setenv(LANES_ENV, "two")
    with pytest.raises(ValueError, match=LANES_ENV):
        serving_lanes(gpu=False)


def test_a_failing_batch_fails_its_requests_and_the_batcher_lives_on(runtime):
    calls: list = []

    async def main():
        batcher = _batcher(runtime, calls)
        bad = BatchKey(steps=2, num_frames=4, sampler="euler")  # 4 frames: the runtime refuses
        results = await asyncio.gather(batcher.submit(bad, JOBS[0]), batcher.submit(bad, JOBS[1]),
                                       return_exceptions=True)
        good = await batcher.submit(KEY, JOBS[0])
        return results, good

    results, good = asyncio.run(main())
    assert all(isinstance(r, ValueError) and "num_frames" in str(r) for r in results)
    assert good.shape == (5, TINY["size"], TINY["size"], 3)


# ----------------------------------------------------------------------------------------------
# Registry -> model store: `zoetrope import-model`, and the ONNX flavour of every graph
# ----------------------------------------------------------------------------------------------


def test_import_model_copies_the_champion_from_the_registry_into_the_store(tmp_path, tmp_path_factory,
                                                                         monkeypatch):
    import os
    import subprocess
    import sys

    import mlflow
    import onnxruntime as ort

    from flows import tracking
    from flows.project import REGISTERED_MODEL, Project
    from flows.registry import SERVING_REQUIREMENTS, ZoetropeOnnxModel, log_onnx_graphs
    from tests.conftest import make_project

    bundle = export_tiny_bundle(tmp_path_factory.getbasetemp() / "tiny-export").bundle
    root = make_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k not in ("ZOETROPE_PROJECT", "MLFLOW_TRACKING_URI")}
    old_uri = mlflow.get_tracking_uri()
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which an earlier test may have left
    # behind: this project must use its own store, as the `import-model` subprocess does.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        project = Project(root)
        tracking.setup(project)
        with mlflow.start_run():  # what the register stage logs, without the gates around it
            info = mlflow.pyfunc.log_model(name="zoetrope-t2v", python_model=ZoetropeOnnxModel(),
                                           artifacts={"bundle": str(bundle)}, pip_requirements=SERVING_REQUIREMENTS,
                                           registered_model_name=REGISTERED_MODEL)
            graphs = log_onnx_graphs(bundle)
            run_id = mlflow.active_run().info.run_id
        mlflow.MlflowClient().set_registered_model_alias(REGISTERED_MODEL, "champion", info.registered_model_version)
        assert "onnx-dit" in graphs and "onnx-dit-fp16" in graphs
        dit = mlflow.onnx.load_model(f"runs:/{run_id}/onnx-dit")  # the ONNX flavour loads on its own
        sess = ort.InferenceSession(dit.SerializeToString(), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["x", "t", "ctx", "ctx_mask"]
    finally:
        mlflow.set_tracking_uri(old_uri)

    env.update(BENTOML_HOME=str(tmp_path / "bentoml"), PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "import-model"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "zoetrope-t2v:" in proc.stdout
    code = ("import bentoml; m = bentoml.models.get('zoetrope-t2v:latest'); "
            "print(m.info.labels['alias'], m.info.labels['mlflow_version'], sorted(p.name for p in "
            "__import__('pathlib').Path(m.path).glob('*.onnx')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("champion 1 ") and "dit_fp16.onnx" in out


def test_a_full_queue_refuses_new_requests_and_serves_the_queued_ones(runtime):
    from serving.batching import QueueFull

    calls: list = []

    async def main():
        batcher = _batcher(runtime, calls)
        batcher.max_queued = 2
        return await asyncio.gather(*(batcher.submit(KEY, job) for job in JOBS[:3]), return_exceptions=True)

    first, second, third = asyncio.run(main())
    assert isinstance(third, QueueFull) and "retry later" in str(third)
    assert first.shape == second.shape == (5, TINY["size"], TINY["size"], 3)
    assert calls == [(KEY, 2)]
