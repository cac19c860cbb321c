"""`zoetrope up` for real: the Prefect server, the MLflow server and the deployments answer on
127.0.0.1, and SIGTERM stops them all (no port left answering, exit code 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT, make_project

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_up_starts_everything_and_sigterm_stops_it(tmp_path):
    project = make_project(tmp_path / "project")
    pp, mp = _free_port(), _free_port()
    # As a user's shell: no other test's project, store or homes (`up` keeps Prefect's database in the project).
    stale = ("ZOETROPE_PROJECT", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "BENTOML_HOME")
    env = {k: v for k, v in os.environ.items() if k not in stale}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "up", "--prefect-port", str(pp),
                             "--mlflow-port", str(mp), "--profile", "ci"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready in"):
                break
        assert any(line.startswith("ready in") for line in lines), "".join(lines)
        assert _answers(f"http://127.0.0.1:{pp}/api/health")
        assert _answers(f"http://127.0.0.1:{mp}/health")
        assert (project / ".zoetrope" / "prefect").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    assert not _answers(f"http://127.0.0.1:{pp}/api/health")
    assert not _answers(f"http://127.0.0.1:{mp}/health")
