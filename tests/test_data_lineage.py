"""Issue 3's tracking points, read back from a real MLflow store: the prepare stage run keeps the
Great Expectations Data Docs as artifacts and links them (tag, description, a Prefect markdown
artifact of the pipeline run); the runs that use the clips log them as an MLflow dataset input
whose digest is the DVC data version."""

from __future__ import annotations

import pytest

from tests.conftest import make_project

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["data.num_videos=50", "data.raw_size=32", "data.size=16", "data.frames=9", "data.clip_frames=[9]",
         "data.shard_size=16", "dask.enabled=false"]  # the Dask map has its own tests (test_shards.py)
DVC_MD5 = "fedcba9876543210fedcba9876543210.dir"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A project whose synth and prepare stages ran for real, nested under a pipeline run."""
    import os

    from flows import stages, tracking
    from flows.project import Project

    project = Project(make_project(tmp_path_factory.mktemp("project")))
    saved = {k: os.environ.get(k) for k in ("ZOETROPE_PROJECT", tracking.PARENT_ENV)}
    project.resolve_params("ci", SMALL)
    parent = tracking.open_parent(project, "lineage-test")
    os.environ[tracking.PARENT_ENV] = parent
    try:
        stages.run("synth", project)
        stages.run("prepare", project)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return project, parent


def _stage_run(project, parent, stage):
    from mlflow import MlflowClient

    from flows import tracking

    exp = tracking.setup(project)
    runs = MlflowClient(project.tracking_uri).search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent}' and tags.`zoetrope.stage` = '{stage}'")
    assert len(runs) == 1, runs
    return runs[0]


def test_prepare_run_keeps_and_links_the_data_docs(prepared):
    import mlflow
    from mlflow import MlflowClient

    from flows import tracking

    project, parent = prepared
    run = _stage_run(project, parent, "prepare")
    client = MlflowClient(project.tracking_uri)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, tracking.DATA_DOCS_ARTIFACT)}
    assert f"{tracking.DATA_DOCS_ARTIFACT}/index.html" in logged
    link = run.data.tags[tracking.DATA_DOCS_TAG]
    assert link == f"{run.info.artifact_uri}/{tracking.DATA_DOCS_ARTIFACT}/index.html"
    page = mlflow.artifacts.download_artifacts(artifact_uri=link, dst_path=str(project.state / "dl"))
    assert "Great Expectations" in open(page).read() or "<html" in open(page).read().lower()
    ui = run.data.tags[f"{tracking.DATA_DOCS_TAG}_ui"]
    assert ui.endswith(f"/runs/{run.info.run_id}/artifactPath/{tracking.DATA_DOCS_ARTIFACT}/index.html")
    assert ui in run.data.tags["mlflow.note.content"]  # the run's description links the page


def test_the_pipeline_run_gets_a_markdown_artifact_linking_the_data_docs(prepared, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows import tracking
    from flows.pipeline import link_data_docs_artifact

    project, parent = prepared

    @flow(name="data-docs-link-check")
    def check():
        link_data_docs_artifact(project, parent)

    check()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-docs"])))
    assert found and found[0].flow_run_id is not None
    ui = _stage_run(project, parent, "prepare").data.tags[f"{tracking.DATA_DOCS_TAG}_ui"]
    assert f"]({ui})" in found[0].data


def test_runs_that_use_the_clips_log_them_as_a_dataset_input(prepared, monkeypatch):
    from mlflow import MlflowClient

    from flows import tracking

    project, parent = prepared
    (project.root / "dvc.lock").write_text(  # what DVC records after prepare
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: zoetrope stage prepare\n    outs:\n"
        f"    - path: data/clips\n      hash: md5\n      md5: {DVC_MD5}\n")
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    with tracking.stage_run(project, "encode", project.config()):
        pass
    tracking.close_parent(project, parent, None, "FINISHED")
    client = MlflowClient(project.tracking_uri)
    for run, context in ((_stage_run(project, parent, "encode"), "encode"), (client.get_run(parent), "training")):
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.name == "clips" and inp.dataset.digest == DVC_MD5.removesuffix(".dir")
        assert inp.dataset.source_type == "local"
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == context
        assert run.data.tags["dvc.data_version"] == DVC_MD5
    assert _stage_run(project, parent, "prepare").inputs.dataset_inputs == []  # it makes them
