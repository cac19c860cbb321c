"""The Zoetrope pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's order.

Each task asks DVC to reproduce its stage (`dvc repro --single-item`): DVC skips it when its
code, params and inputs are unchanged, runs `zoetrope stage NAME` otherwise, and versions the
outputs in its cache and dvc.lock. The flow holds the MLflow parent run, passes its id to the
stages, and leaves Prefect artifacts: a table of each stage's metrics and a markdown report.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import tracking
from flows.project import Project, quiet_environment


class StageFailed(RuntimeError):
    pass


@task(name="resolve-params", retries=0)
def resolve_params(project_root: str, profile: str, overrides: list[str]) -> dict:
    cfg = Project(Path(project_root)).resolve_params(profile, overrides)
    return cfg.flat()


@task(name="stage", task_run_name="{stage}", retries=0)
def run_stage(project_root: str, stage: str, parent_run_id: str, force: bool = False) -> dict:
    """Reproduce one DVC stage (always, when `force`); returns whether it ran."""
    from dvc.repo import Repo

    logger = get_run_logger()
    project = Project(Path(project_root))
    os.environ[tracking.PARENT_ENV] = parent_run_id
    # `zoetrope` must resolve to this interpreter's entry point inside the stage command.
    bindir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    t0 = time.time()
    try:
        # DVC resolves stage paths against the working directory, whoever calls the flow.
        with contextlib.chdir(project_root), Repo(project_root) as repo:
            ran = repo.reproduce(stage, single_item=True, force=force)
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage's own one-line reason
        err = project.error_file(stage)
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        reason = (err.read_text().split("\n\n")[0] if err.exists()
                  else f"{type(exc).__name__}: {exc}{cause}")
        raise StageFailed(f"{reason} (details: {err})") from None
    seconds = time.time() - t0
    status = "ran" if ran else "skipped (up to date)"
    logger.info("stage %s %s in %.1f s", stage, status, seconds)
    return {"stage": stage, "ran": bool(ran), "seconds": round(seconds, 1)}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def summarize(project: Project, parent_run_id: str, results: list[dict]) -> dict:
    evaluation = _load(project.path("reports/evaluation.json"))
    export = _load(project.path("reports/export.json"))
    registered = _load(project.path("reports/register.json"))
    gates = list(evaluation.get("gates", []))
    if export:
        from flows.registry import all_gates

        gates = all_gates(evaluation, export)
    return {
        "mlflow_run_id": parent_run_id,
        "tracking_uri": project.tracking_uri,
        "stages": results,
        "metrics": evaluation.get("metrics", {}),
        "gates": gates,
        "passed": bool(gates) and all(g["passed"] for g in gates),
        "registered_version": registered.get("version"),
        "champion": registered.get("champion", False),
        "failed_gates": registered.get("failed_gates", []),
        "samples": str(project.path("reports/eval/samples")),
    }


def report_markdown(summary: dict) -> str:
    lines = ["# Zoetrope pipeline run", "",
             f"MLflow run `{summary['mlflow_run_id']}` ({summary['tracking_uri']})", "",
             "| gate | value | threshold | result |", "|---|---|---|---|"]
    for g in summary["gates"]:
        lines.append(f"| {g['name']} | {g['value']:.4g} | {g['op']} {g['threshold']:.4g} | "
                     f"{'pass' if g['passed'] else '**FAIL**'} |")
    version = summary["registered_version"]
    alias = "champion" if summary["champion"] else "not promoted"
    lines += ["", f"Registered model `zoetrope-t2v` version {version}: **{alias}**.", "",
              f"Sample videos: `{summary['samples']}`", "",
              "| stage | status | seconds |", "|---|---|---|"]
    for r in summary["stages"]:
        lines.append(f"| {r['stage']} | {'ran' if r['ran'] else 'skipped'} | {r['seconds']} |")
    return "\n".join(lines)


@flow(name="zoetrope-pipeline", log_prints=True)
def pipeline(profile: str = "tiny", overrides: list[str] | None = None,
             project_dir: str | None = None, data: str | None = None) -> dict:
    """Run every stage of dvc.yaml in order; DVC skips those already up to date.

    `data`: a folder of your own videos to train on instead of the synthetic world (sets
    `data.source`). Its raw stage always re-copies the folder, since DVC cannot see changes
    outside the project; DVC's hash of the copy then decides whether later stages rerun.
    """
    project = Project.find(project_dir)
    quiet_environment(project)
    overrides = list(overrides or [])
    if data is not None:
        folder = Path(data).expanduser().resolve()
        if not folder.is_dir():
            raise NotADirectoryError(f"--data {data!r} is not a folder: pass the folder of your videos")
        overrides.append(f"data.source={json.dumps(str(folder))}")  # JSON quoting is valid YAML
    resolve_params(str(project.root), profile, overrides)
    cfg = project.config()
    parent = tracking.start_parent(project, cfg, run_name=f"pipeline-{profile}")
    import mlflow

    results: list[dict] = []
    status = "FINISHED"
    try:
        user_data = cfg.data.source != "synthetic"
        for n, stage in enumerate(project.stage_names()):
            results.append(run_stage(str(project.root), stage, parent, force=user_data and n == 0))
        summary = summarize(project, parent, results)
        mlflow.set_tags({"dvc.data_version": project.data_version(),
                         "zoetrope.stages_run": ",".join(r["stage"] for r in results if r["ran"]) or "none"})
        tracking.log_summary_metrics(summary["metrics"])
        for g in summary["gates"]:
            mlflow.log_metric(f"gate.{g['name']}.passed", float(g["passed"]))
        if summary["registered_version"] is not None:
            mlflow.set_tag("zoetrope.registered_version", str(summary["registered_version"]))
        mlflow.set_tag("zoetrope.champion", str(summary["champion"]).lower())
        markdown = report_markdown(summary)
        mlflow.log_text(markdown, "report.md")
        create_markdown_artifact(markdown, key="pipeline-report", description="Gates, model, samples")
        create_table_artifact(
            [{"metric": k, "value": round(float(v), 5)} for k, v in sorted(summary["metrics"].items())],
            key="evaluation-metrics", description="Evaluation metrics of this run",
        )
        return summary
    except BaseException:
        status = "FAILED"
        raise
    finally:
        mlflow.end_run(status=status)
