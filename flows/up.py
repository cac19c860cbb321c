"""`zoetrope up`: the local platform in one command, stopped cleanly by Ctrl-C or SIGTERM.

Starts, bound to 127.0.0.1:
- the Prefect server (`prefect server start`), its database in the project's Prefect home;
- the MLflow server over the project's store (SQLite `.zoetrope/mlflow.db`, artifacts in
  `.zoetrope/mlartifacts`, proxied through the server);
- `zoetrope deploy`, which registers the deployments and runs what the dashboard starts.
It reports when each answers and the total startup time, then waits. Each child runs in its
own process group so stopping `up` stops the flow runs they started too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flows.project import Project


class UpError(RuntimeError):
    """A service did not start: its log says why."""


@dataclass
class Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, cwd: Path) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        fh.close()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise UpError(f"{self.name} exited with code {self.proc.returncode}: "
                          + " | ".join(tail) + f" (full log: {self.log})")

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(5)


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def _post(url: str, body: dict, timeout: float = 2.0) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def _wait(what: str, ready, services: list[Service], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for s in services:
            s.check_alive()
        if ready():
            return time.monotonic()
        time.sleep(0.25)
    raise UpError(f"{what} did not answer within {timeout:.0f} s: see the logs in .zoetrope/logs/")


def services(project: Project, prefect_port: int, mlflow_port: int, profile: str) -> list[Service]:
    bindir = Path(sys.executable).parent
    logs = project.state / "logs"
    env = dict(os.environ)
    api = f"http://127.0.0.1:{prefect_port}/api"
    prefect_env = {**env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(prefect_port),
                   "PREFECT_UI_API_URL": api}
    prefect_env.pop("PREFECT_API_URL", None)
    mlflow_cmd = [str(bindir / "mlflow"), "server",
                  "--backend-store-uri", project.default_tracking_uri,
                  "--artifacts-destination", project.artifact_location, "--serve-artifacts",
                  "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"]
    deploy_env = {**env, "PREFECT_API_URL": api, "ZOETROPE_MLFLOW_UI": f"http://127.0.0.1:{mlflow_port}"}
    return [
        Service("prefect-server", [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(prefect_port)], prefect_env, logs / "prefect-server.log"),
        Service("mlflow-server", mlflow_cmd, env, logs / "mlflow-server.log"),
        Service("deployments", [sys.executable, "-m", "flows.cli", "deploy", "--profile", profile],
                deploy_env, logs / "deployments.log"),
    ]


def up(project: Project, prefect_port: int = 4200, mlflow_port: int = 5000, profile: str = "tiny",
       timeout: float = 180.0, wait_forever: bool = True) -> dict:
    """Start everything, report startup seconds; block until a signal, then stop everything."""
    from flows.deploy import deployment_names

    prefect, mlflow_srv, deploy = services(project, prefect_port, mlflow_port, profile)
    api = f"http://127.0.0.1:{prefect_port}/api"
    stop_requested = []

    def on_signal(signum, _frame):
        stop_requested.append(signum)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started: list[Service] = []
    figures: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        for s in (prefect, mlflow_srv):
            s.start(project.root)
            started.append(s)
        figures["prefect_api_s"] = _wait(
            "the Prefect API", lambda: _get(f"{api}/health")[0] == 200, started, timeout) - t0
        figures["mlflow_s"] = _wait(
            "the MLflow server", lambda: _get(f"http://127.0.0.1:{mlflow_port}/health")[0] == 200,
            started, timeout) - t0
        deploy.start(project.root)
        started.append(deploy)
        wanted = len(deployment_names())

        def registered() -> bool:
            code, body = _post(f"{api}/deployments/count", {"deployments": {"tags": {"all_": ["zoetrope"]}}})
            return code == 200 and int(body or 0) >= wanted

        figures["deployments_s"] = _wait("the deployments", registered, started, timeout) - t0
        figures["startup_s"] = max(figures.values())
        print(f"Prefect dashboard  http://127.0.0.1:{prefect_port}  (API {api})")
        print(f"MLflow UI          http://127.0.0.1:{mlflow_port}")
        print(f"deployments        {', '.join(deployment_names())}")
        print(f"ready in {figures['startup_s']:.1f} s (Prefect API {figures['prefect_api_s']:.1f} s, "
              f"MLflow {figures['mlflow_s']:.1f} s, deployments {figures['deployments_s']:.1f} s); "
              "Ctrl-C stops everything", flush=True)
        while wait_forever:
            for s in started:
                s.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        for s in reversed(started):  # deployments first, servers last
            s.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
    return figures
