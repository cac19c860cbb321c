"""The production profile, the parts that run here: a real PostgreSQL server (Debian's binaries),
an MLflow tracking server on it with proxied artifacts (a folder standing in for the S3 bucket:
`--artifacts-destination` takes either), and the pipeline's own tracking and registry code
against it; and a Prefect server on the same PostgreSQL. Skipped, saying why, where PostgreSQL
cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.postgres import _free_port, start_postgres

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    try:
        pg = start_postgres()
    except LookupError as exc:
        pytest.skip(str(exc))
    for db in ("mlflow", "prefect"):
        pg.create_database(db)
    yield pg
    pg.stop()


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s: {log.read_text()[-2000:]}")


def _server(cmd: list[str], env: dict, log: Path, health: str):
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    try:
        _wait_http(health, proc, log)
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    return proc


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` exactly as the README's production profile runs it, with a local folder as
    the artifact destination where production names s3://BUCKET/PATH."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "mlflow"), "server", "--backend-store-uri", postgres.url("mlflow", "postgresql+psycopg2"),
           "--artifacts-destination", (folder / "bucket").as_uri(), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = _server(cmd, dict(os.environ), folder / "server.log", f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}", folder / "bucket"
    os.killpg(proc.pid, 15)
    proc.wait(30)


def _clips(project: Path) -> None:
    """A prepared-clips manifest and the dvc.lock entry naming its version (what prepare and DVC
    leave behind), so the run can log the data as its dataset input."""
    from components.prepare import MANIFEST_COLUMNS

    clips = project / "data" / "clips"
    clips.mkdir(parents=True)
    rows = [dict.fromkeys(MANIFEST_COLUMNS, "") | {"clip_id": f"c{i}", "shard": "shard-00000.pt", "index": i,
                                                    "frames": 9, "height": 16, "width": 16, "fps": 8,
                                                    "split": "train", "caption_visible": False,
                                                    "motion_score": 0.1, "mean": 0.4, "std": 0.2}
            for i in range(3)]
    (clips / "manifest.csv").write_text(
        ",".join(MANIFEST_COLUMNS) + "\n" + "".join(",".join(str(r[c]) for c in MANIFEST_COLUMNS) + "\n" for r in rows))
    (project / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: zoetrope stage prepare\n    outs:\n"
        "    - path: data/clips\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n")


def test_pipeline_tracking_and_registry_on_mlflow_server_over_postgres(postgres, mlflow_server, tmp_path,
                                                                         monkeypatch):
    from mlflow import MlflowClient

    from flows import registry, tracking
    from flows.project import REGISTERED_MODEL, Project

    uri, bucket = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    project = Project(make_project(tmp_path / "project"))
    cfg = project.resolve_params("ci", ["dit.steps=7"])
    _clips(project.root)

    parent = tracking.open_parent(project, "prod-profile")
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    with tracking.stage_run(project, "train_vae", cfg) as log:
        for step, loss in enumerate((1.0, 0.6, 0.4)):
            log(step, {"loss": loss})
    tracking.close_parent(project, parent, None, "FINISHED")

    client = MlflowClient(uri)
    versions = []
    for _ in range(2):
        run = client.get_run(parent)
        if not versions:
            client.create_registered_model(REGISTERED_MODEL)
        versions.append(client.create_model_version(
            REGISTERED_MODEL, source=f"{run.info.artifact_uri}/{tracking.LINEAGE_DIR}", run_id=parent).version)
        registry.promote(client, versions[-1])
    assert tracking.champion_version(project) == str(versions[1])
    assert registry.rollback(client) == (str(versions[1]), str(versions[0]))
    assert client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version == str(versions[0])

    # Read back through the server: params, lineage, loss curve, dataset input.
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.params["dit.steps"] == "7"
    assert run.data.tags["dvc.data_version"] == "0123456789abcdef0123456789abcdef.dir"
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["0123456789abcdef0123456789abcdef"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, never a client-side path
    assert {a.path for a in client.list_artifacts(parent, tracking.LINEAGE_DIR)} >= {
        "lineage/params.yaml", "lineage/selection.yaml", "lineage/dvc.lock"}
    stage = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.data.tags["zoetrope.stage"] for r in stage] == ["train_vae"]
    assert [m.value for m in client.get_metric_history(stage[0].info.run_id, "loss")] == [1.0, 0.6, 0.4]
    assert [d.dataset.name for d in stage[0].inputs.dataset_inputs] == ["clips"]

    # ... and it is PostgreSQL that holds them, the artifact store that holds the files.
    assert postgres.query("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{parent}'") == [("FINISHED",)]
    assert postgres.query("mlflow", "SELECT alias, version FROM registered_model_aliases") == [
        ("champion", int(versions[0]))]
    assert list(bucket.rglob("lineage/params.yaml"))


def test_prefect_server_on_postgres_runs_a_flow(postgres, tmp_path):
    """`prefect server start` with PREFECT_API_DATABASE_CONNECTION_URL on PostgreSQL (asyncpg),
    and a flow run recorded in it."""
    port = _free_port()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url("prefect", "postgresql+asyncpg"),
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = _server([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   env, tmp_path / "prefect.log", f"http://127.0.0.1:{port}/api/health")
    try:
        code = ("from prefect import flow\n"
                "@flow(name='zoetrope-postgres-check')\n"
                "def check():\n    return 42\n"
                "assert check() == 42\n")
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        subprocess.run([sys.executable, "-c", code], env=client_env, check=True, timeout=300,
                       capture_output=True)
        rows = postgres.query("prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        assert ("zoetrope-postgres-check", "COMPLETED") in rows
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
