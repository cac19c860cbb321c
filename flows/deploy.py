"""Deployments for the Prefect dashboard: the whole pipeline and each stage worth running alone.

`zoetrope deploy` registers them on the server at $PREFECT_API_URL and serves them from one
long-running process (`prefect.serve`): pressing Run in the dashboard starts the flow in a
subprocess of that process, in the project folder. The alternative, a `process` work pool and
`prefect worker start`, is described in prefect.yaml (README: Dashboard).

A stage flow runs the stages of dvc.yaml up to and including its own; DVC skips those up to
date, so "train DiT" on a fresh project prepares the data first and on a trained one retrains
only the DiT. Every flow takes the same typed form: profile, project folder, knobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, task

from flows.knobs import Knobs
from flows.pipeline import IO_RETRIES, pipeline, run_stages
from flows.project import Project, quiet_environment

DEPLOYMENT = "dashboard"  # every flow's deployment name: `zoetrope-pipeline/dashboard`, ...


def _run_until(stage: str, profile: str, project_dir: str | None, knobs: Knobs | None) -> dict:
    project = Project.find(project_dir)
    return run_stages(project, profile, knobs.overrides() if knobs else [], until=stage,
                      run_name=f"{stage}-{profile}")


@flow(name="zoetrope-prepare-data", log_prints=True)
def prepare_data(profile: str = "tiny", project_dir: str | None = None, knobs: Knobs | None = None) -> dict:
    """Synthesize (or refresh) the raw videos, cut clips, validate them with Great Expectations."""
    return _run_until("prepare", profile, project_dir, knobs)


@flow(name="zoetrope-caption", log_prints=True)
def caption(profile: str = "tiny", project_dir: str | None = None, knobs: Knobs | None = None) -> dict:
    """Train the captioner and re-caption every clip (prepares the data first if needed)."""
    return _run_until("caption", profile, project_dir, knobs)


@flow(name="zoetrope-train-vae", log_prints=True)
def train_vae(profile: str = "tiny", project_dir: str | None = None, knobs: Knobs | None = None) -> dict:
    """Train the causal video VAE."""
    return _run_until("train_vae", profile, project_dir, knobs)


@flow(name="zoetrope-train-dit", log_prints=True)
def train_dit(profile: str = "tiny", project_dir: str | None = None, knobs: Knobs | None = None) -> dict:
    """Encode the clips to latents and train the DiT (earlier stages run only if out of date)."""
    return _run_until("train_dit", profile, project_dir, knobs)


@flow(name="zoetrope-evaluate", log_prints=True)
def evaluate(profile: str = "tiny", project_dir: str | None = None, knobs: Knobs | None = None) -> dict:
    """Generate samples, grade them with the judge, check the gates."""
    return _run_until("evaluate", profile, project_dir, knobs)


@flow(name="zoetrope-export", log_prints=True)
def export(profile: str = "tiny", project_dir: str | None = None, knobs: Knobs | None = None) -> dict:
    """Export the ONNX bundle and check its parity with PyTorch."""
    return _run_until("export", profile, project_dir, knobs)


@task(name="bentoml-build", **IO_RETRIES)
def _bentoml_build(project_root: str) -> str:
    env = dict(os.environ)
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = subprocess.run([str(bentoml), "build", "--output", "tag"], cwd=project_root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            "bentoml build failed: " + " | ".join(tail) + " (the champion must be in the BentoML "
            "model store: run the pipeline until a version is promoted, or `zoetrope rollback --to N`)")
    return proc.stdout.strip().splitlines()[-1]


@flow(name="zoetrope-build-bento", log_prints=True)
def build_bento(project_dir: str | None = None) -> str:
    """`bentoml build` (bentofile.yaml) with the project's BentoML home: packs the champion."""
    project = Project.find(project_dir)
    quiet_environment(project)
    tag = _bentoml_build(str(project.root))
    print(f"built Bento {tag} in {os.environ['BENTOML_HOME']}")
    return tag


STAGE_FLOWS = [prepare_data, caption, train_vae, train_dit, evaluate, export]
ALL_FLOWS = [pipeline, *STAGE_FLOWS, build_bento]


def deployments(project: Project, profile: str = "tiny") -> list:
    """One RunnerDeployment per flow, its form defaulting to this project and profile."""
    from prefect.deployments.runner import EntrypointType

    out = []
    for fl in ALL_FLOWS:
        params = {"project_dir": str(project.root)}
        if fl is not build_bento:
            params["profile"] = profile
        out.append(fl.to_deployment(
            name=DEPLOYMENT, parameters=params, tags=["zoetrope"],
            description=(fl.description or "").strip().split("\n")[0],
            # by module path, so the entrypoint does not depend on where the server runs
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return out


def deployment_names() -> list[str]:
    return [f"{fl.name}/{DEPLOYMENT}" for fl in ALL_FLOWS]


def serve_deployments(project: Project, profile: str = "tiny", limit: int | None = None) -> None:
    """Register every deployment and run the flows the dashboard starts, until Ctrl-C."""
    from prefect import serve

    from flows.pipeline import ensure_training_limit

    ensure_training_limit.fn()  # the limit exists before the first run, visible in the UI
    serve(*deployments(project, profile), limit=limit, pause_on_shutdown=False)
