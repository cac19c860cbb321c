"""Acceptance of the dashboard platform, for real: a Prefect server, `zoetrope deploy` serving the
deployments in its own process, the pipeline triggered through the Prefect API with overridden
parameters at the `ci` profile, its MLflow lineage, a failing run, and `zoetrope reproduce`.

One pipeline run (module fixture) is shared by every test; the reproduction reruns it once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, make_project

pytestmark = pytest.mark.slow

KNOBS = {"dit_steps": 12, "dit_lr": 0.003, "vae_steps": 12}


def _mlflow(project):
    from mlflow import MlflowClient

    from flows.project import Project

    return MlflowClient(Project(project).tracking_uri)


def _pipeline_runs(project):
    client = _mlflow(project)
    exp = client.get_experiment_by_name("zoetrope")
    return client.search_runs([exp.experiment_id], "tags.`zoetrope.kind` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def served(project):
    """`zoetrope deploy` as a user runs it: a subprocess, in the project, on the test server."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import deployment_names

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    env = dict(env, PREFECT_API_URL=PREFECT_API_URL.value(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = open(project / "deploy.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", "--profile", "ci"], cwd=project,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as client:
            while True:
                assert proc.poll() is None, (project / "deploy.log").read_text()[-3000:]
                try:
                    for name in deployment_names():
                        client.read_deployment_by_name(name)
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert time.monotonic() < deadline, "deployments were not registered in 180 s"
                    time.sleep(1)
        yield proc
    finally:
        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        log.close()


def _trigger(project, **params):
    from prefect.deployments import run_deployment

    return run_deployment("zoetrope-pipeline/dashboard", parameters={"project_dir": str(project), **params},
                          timeout=1800, poll_interval=2)


@pytest.fixture(scope="module")
def dashboard_run(project, served):
    flow_run = _trigger(project, profile="ci", knobs=KNOBS)
    assert flow_run.state.is_completed(), (flow_run.state.message, (project / "deploy.log").read_text()[-3000:])
    runs = _pipeline_runs(project)
    assert len(runs) == 1
    return flow_run, runs[0]


def test_every_stage_deployment_is_registered_with_a_typed_form(served):
    from prefect import get_client

    from flows.deploy import deployment_names

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("zoetrope-pipeline/dashboard")
        assert dep.parameters["profile"] == "ci"
        knobs = dep.parameter_openapi_schema["definitions"]["Knobs"]["properties"]
        assert {"dit_steps", "dit_lr", "dit_preset", "vae_steps", "gate_adherence_shape_min"} <= set(knobs)
        for name in deployment_names():
            assert client.read_deployment_by_name(name).tags == ["zoetrope"]
        assert client.read_global_concurrency_limit_by_name("zoetrope-training").limit == 1


def test_dashboard_overrides_land_in_the_mlflow_run(project, dashboard_run):
    _, run = dashboard_run
    client = _mlflow(project)
    params, tags = run.data.params, run.data.tags
    assert (params["dit.steps"], params["dit.lr"], params["vae.steps"]) == ("12", "0.003", "12")
    assert params["caption.steps"] == "30"  # the ci profile's value where no knob was set
    assert tags["zoetrope.profile"] == "ci"
    assert tags["zoetrope.overrides"] == "dit.steps=12 dit.lr=0.003 vae.steps=12"
    assert len(tags["git.commit"]) >= 40 and tags["dvc.lock_md5"] != "none"
    assert run.info.status == "FINISHED"
    assert "vae_psnr" in run.data.metrics  # evaluation metrics on the parent run: sortable
    lineage = {a.path for a in client.list_artifacts(run.info.run_id, "lineage")}
    assert lineage == {"lineage/params.yaml", "lineage/selection.yaml", "lineage/dvc.lock"}
    stage_runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    dit = next(r for r in stage_runs if r.data.tags["zoetrope.stage"] == "train_dit")
    assert dit.data.params["dit.steps"] == "12"
    assert any(k.startswith("system/") for k in dit.data.metrics), sorted(dit.data.metrics)
    # this short run fails the real gates: registered without an alias, the decision on the version
    assert client.get_model_version("zoetrope-t2v", "1").tags["promotion.decision"] == "failed_gates"
    assert "challenger" not in client.get_registered_model("zoetrope-t2v").aliases


def test_each_run_leaves_report_metrics_table_and_full_progress(dashboard_run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run, run = dashboard_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    by_type = {a.type: a for a in arts}
    assert set(by_type) >= {"markdown", "table", "progress"}
    assert float(by_type["progress"].data) == 100.0
    by_key = {a.key: a for a in arts}
    assert {"pipeline-report", "evaluation-report", "data-docs"} <= set(by_key)
    report = by_key["pipeline-report"].data
    assert run.info.run_id in report and "#/experiments/" in report
    assert "| onnx_max_abs_diff |" in report  # the gate table
    assert "alias **none (a gate failed)**" in report and "reports/eval/samples" in report


def test_a_failing_stage_is_red_with_its_reason_and_finished_stages_are_not_redone(project, dashboard_run):
    flow_run = _trigger(project, profile="ci", knobs={**KNOBS, "extra": ["dit.preset=nope"]})
    assert flow_run.state.is_failed()
    assert "dit.preset" in flow_run.state.message, flow_run.state.message
    failed = _pipeline_runs(project)[-1]
    assert failed.info.status == "FAILED"
    client = _mlflow(project)
    ran = client.search_runs([failed.info.experiment_id], f"tags.mlflow.parentRunId = '{failed.info.run_id}'")
    # synth .. encode were up to date: DVC skipped them; only the stage that failed ran
    assert [r.data.tags["zoetrope.stage"] for r in ran] == ["train_dit"]


def test_reproduce_restores_params_and_data_and_reaches_identical_metrics(project, dashboard_run):
    """After a run with other params (the failed one left .zoetrope/params.yaml and models/dit
    changed), reproduce restores the recorded params and DVC data and reaches the same metrics."""
    from flows.project import Project
    from flows.reproduce import reproduce

    test_a_failing_stage_is_red_with_its_reason_and_finished_stages_are_not_redone  # noqa: B018 - runs after it
    _, original = dashboard_run
    result = reproduce(Project(project), original.info.run_id)
    assert result["profile"] == "ci" and result["pinned"] == []
    assert result["overrides"] == ["dit.steps=12", "dit.lr=0.003", "vae.steps=12"]
    assert not any(s["ran"] for s in result["summary"]["stages"])  # restored by dvc checkout, not rerun
    assert len(result["compared"]) >= 10
    assert result["identical"], result["differences"]
    new = _mlflow(project).get_run(result["new_run_id"])
    assert new.data.tags["zoetrope.reproduces"] == original.info.run_id
    assert new.data.params == original.data.params
    assert new.data.tags["dvc.lock_md5"] == original.data.tags["dvc.lock_md5"]
