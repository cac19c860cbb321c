"""`zoetrope reproduce RUN_ID`: rerun a recorded pipeline run with its params and its data.

Every parent run carries, under `lineage/`, the resolved params (`params.yaml`), the profile and
overrides it was started with (`selection.yaml`) and the `dvc.lock` it ended with. Reproducing:
1. read the profile and overrides; if params.yaml has changed since, add overrides for the keys
   that differ, so the resolved params are exactly the recorded ones;
2. write the recorded dvc.lock back and `dvc checkout`, restoring data and models from the DVC
   cache (`dvc pull` first when they are only on the remote);
3. run the pipeline again and compare the new run's metrics with the recorded ones. By default
   DVC finds every stage up to date (outputs restored); with `force` every stage reruns from
   scratch (training checkpoints set aside). Training draws every random number from (seed,
   step), but `synth` does not yet write byte-identical MP4s run to run, so a forced rerun
   differs slightly in the VAE metrics (measured: PSNR 10.21485 vs 10.21469 at the ci profile).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from prefect import flow

from components.checkpoint import atomic_write_text
from flows.pipeline import run_stages
from flows.project import Project, quiet_environment

LINEAGE = "lineage"


class ReproduceError(RuntimeError):
    """The run cannot be reproduced as asked (unknown run, missing lineage or data)."""


def _lineage(project: Project, run_id: str) -> tuple[dict, dict, str, dict]:
    """(run tags, resolved params, dvc.lock text, selection) recorded with `run_id`."""
    import mlflow
    from mlflow import MlflowClient

    from flows import tracking

    tracking.setup(project)
    client = MlflowClient(project.tracking_uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ReproduceError(f"no MLflow run {run_id!r} in {project.tracking_uri}: "
                             "copy the run id from the MLflow UI or `zoetrope run`'s summary") from None
    if run.data.tags.get("zoetrope.kind") != "pipeline":
        parent = run.data.tags.get("mlflow.parentRunId")
        hint = f": reproduce its pipeline run {parent}" if parent else ""
        raise ReproduceError(f"run {run_id} is not a pipeline run{hint}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=LINEAGE, dst_path=tmp, tracking_uri=project.tracking_uri))
        except Exception as exc:  # noqa: BLE001 - MlflowException / OSError: say what is missing
            raise ReproduceError(f"run {run_id} has no {LINEAGE}/ artifacts ({exc}): it was recorded "
                                 "by an older Zoetrope and cannot be reproduced") from None
        files = {p.name: p.read_text() for p in local.iterdir() if p.is_file()}
    for name in ("params.yaml", "selection.yaml", "dvc.lock"):
        if name not in files:
            raise ReproduceError(f"run {run_id} lacks {LINEAGE}/{name} (did it fail before its end?): "
                                 "reproduce a finished run")
    return run.data.tags, yaml.safe_load(files["params.yaml"]), files["dvc.lock"], yaml.safe_load(
        files["selection.yaml"])


def _value(v) -> str:
    # JSON spells numbers, strings and booleans the way parse_override's YAML reads them back.
    return json.dumps(v)


def plan(project: Project, run_id: str) -> dict:
    """What `reproduce` will do: profile, overrides (with any pinned keys), recorded lock."""
    from components import config as C

    tags, recorded_params, lock, selection = _lineage(project, run_id)
    profile = selection.get("profile", "tiny")
    overrides = list(selection.get("overrides") or [])
    recorded = C.from_dict(recorded_params).flat()
    now = C.load(project.path("params.yaml"), profile, C.overrides_to_dict(overrides)).flat()
    pinned = [f"{k}={_value(recorded[k])}" for k in recorded if now.get(k) != recorded[k]]
    commit = tags.get("git.commit", "unknown")
    return {"run_id": run_id, "profile": profile, "overrides": overrides + pinned, "pinned": pinned,
            "dvc_lock": lock, "git_commit": commit, "same_commit": commit == project.git_commit()}


def restore_data(project: Project, lock_text: str) -> None:
    """Write the recorded dvc.lock back and check its outputs out of the DVC cache."""
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    atomic_write_text(project.path("dvc.lock"), lock_text)
    try:
        with Repo(str(project.root)) as repo:
            repo.checkout(force=True)
    except CheckoutError as exc:
        raise ReproduceError(
            f"dvc checkout could not restore the run's data ({exc}): run `dvc pull` to fetch it from "
            "the DVC remote, or reproduce with --force to rebuild it from the recorded params") from None


def reproduce(project: Project, run_id: str, force: bool = False) -> dict:
    """Restore `run_id`'s params and data and rerun the pipeline; returns both runs' metrics."""
    from mlflow import MlflowClient

    quiet_environment(project)
    p = plan(project, run_id)
    restore_data(project, p["dvc_lock"])
    if force:
        # The trainers resume from a matching checkpoint; a from-scratch rerun must not.
        ckpts = project.state / "checkpoints"
        if ckpts.exists():
            shutil.rmtree(ckpts)
    summary = reproduce_flow(run_id, p["profile"], p["overrides"], str(project.root), force)
    original = MlflowClient(project.tracking_uri).get_run(run_id).data.metrics
    keys = sorted(k for k in summary["metrics"] if not _timing(k))
    diffs = {k: (original.get(k), float(summary["metrics"][k])) for k in keys
             if original.get(k) != float(summary["metrics"][k])}
    return {**p, "new_run_id": summary["mlflow_run_id"], "summary": summary, "compared": keys,
            "differences": diffs, "identical": not diffs and bool(keys)}


@flow(name="zoetrope-reproduce", log_prints=True)
def reproduce_flow(run_id: str, profile: str, overrides: list[str], project_dir: str, force: bool) -> dict:
    """The pipeline with a recorded run's params; the MLflow run is tagged `zoetrope.reproduces`."""
    return run_stages(Project(Path(project_dir)), profile, overrides, force=force,
                      run_name=f"reproduce-{run_id[:8]}", reproduces=run_id)


def _timing(key: str) -> bool:
    """Wall-clock figures differ between any two runs; they are not results."""
    return key.endswith(("_seconds", "_per_s")) or key == "seconds"
