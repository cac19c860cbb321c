"""The BentoML service over real HTTP: `bentoml serve` in a subprocess, raw requests, MP4 decoded.

One server per module (start-up costs seconds), on the tiny really exported bundle of
test_onnx_runtime.py (shared within a session).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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


def post(url: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{url}/generate", json=body, timeout=60, **kwargs)
    return httpx.post(f"{url}/generate", content=body, timeout=60,
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


def test_info_reports_provider_and_bundle(server):
    r = httpx.get(f"{server}/info", timeout=10)
    assert r.status_code == 200
    info = r.json()
    assert info["provider"] == "CPUExecutionProvider" or "CUDA" in info["provider"]
    assert info["bundle"]["frames"] == TINY["frames"]
    assert info["limits"]["allowed_frames"] == [1, 5, 9]


def test_health_endpoints(server):
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200


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
])
def test_malformed_body_is_4xx_never_5xx(server, body, headers):
    r = post(server, body, headers=headers or {"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


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
