"""Orchestration overhead: the Prefect pipeline against the same stages as plain Python functions,
in one run, on the `ci` profile; and the startup time of `zoetrope up`.

  PYTHONPATH=. nice -n 19 python benchmarks/orchestration.py [--profile ci] [--no-up]

Each path gets a fresh copy of the project (its own git repo, DVC cache, MLflow store):
  plain   - `flows.stages.run(name)` for every stage of dvc.yaml, in order, in this process, with
            `dask.enabled=false`: the stage functions with their MLflow runs, nothing else;
  prefect - `flows.pipeline.pipeline(profile=...)`, what `zoetrope run` calls: a temporary Prefect
            server, one task per stage, `dvc repro --single-item` running `zoetrope stage NAME`
            in a subprocess, Dask sub-flows (a two-worker local cluster) for prepare and caption,
            the MLflow parent run, Prefect artifacts.
Prints both wall times, the ratio prefect / plain and per-stage seconds as a markdown table; then
(unless --no-up) starts `zoetrope up` in a third fresh copy on free ports and reports when the
Prefect API, the MLflow server and every deployment answered, and stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_project  # noqa: E402 - also isolates Prefect/BentoML homes, telemetry off


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain(root: Path, profile: str) -> dict:
    from flows import stages
    from flows.project import Project

    project = Project(root)
    os.chdir(root)
    t0 = time.perf_counter()
    project.resolve_params(profile, ["dask.enabled=false"])
    per_stage = {}
    for name in project.stage_names():
        t = time.perf_counter()
        stages.run(name, project)
        per_stage[name] = time.perf_counter() - t
    return {"seconds": time.perf_counter() - t0, "stages": per_stage}


def prefect(root: Path, profile: str) -> dict:
    from flows.pipeline import pipeline

    os.chdir(root)
    t0 = time.perf_counter()
    summary = pipeline(profile=profile, project_dir=str(root))
    return {"seconds": time.perf_counter() - t0,
            "stages": {r["stage"]: r["seconds"] for r in summary["stages"]},
            "all_ran": all(r["ran"] for r in summary["stages"])}


def up_startup(root: Path, profile: str) -> dict:
    from flows.project import Project, quiet_environment
    from flows.up import up

    project = Project(root)
    quiet_environment(project)
    os.chdir(root)
    return up(project, prefect_port=_free_port(), mlflow_port=_free_port(), profile=profile,
              timeout=600, wait_forever=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--no-up", action="store_true")
    args = ap.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # `zoetrope run`'s temporary Prefect server gets 20 s to start by default; a busy shared
    # machine needs more (the wait is inside the measured Prefect time either way).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    work = Path(tempfile.mkdtemp(prefix="zoetrope-bench-orch-"))
    result = {"plain": plain(make_project(work / "plain"), args.profile)}
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow exported the plain project's store
    result["prefect"] = prefect(make_project(work / "prefect"), args.profile)
    ratio = result["prefect"]["seconds"] / result["plain"]["seconds"]
    print(f"\n| stage | plain s | Prefect pipeline s |\n|---|---|---|")
    for name, secs in result["plain"]["stages"].items():
        print(f"| {name} | {secs:.1f} | {result['prefect']['stages'].get(name, float('nan')):.1f} |")
    print(f"| **total** | **{result['plain']['seconds']:.1f}** | **{result['prefect']['seconds']:.1f}** |")
    print(f"\norchestration overhead: Prefect pipeline / plain functions = {ratio:.2f}x "
          f"(+{result['prefect']['seconds'] - result['plain']['seconds']:.1f} s)")
    if not args.no_up:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        result["up"] = up_startup(make_project(work / "up"), args.profile)
        print("zoetrope up: " + ", ".join(f"{k} {v:.1f}" for k, v in result["up"].items()))
    result["ratio"] = ratio
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
