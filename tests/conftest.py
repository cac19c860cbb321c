"""Shared test setup: telemetry off, isolated homes, one Prefect test server per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every library's scratch files (torchrun's rendezvous folders, Inductor's cache, Dask's scratch
# space, Prefect's runner storage, MLflow's artifact downloads) go here, this process's and its
# subprocesses', and are removed when the session ends instead of piling up in /tmp.
_TMP = Path(tempfile.mkdtemp(prefix="zoetrope-test-tmp-"))
os.environ["TMPDIR"] = str(_TMP)
tempfile.tempdir = str(_TMP)
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
# The homes hold BentoML's model store (~100 MB a session): removed with _TMP.
_HOME = _TMP / "home"
_HOME.mkdir()

# Set before Prefect, MLflow or BentoML are imported by any test module.
from flows.project import QUIET_ENV  # noqa: E402 - light: no orchestration library behind it

os.environ.update(QUIET_ENV)
os.environ.update({
    "PREFECT_HOME": str(_HOME / "prefect"),
    "BENTOML_HOME": str(_HOME / "bentoml"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

PROJECT_FILES = ["components", "flows", "serving", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore",
                 ".dvcignore", ".gitignore", "pyproject.toml", "bentofile.yaml"]


@pytest.fixture(autouse=True)
def _no_stale_tracking_uri():
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, and a project prefers that variable
    to its own store: a test (or a module fixture) that pointed MLflow somewhere must not send the
    next one's runs, or its subprocesses', there. Dropped before and after every test."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def empty_registry(tmp_path):
    """A real MLflow SQLite registry in tmp_path with one registered model `m` and no versions:
    (client, experiment id)."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    client.create_registered_model("m")
    return client, exp


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy CPU two threads that wait on
    each other ran the VAE steps 20x slower. Modules opt in with `pytestmark`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def make_project(dest: Path) -> Path:
    """A fresh copy of the project's tracked files in its own git repo, as a user's clone."""
    for rel in PROJECT_FILES:
        src = ROOT / rel
        if not src.exists():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    (dest / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    return dest


def synth_raw(tmp_path_factory, cfg, seed: int) -> Path:
    """Synthetic videos of data config `cfg` in a fresh temporary folder (module fixtures)."""
    from components.synth import generate

    out = tmp_path_factory.mktemp("raw")
    generate(out, cfg, seed)
    return out


def prepared_clips(tmp_path_factory, raw: Path, cfg, seed: int) -> Path:
    """`raw` prepared into clips in a fresh temporary folder (module fixtures)."""
    from components.prepare import prepare

    out = tmp_path_factory.mktemp("clips")
    prepare(raw, out, cfg, seed)
    return out


def encode_and_train_dit(root: Path, clips_dir: Path, vae_path: Path, cfg) -> dict:
    """Ground-truth captions for every clip, encode and the DiT stage of `cfg` under `root`:
    {"root", "encode", "dit", "cfg"} (module fixtures that train a DiT on a test data set)."""
    import csv

    from components import world
    from components.clips import load_clips
    from components.encode import run_encode
    from components.train_dit import run_train_dit

    clips = load_clips(clips_dir, cfg.data.size, cfg.data.frames)
    (root / "captions").mkdir()
    with open(root / "captions" / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["clip_id", "caption", "source"])
        writer.writerows([r["clip_id"], world.caption(r), "truth"] for r in clips.rows)
    encode = run_encode(clips_dir, root / "captions", vae_path, root / "encoded", cfg)
    dit = run_train_dit(root / "encoded", root / "dit", cfg)
    return {"root": root, "encode": encode, "dit": dit, "cfg": cfg}


def quick_evaluate(clips_dir: Path, vae_path: Path, trained: dict) -> dict:
    """The evaluation stage on `encode_and_train_dit`'s DiT, with a few judge steps, 3 prompts
    per split and 2 sampling steps; writes `trained["root"] / "eval"`."""
    import dataclasses

    from components.config import EvalConfig, SampleConfig
    from components.evaluation import run_evaluate

    root = trained["root"]
    cfg = dataclasses.replace(trained["cfg"], sample=SampleConfig(steps=2),
                              eval=EvalConfig(judge_steps=4, prompts_per_split=3, recon_clips=24,
                                              paraphrase_prompts=0))
    return run_evaluate(clips_dir, vae_path, root / "dit" / "dit.pt", root / "eval", cfg,
                        encoded_dir=root / "encoded")


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """Manifest rows (as csv.DictReader read them, maybe edited) written back to `path`."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def data_fixtures(cfg, seed: int, clips_name: str = "clips_dir"):
    """Module-scoped fixtures `raw` (synthetic videos of `cfg`) and `clips_name` (them prepared),
    for a test module to bind: `raw, clips_dir = data_fixtures(CFG, SEED)`."""

    @pytest.fixture(scope="module", name="raw")
    def raw_fixture(tmp_path_factory) -> Path:
        return synth_raw(tmp_path_factory, cfg, seed)

    @pytest.fixture(scope="module", name=clips_name)
    def clips_fixture(raw, tmp_path_factory) -> Path:
        return prepared_clips(tmp_path_factory, raw, cfg, seed)

    return raw_fixture, clips_fixture


def read_metadata(raw: Path) -> list[dict]:
    """The synth stage's metadata.jsonl records."""
    import json

    return [json.loads(line) for line in (raw / "metadata.jsonl").read_text().splitlines()]
