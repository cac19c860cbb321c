"""The BentoML service over real HTTP: `bentoml serve` in a subprocess, raw requests, MP4 decoded.

One server per module (start-up costs seconds), on the tiny really exported bundle of
test_onnx_runtime.py (shared within a session). Task endpoints are driven with raw HTTP:
BentoML 1.4's sync client crashes on submit().
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from components.video_io import read_video
from tests.conftest import ROOT
from tests.test_onnx_runtime import TINY, export_tiny_bundle

STARTUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(home: Path, bundle: Path | None, log: Path):
    """`bentoml serve serving.service:TextToVideo`; from `bundle` via ZOETROPE_BUNDLE, else the store."""
    port = _free_port()
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", DO_NOT_TRACK="1")
    env.pop("ZOETROPE_BUNDLE", None)
    if bundle is not None:
        env["ZOETROPE_BUNDLE"] = str(bundle)
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:TextToVideo",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        # Own process group: teardown stops the server and its workers, nothing else.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready in {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return export_tiny_bundle(tmp_path_factory.getbasetemp() / "tiny-export").bundle


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    with serve(tmp / "bentoml", bundle, tmp / "server.log") as url:
        yield url


def post(url: str, body, route: str = "/generate", **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{url}{route}", json=body, timeout=60, **kwargs)
    return httpx.post(f"{url}{route}", content=body, timeout=60,
                      headers=kwargs.pop("headers", {"content-type": "application/json"}), **kwargs)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def test_generate_returns_an_mp4_of_the_configured_size(server):
    r = post(server, {"prompt": "a red circle moving left", "seed": 3})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    frames = read_video(r.content)
    assert frames.shape == (TINY["frames"], TINY["size"], TINY["size"], 3)


def test_generate_honours_num_frames_and_seed(server):
    r = post(server, {"prompt": "a blue square", "seed": 1, "steps": 2, "guidance": 1.5, "num_frames": 5})
    assert r.status_code == 200, r.text
    frames = read_video(r.content)
    assert frames.shape[0] == 5
    again = read_video(post(server, {"prompt": "a blue square", "seed": 1, "steps": 2, "guidance": 1.5,
                                     "num_frames": 5}).content)
    assert (frames == again).all()


def test_gif_format_and_negative_prompt(server):
    body = {"prompt": "a red circle moving left", "seed": 4, "format": "gif", "num_frames": 5}
    r = post(server, body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/gif"
    gif = read_video(r.content)
    assert gif.shape == (5, TINY["size"], TINY["size"], 3)
    steered = read_video(post(server, {**body, "negative_prompt": "a small blue square"}).content)
    assert not (gif == steered).all()


def test_concurrent_requests_share_batches(server):
    """8 clients at once: every request answered, and the batch-size histogram counts 8 videos."""
    def videos_so_far() -> float:
        text = httpx.get(f"{server}/metrics", timeout=10).text
        sums = [line for line in text.splitlines() if line.startswith("zoetrope_generate_batch_size_sum")]
        return float(sums[0].split()[-1]) if sums else 0.0

    before = videos_so_far()
    bodies = [{"prompt": f"a red circle {i}", "seed": i, "steps": 2} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in responses] == [200] * 8
    assert all(read_video(r.content).shape[0] == TINY["frames"] for r in responses)
    assert videos_so_far() - before == 8
    sizes = httpx.get(f"{server}/info", timeout=10).json()["batching"]["recent_batch_sizes"]
    assert sum(sizes[-8:]) >= 8 and max(sizes) <= 8


def test_info_reports_provider_and_bundle(server):
    r = httpx.get(f"{server}/info", timeout=10)
    assert r.status_code == 200
    info = r.json()
    assert info["provider"] == "CPUExecutionProvider" or "CUDA" in info["provider"]
    assert info["bundle"]["frames"] == TINY["frames"]
    assert info["limits"]["allowed_frames"] == [1, 5, 9]


def test_health_endpoints(server):
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200
    r = httpx.get(f"{server}/readyz", timeout=10)
    assert r.status_code == 200
    ready = r.json()
    assert ready["ready"] is True
    assert ready["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert ready["io_binding"] == (ready["provider"] == "CUDAExecutionProvider")


def test_openapi_swagger_and_prometheus(server):
    spec = httpx.get(f"{server}/docs.json", timeout=10).json()
    for route in ("/generate", "/expand", "/tasks/generate/submit", "/tasks/generate/status", "/tasks/generate/get"):
        assert route in spec["paths"], route
    schema = json.dumps(spec)
    assert "negative_prompt" in schema and "num_frames" in schema  # the request schema is documented
    page = httpx.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and "swagger" in page.text.lower()
    post(server, {"prompt": "a green square", "steps": 1})
    metrics = httpx.get(f"{server}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "bentoml_service_request_total" in metrics.text
    assert "zoetrope_generate_batch_size_bucket" in metrics.text


# ----------------------------------------------------------------------------------------------
# Task queue over raw HTTP
# ----------------------------------------------------------------------------------------------


def wait_for_task(url: str, task_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = httpx.get(f"{url}/tasks/generate/status", params={"task_id": task_id}, timeout=10)
        assert status.status_code == 200, status.text
        if status.json()["status"] not in ("pending", "in_progress"):
            return status.json()
        assert time.monotonic() < deadline, f"task {task_id} still {status.json()} after {timeout_s}s"
        time.sleep(0.2)


def test_task_submit_status_get_returns_the_same_video(server):
    body = {"prompt": "a white triangle moving up", "seed": 9, "steps": 2}
    submitted = post(server, body, route="/tasks/generate/submit")
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    assert wait_for_task(server, task_id)["status"] == "completed"
    got = httpx.get(f"{server}/tasks/generate/get", params={"task_id": task_id}, timeout=30)
    assert got.status_code == 200
    assert got.headers["content-type"] == "video/mp4"
    direct = post(server, body)
    assert (read_video(got.content) == read_video(direct.content)).all()


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "num_frames": 4}, "num_frames"),
    ({"prompt": "a", "size": 999}, "size"),
    ({"prompt": ""}, "prompt"),
])
def test_task_submit_rejects_bad_requests_before_queueing(server, body, field):
    r = post(server, body, route="/tasks/generate/submit")
    assert r.status_code == 400, r.text
    assert field in r.text


@pytest.mark.parametrize("path, params, code", [
    ("/tasks/generate/status", {}, 400),
    ("/tasks/generate/status", {"task_id": "no-such-task"}, 404),
    ("/tasks/generate/get", {"task_id": "no-such-task"}, 404),
    ("/tasks/generate/get", {}, 400),
])
def test_task_lookups_with_bad_ids_are_4xx(server, path, params, code):
    assert httpx.get(f"{server}{path}", params=params, timeout=10).status_code == code


# ----------------------------------------------------------------------------------------------
# Prompt expansion (components/expand.py, built separately)
# ----------------------------------------------------------------------------------------------


def test_expand_returns_a_caption(server):
    pytest.importorskip("components.expand")
    r = post(server, {"prompt": "red ball going left"}, route="/expand")
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["caption"], str) and r.json()["caption"]


def test_generate_with_expand_reports_the_prompt_used(server):
    pytest.importorskip("components.expand")
    from urllib.parse import unquote

    r = post(server, {"prompt": "red ball going left", "expand": True, "steps": 1})
    assert r.status_code == 200, r.text
    used = unquote(r.headers["x-zoetrope-prompt"])
    expanded = post(server, {"prompt": "red ball going left"}, route="/expand").json()["caption"]
    assert used == expanded


# ----------------------------------------------------------------------------------------------
# Bad requests: 4xx naming the field, never 5xx
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "a", "steps": -1}, "steps"),
    ({"prompt": "a", "steps": 1000}, "steps"),
    ({"prompt": "a", "seed": -5}, "seed"),
    ({"prompt": "a", "guidance": 99}, "guidance"),
    ({"prompt": "a", "num_frames": 100000}, "num_frames"),
    ({"prompt": "a", "num_frames": 4}, "num_frames"),
    ({"prompt": "a" * 501}, "prompt"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": "a", "steps": "ten"}, "steps"),
    ({"prompt": "a", "steps": 2.5}, "steps"),
    ({"prompt": "a", "stpes": 3}, "stpes"),
    ({}, "prompt"),
    ({"prompt": "a", "seed": 2**31}, "seed"),
    ({"prompt": "a", "seed": 1.5}, "seed"),
    ({"prompt": "a", "guidance": -0.5}, "guidance"),
    ({"prompt": "a", "guidance": "high"}, "guidance"),
    ({"prompt": "a", "num_frames": 0}, "num_frames"),
    ({"prompt": "a", "num_frames": True}, "num_frames"),
    ({"prompt": "a", "size": 64}, "size"),
    ({"prompt": "a", "size": -1}, "size"),
    ({"prompt": "a", "aspect": "16:9"}, "aspect"),
    ({"prompt": "a", "format": "avi"}, "format"),
    ({"prompt": "a", "expand": "yes"}, "expand"),
    ({"prompt": "a", "negative_prompt": 5}, "negative_prompt"),
    ({"prompt": "a", "negative_prompt": "n" * 501}, "negative_prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": None}, "prompt"),
])
def test_invalid_field_is_400_naming_it(server, body, field):
    r = post(server, body)
    assert r.status_code == 400, r.text
    assert field in r.text, r.text


@pytest.mark.parametrize("body, headers", [
    (b"not json", None),
    (b"", None),
    (b"[1, 2, 3]", None),
    (b'"a prompt"', None),
    (b'{"prompt": "a"', None),
    (b"\xff\xfe\x00", None),
    (b"prompt=a", {"content-type": "application/x-www-form-urlencoded"}),
    (b"garbage", {"content-type": "multipart/form-data"}),
    (b"garbage", {"content-type": "application/vnd.bentoml+pickle"}),
    (b"garbage", {"content-type": "text/plain"}),
    (b"null", None),
    (b'{"prompt": "a", "prompt": 5}', None),
    (b'{"prompt": "a", "steps": 1e400}', None),
    (b'{"prompt": "a", "guidance": NaN}', None),
    (b'{"prompt": "' + b"a" * 20000 + b'"}', None),  # over MAX_BODY_BYTES: 413
])
def test_malformed_body_is_4xx_never_5xx(server, body, headers):
    r = post(server, body, headers=headers or {"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200  # and the server lives on


@pytest.mark.parametrize("route", ["/expand", "/tasks/generate/submit"])
@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"prompt": ""}', b'{"prompt": "a", "x": 1}'])
def test_malformed_bodies_on_other_routes_are_4xx(server, route, body):
    r = post(server, body, route=route)
    assert 400 <= r.status_code < 500, (route, r.status_code, r.text)


def test_oversized_streamed_body_is_413(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"a" * 1024
        yield b'"}'

    r = httpx.post(f"{server}/generate", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413


# ----------------------------------------------------------------------------------------------
# From the model store, as a built Bento serves
# ----------------------------------------------------------------------------------------------


def test_serves_the_imported_bundle_from_the_model_store(bundle, tmp_path):
    home = tmp_path / "bentoml"
    code = ("import sys; from serving.store import import_bundle; "
            "print(import_bundle(sys.argv[1], {'alias': 'champion', 'version': 3}, {'run': 'r1'}))")
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true")
    env.pop("ZOETROPE_BUNDLE", None)
    tag = subprocess.run([sys.executable, "-c", code, str(bundle)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    assert tag.startswith("zoetrope-t2v:")
    with serve(home, None, tmp_path / "server.log") as url:
        assert httpx.get(f"{url}/info", timeout=10).json()["source"] == tag
        r = post(url, {"prompt": "a green triangle"})
        assert r.status_code == 200, r.text
        assert read_video(r.content).shape == (TINY["frames"], TINY["size"], TINY["size"], 3)
