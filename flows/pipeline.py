"""The Zoetrope pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's order.

Each task asks DVC to reproduce its stage (`dvc repro --single-item`): DVC skips it when its
code, params and inputs are unchanged, runs `zoetrope stage NAME` otherwise, and versions the
outputs in its cache and dvc.lock. So a failed run started again (from the dashboard's Retry, or
`zoetrope run`) skips every stage that had finished. The flow holds the MLflow parent run, passes
its id to the stages, and leaves Prefect artifacts: a progress bar that advances per stage, a
table of the evaluation metrics and a markdown report.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.tasks import exponential_backoff

from flows import tracking
from flows.knobs import Knobs
from flows.project import Project, quiet_environment

# Stages that train a network: one at a time per Prefect server, so two runs never share a GPU.
TRAINING_STAGES = ("caption", "train_vae", "train_dit", "evaluate")
TRAINING_LIMIT = "zoetrope-training"
# Stages and tasks that only talk to a store (MLflow, the Prefect API) get retried with backoff;
# training stages do not: their failures are deterministic and a rerun costs minutes.
IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
IO_STAGES = ("register",)


class StageFailed(RuntimeError):
    pass


@task(name="resolve-params", retries=0)
def resolve_params(project_root: str, profile: str, overrides: list[str]) -> dict:
    cfg = Project(Path(project_root)).resolve_params(profile, overrides)
    return cfg.flat()


@task(name="ensure-training-limit", **IO_RETRIES)
def ensure_training_limit() -> int:
    """Create the global concurrency limit `zoetrope-training` (1 slot) unless it exists.

    An existing limit is left alone: a machine with two GPUs may raise it to 2 in the UI.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(TRAINING_LIMIT).limit
        except Exception:  # noqa: BLE001 - ObjectNotFound: create it below
            client.upsert_global_concurrency_limit_by_name(TRAINING_LIMIT, 1)
            return 1


@task(name="stage", task_run_name="{stage}", retries=0)
def run_stage(project_root: str, stage: str, parent_run_id: str, force: bool = False) -> dict:
    """Reproduce one DVC stage (always, when `force`); returns whether it ran and how long it took."""
    from dvc.repo import Repo
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    project = Project(Path(project_root))
    os.environ[tracking.PARENT_ENV] = parent_run_id
    # `zoetrope` must resolve to this interpreter's entry point inside the stage command.
    bindir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # The stage's own sub-flows (the Dask shard maps of prepare and caption) report to this server.
    os.environ["PREFECT_API_URL"] = current_api_url()
    slot = concurrency(TRAINING_LIMIT, occupy=1) if stage in TRAINING_STAGES else contextlib.nullcontext()
    t0 = time.time()
    try:
        # DVC resolves stage paths against the working directory, whoever calls the flow.
        with slot, contextlib.chdir(project_root), Repo(project_root) as repo:
            ran = repo.reproduce(stage, single_item=True, force=force)
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage's own one-line reason
        if stage == "prepare":  # a failed validation is when its Data Docs matter most
            with contextlib.suppress(Exception):
                link_data_docs_artifact(project, parent_run_id)
        err = project.error_file(stage)
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        reason = (err.read_text().split("\n\n")[0] if err.exists()
                  else f"{type(exc).__name__}: {exc}{cause}")
        raise StageFailed(f"{reason} (details: {err})") from None
    seconds = time.time() - t0
    if stage == "prepare" and ran:
        link_data_docs_artifact(project, parent_run_id)
    status = "ran" if ran else "skipped (up to date)"
    logger.info("stage %s %s in %.1f s", stage, status, seconds)
    return {"stage": stage, "ran": bool(ran), "seconds": round(seconds, 1)}


def current_api_url() -> str:
    """The Prefect API this flow reports to (a temporary server's, under plain `zoetrope run`)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def link_data_docs_artifact(project: Project, parent_run_id: str) -> None:
    """A markdown artifact linking the prepare stage's Great Expectations Data Docs in MLflow."""
    docs = tracking.data_docs_of(project, parent_run_id)
    if docs is None:
        return
    create_markdown_artifact(
        "# Data validation\n\n"
        f"Great Expectations Data Docs of the clip manifest: [open in MLflow]({docs['ui']})\n\n"
        f"Artifact `{docs['uri']}` of the prepare stage run `{docs['run_id']}`; "
        f"local copy `{project.path('data/clips/data_docs/index.html')}`.",
        key="data-docs", description="Great Expectations Data Docs of the prepared clips")


@task(name="open-mlflow-run", **IO_RETRIES)
def open_run(project_root: str, run_name: str, reproduces: str | None = None) -> str:
    project = Project(Path(project_root))
    return tracking.open_parent(project, run_name, reproduces=reproduces)


@task(name="close-mlflow-run", **IO_RETRIES)
def close_run(project_root: str, run_id: str, summary: dict | None, status: str) -> None:
    tracking.close_parent(Project(Path(project_root)), run_id, summary, status)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def summarize(project: Project, parent_run_id: str, results: list[dict]) -> dict:
    # A run that stopped early (a stage deployment) reports only what its own stages cover,
    # never the evaluation or registration a previous run left on disk.
    covered = {r["stage"] for r in results}
    evaluation = _load(project.path("reports/evaluation.json")) if "evaluate" in covered else {}
    export = _load(project.path("reports/export.json")) if "export" in covered else {}
    registered = _load(project.path("reports/register.json")) if "register" in covered else {}
    gates = list(evaluation.get("gates", []))
    if export and gates:
        from flows.registry import all_gates

        gates = all_gates(evaluation, export)
    return {
        "mlflow_run_id": parent_run_id,
        "mlflow_run_url": tracking.run_url(project, parent_run_id),
        "tracking_uri": project.tracking_uri,
        "stages": results,
        "metrics": evaluation.get("metrics", {}),
        "gates": gates,
        "passed": bool(gates) and all(g["passed"] for g in gates),
        "registered_version": registered.get("version"),
        "champion": registered.get("champion", False),
        "alias": registered.get("alias"),
        "failed_gates": registered.get("failed_gates", []),
        "promotion": registered.get("promotion"),
        "samples": str(project.path("reports/eval/samples")),
        "evaluation_report": evaluation_report(project, evaluation) if evaluation else None,
    }


def evaluation_report(project: Project, evaluation: dict) -> str | None:
    """The evaluate stage's report.md with its sample grids linked to the evaluate run's artifacts
    in the MLflow UI (`zoetrope up` serves them), where a browser can load them."""
    path = project.path("reports/eval/report.md")
    if not path.exists():
        return None
    text = path.read_text()
    run_id = evaluation.get("mlflow_run_id")
    if run_id:
        base = os.environ.get(tracking.UI_ENV, tracking.DEFAULT_UI).rstrip("/")
        text = text.replace("](samples/", f"]({base}/get-artifact?run_uuid={run_id}&path=samples/")
    return text


def report_markdown(summary: dict) -> str:
    lines = ["# Zoetrope pipeline run", "",
             f"MLflow run [`{summary['mlflow_run_id']}`]({summary['mlflow_run_url']}) "
             f"(tracking: `{summary['tracking_uri']}`)", "",
             "| gate | value | threshold | result |", "|---|---|---|---|"]
    for g in summary["gates"]:
        lines.append(f"| {g['name']} | {g['value']:.4g} | {g['op']} {g['threshold']:.4g} | "
                     f"{'pass' if g['passed'] else '**FAIL**'} |")
    version = summary["registered_version"]
    if version is not None:
        alias = summary.get("alias") or ("champion" if summary["champion"] else "none (a gate failed)")
        lines += ["", f"Registered model `zoetrope-t2v` version {version}, alias **{alias}**."]
        promotion = summary.get("promotion")
        if promotion:
            champion = (f"champion v{promotion['champion_version']}: {promotion['champion_value']:.4g}"
                        if promotion.get("champion_value") is not None else
                        f"champion: {'v' + str(promotion['champion_version']) if promotion.get('champion_version') else 'none'}")
            lines += ["", f"Champion/challenger on `{promotion['metric']}` ({promotion['direction']} is better): "
                          f"this version {promotion['value']:.4g}, {champion}. "
                          f"Decision **{promotion['decision']}**: {promotion['reason']}."]
    lines += ["", f"Sample videos: `{summary['samples']}`", "",
              "| stage | status | seconds |", "|---|---|---|"]
    for r in summary["stages"]:
        lines.append(f"| {r['stage']} | {'ran' if r['ran'] else 'skipped'} | {r['seconds']} |")
    return "\n".join(lines)


def run_stages(project: Project, profile: str, overrides: list[str], *, until: str | None = None,
               force: bool = False, run_name: str | None = None, reproduces: str | None = None) -> dict:
    """The body of every pipeline flow: stages in dvc.yaml order, up to and including `until`."""
    quiet_environment(project)
    stages = project.stage_names()
    if until is not None:
        if until not in stages:
            raise ValueError(f"unknown stage {until!r}: stages are {', '.join(stages)}")
        stages = stages[: stages.index(until) + 1]
    resolve_params(str(project.root), profile, overrides)
    ensure_training_limit()
    parent = open_run(str(project.root), run_name or f"pipeline-{profile}", reproduces)
    progress = create_progress_artifact(
        0.0, key="pipeline-progress", description=f"0/{len(stages)} stages; next: {stages[0]}")
    results: list[dict] = []
    summary = None
    status = "FAILED"
    # A user folder is outside the project, where DVC cannot see it change: always re-copy it.
    user_data = project.config().data.source != "synthetic"
    try:
        for i, stage in enumerate(stages):
            task_fn = run_stage.with_options(**IO_RETRIES) if stage in IO_STAGES else run_stage
            try:
                results.append(task_fn(str(project.root), stage, parent, force or (user_data and i == 0)))
            except BaseException:
                update_progress_artifact(progress, 100.0 * i / len(stages),
                                         description=f"FAILED at {stage} ({i}/{len(stages)} stages done)")
                raise
            nxt = f"; next: {stages[i + 1]}" if i + 1 < len(stages) else ""
            update_progress_artifact(progress, 100.0 * (i + 1) / len(stages),
                                     description=f"{i + 1}/{len(stages)} stages{nxt}")
        summary = summarize(project, parent, results)
        markdown = report_markdown(summary)
        summary["report"] = markdown
        create_markdown_artifact(markdown, key="pipeline-report", description="Gates, model, samples")
        if summary.get("evaluation_report"):
            create_markdown_artifact(summary["evaluation_report"], key="evaluation-report",
                                     description="Evaluation metrics, gates and sample grids")
        if summary["metrics"]:
            create_table_artifact(
                [{"metric": k, "value": round(float(v), 5)} for k, v in sorted(summary["metrics"].items())],
                key="evaluation-metrics", description="Evaluation metrics of this run",
            )
        status = "FINISHED"
        return summary
    finally:
        close_run(str(project.root), parent, summary, status)


@flow(name="zoetrope-pipeline", log_prints=True)
def pipeline(profile: str = "tiny", overrides: list[str] | None = None, project_dir: str | None = None,
             knobs: Knobs | None = None, force: bool = False, data: str | None = None) -> dict:
    """Run every stage of dvc.yaml in order; DVC skips those already up to date.

    data: a folder of your own videos to train on instead of the synthetic world (sets
    `data.source`); its raw stage always re-copies the folder, and DVC's hash of the copy
    then decides whether later stages rerun.

    profile: a profile of params.yaml (tiny, ci, ...). overrides: `section.key=value` each.
    project_dir: the project folder (dvc.yaml, data/, .zoetrope/); default: the current one.
    knobs: the dashboard's typed overrides (applied before `overrides`). force: rerun every
    stage even when DVC has it up to date.
    """
    project = Project.find(project_dir)
    all_overrides = (knobs.overrides() if knobs else []) + list(overrides or [])
    if data is not None:
        folder = Path(data).expanduser().resolve()
        if not folder.is_dir():
            raise NotADirectoryError(f"--data {data!r} is not a folder: pass the folder of your videos")
        all_overrides.append(f"data.source={json.dumps(str(folder))}")  # JSON quoting is valid YAML
    return run_stages(project, profile, all_overrides, force=force)
