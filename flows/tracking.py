"""MLflow wiring: one parent run per pipeline run, a nested run per stage, the model registry.

The tracking URI is always set explicitly (default: SQLite in `.zoetrope/mlflow.db`, artifacts
in `.zoetrope/mlartifacts`), so nothing lands in whatever folder a command runs from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from components.config import Config
from flows.project import EXPERIMENT, REGISTERED_MODEL, Project

PARENT_ENV = "ZOETROPE_PARENT_RUN_ID"
# Where the MLflow UI is (`zoetrope up` sets it): the Prefect report links runs there.
UI_ENV = "ZOETROPE_MLFLOW_UI"
DEFAULT_UI = "http://127.0.0.1:5000"
# Lineage artifacts of every parent run: what `zoetrope reproduce` reads back.
LINEAGE_DIR = "lineage"
# The Great Expectations Data Docs of the prepare stage run, and the tag that links them.
DATA_DOCS_ARTIFACT = "data/data_docs"
DATA_DOCS_TAG = "zoetrope.data_docs"
# Stage runs that read the prepared clips: each logs them as its dataset input.
CLIP_READERS = ("caption", "train_vae", "encode", "evaluate")


def setup(project: Project) -> str:
    """Point MLflow at the project's store; create the experiment with its artifact root."""
    uri = project.tracking_uri
    # MLflow exports the URI to the environment, so decide by the URI, not by the variable:
    # the embedded SQLite store keeps artifacts beside it; a server decides its own.
    local = uri == project.default_tracking_uri
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        location = project.artifact_location if local else None
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def lineage_tags(project: Project) -> dict[str, str]:
    selection = project.selection()
    overrides = list(selection.get("overrides") or [])
    return {
        "git.commit": project.git_commit(),
        "dvc.data_version": project.data_version(),
        "dvc.lock_md5": dvc_lock_md5(project),
        "zoetrope.profile": str(selection.get("profile")),
        "zoetrope.overrides": " ".join(overrides) or "-",
        "zoetrope.overrides_json": json.dumps(overrides),
    }


def dvc_lock_md5(project: Project) -> str:
    """The hash of dvc.lock: one value that names the data, models and params of a run."""
    lock = project.path("dvc.lock")
    return hashlib.md5(lock.read_bytes()).hexdigest() if lock.exists() else "none"


def run_url(project: Project, run_id: str) -> str:
    exp = setup(project)
    base = os.environ.get(UI_ENV, DEFAULT_UI).rstrip("/")
    return f"{base}/#/experiments/{exp}/runs/{run_id}"


def open_parent(project: Project, run_name: str, reproduces: str | None = None) -> str:
    """Create the pipeline's parent run with its lineage: resolved params, profile, overrides.

    The client API with an explicit run id (no active run) so the call can be retried and the
    stages, in other processes, attach to it through $ZOETROPE_PARENT_RUN_ID.
    """
    exp_id = setup(project)
    client = MlflowClient(project.tracking_uri)
    tags = {**lineage_tags(project), "zoetrope.kind": "pipeline", "mlflow.runName": run_name}
    if reproduces:
        tags["zoetrope.reproduces"] = reproduces
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    # Same keys on every run (the whole flat config), so the runs table compares them.
    params = [Param(k, str(v)) for k, v in project.config().flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_artifact(run_id, str(project.path(".zoetrope/params.yaml")), LINEAGE_DIR)
    client.log_text(run_id, yaml.safe_dump(project.selection()), f"{LINEAGE_DIR}/selection.yaml")
    return run_id


def close_parent(project: Project, run_id: str, summary: dict | None, status: str) -> None:
    """Record what the run produced (dvc.lock, metrics, gates, model) and end it."""
    client = MlflowClient(project.tracking_uri)
    tags = {"dvc.data_version": project.data_version(), "dvc.lock_md5": dvc_lock_md5(project)}
    log_clips_input(project, run_id, "training")
    lock = project.path("dvc.lock")
    if lock.exists():
        client.log_artifact(run_id, str(lock), LINEAGE_DIR)
    if summary is not None:
        now = int(time.time() * 1000)
        metrics = {k: float(v) for k, v in summary["metrics"].items() if _is_number(v)}
        metrics.update({f"gate.{g['name']}.passed": float(g["passed"]) for g in summary["gates"]})
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())])
        tags["zoetrope.stages_run"] = ",".join(r["stage"] for r in summary["stages"] if r["ran"]) or "none"
        if summary["registered_version"] is not None:
            tags["zoetrope.registered_version"] = str(summary["registered_version"])
            tags["zoetrope.alias"] = str(summary.get("alias") or "-")
        tags["zoetrope.champion"] = str(summary["champion"]).lower()
        if summary.get("promotion"):  # champion/challenger: the decision and why, both figures
            tags["zoetrope.promotion"] = summary["promotion"]["decision"]
            tags["zoetrope.promotion_reason"] = summary["promotion"]["reason"]
        if summary.get("report"):
            client.log_text(run_id, summary["report"], "report.md")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def link_data_docs(project: Project, run_id: str, docs_dir: Path) -> str:
    """Link the run to its logged Data Docs: the tag `zoetrope.data_docs` (the artifact URI of the
    index page), `zoetrope.data_docs_ui` (the page in the MLflow UI) and the run's description."""
    client = MlflowClient(project.tracking_uri)
    run = client.get_run(run_id)
    page = f"{DATA_DOCS_ARTIFACT}/index.html"
    if not (Path(docs_dir) / "index.html").exists():
        raise FileNotFoundError(f"{docs_dir}/index.html is missing: Great Expectations wrote no Data Docs")
    uri = f"{run.info.artifact_uri}/{page}"
    base = os.environ.get(UI_ENV, DEFAULT_UI).rstrip("/")
    ui = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}/artifactPath/{page}"
    client.set_tag(run_id, DATA_DOCS_TAG, uri)
    client.set_tag(run_id, f"{DATA_DOCS_TAG}_ui", ui)
    client.set_tag(run_id, "mlflow.note.content",
                   f"Great Expectations Data Docs of the clip manifest: [{page}]({ui}) (`{uri}`)")
    return uri


def data_docs_of(project: Project, parent_run_id: str) -> dict[str, str] | None:
    """The Data Docs links of the newest prepare stage run under a pipeline run, if it has them."""
    exp = setup(project)
    runs = MlflowClient(project.tracking_uri).search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`zoetrope.stage` = 'prepare'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or DATA_DOCS_TAG not in runs[0].data.tags:
        return None
    tags = runs[0].data.tags
    return {"run_id": runs[0].info.run_id, "uri": tags[DATA_DOCS_TAG], "ui": tags.get(f"{DATA_DOCS_TAG}_ui", "")}


def clips_dataset(project: Project):
    """The prepared clips as an MLflow dataset: the manifest's rows, digest = the DVC hash of
    `data/clips` in dvc.lock (MLflow's own hash of the manifest before DVC has locked it)."""
    import mlflow.data
    import pandas as pd

    manifest = project.path("data/clips/manifest.csv")
    if not manifest.exists():
        return None
    version = project.data_version()
    digest = version.removesuffix(".dir") if version != "none" else None
    df = pd.read_csv(manifest, dtype={"clip_id": str, "caption": str})
    with warnings.catch_warnings():  # "integer columns cannot represent missing values": none are missing
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(df, source=str(project.path("data/clips")), name="clips", digest=digest)


def log_clips_input(project: Project, run_id: str, context: str) -> bool:
    """Log the clips as a dataset input of `run_id` (`mlflow.log_input` through the client)."""
    from mlflow.entities import DatasetInput, InputTag

    dataset = clips_dataset(project)
    if dataset is None:
        return False
    MlflowClient(project.tracking_uri).log_inputs(run_id, [DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])
    return True


class StageLogger:
    """The `log(step, metrics)` callback that components report through, sent to MLflow."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self._last = 0.0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        clean = {f"{self.prefix}{k}": float(v) for k, v in metrics.items() if _is_number(v)}
        if clean:
            mlflow.log_metrics(clean, step=int(step))

    def child(self, prefix: str) -> "StageLogger":
        return StageLogger(self.prefix + prefix)


SYSTEM_METRICS_INTERVAL = 1.0  # seconds


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@contextlib.contextmanager
def stage_run(project: Project, stage: str, cfg: Config) -> Iterator[StageLogger]:
    """A nested run under the pipeline's parent run (or a standalone run under plain `dvc repro`)."""
    setup(project)
    parent = os.environ.get(PARENT_ENV)
    tags = {**lineage_tags(project), "zoetrope.kind": "stage", "zoetrope.stage": stage}
    # CPU, memory and GPU every SYSTEM_METRICS_INTERVAL s (MLflow's default of 10 s left stages of a
    # few seconds with no sample at all); a psutil read per second costs nothing measurable.
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
    mlflow.set_system_metrics_samples_before_logging(1)
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent, nested=bool(parent), tags=tags, log_system_metrics=True
    ):
        mlflow.log_params(cfg.flat())
        if stage in CLIP_READERS:
            log_clips_input(project, mlflow.active_run().info.run_id, stage)
        t0 = time.time()
        try:
            yield StageLogger()
        finally:
            mlflow.log_metric("stage_seconds", time.time() - t0)


def log_summary_metrics(metrics: dict[str, float], prefix: str = "") -> None:
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if _is_number(v)}
    if clean:
        mlflow.log_metrics(clean)


def log_dir(path: Path, artifact_path: str) -> None:
    if path.exists():
        mlflow.log_artifacts(str(path), artifact_path)


# ---------------------------------------------------------------------------------- registry


def champion_version(project: Project) -> str | None:
    setup(project)
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version
    except mlflow.exceptions.MlflowException:
        return None


def download_bundle(project: Project, version: str | None = None) -> tuple[Path, str]:
    """Fetch the ONNX bundle of a registered version (default: the champion) into `.zoetrope`."""
    setup(project)
    client = MlflowClient()
    if version is None:
        version = champion_version(project)
        if version is None:
            raise LookupError(
                f"model {REGISTERED_MODEL!r} has no 'champion' alias: run `zoetrope run` until every "
                "gate passes, or pass --version N to use a registered version"
            )
    try:
        mv = client.get_model_version(REGISTERED_MODEL, str(version))
    except mlflow.exceptions.MlflowException:
        raise LookupError(f"model {REGISTERED_MODEL!r} has no version {version}: see the MLflow UI") from None
    target = project.state / "bundles" / f"v{mv.version}"
    if not (target / "bundle.json").exists():
        tmp = target.with_name(target.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{REGISTERED_MODEL}/{mv.version}", dst_path=str(tmp)
        )
        bundle = next(Path(local).rglob("bundle.json")).parent
        bundle.rename(target)
        if tmp.exists():
            shutil.rmtree(tmp)
    return target, str(mv.version)
