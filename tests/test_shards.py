"""prepare and caption map their shards over a real two-worker Dask cluster (prefect-dask), as
Prefect tasks on the session's test server, and write the same bytes as the plain loop."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from components.captioner import run_caption_stage
from components.config import CaptionConfig, Config, DaskConfig, DataConfig
from components.prepare import prepare
from components.synth import generate
from flows.shards import mapper

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 0
CFG = DataConfig(num_videos=50, raw_size=32, size=16, frames=9, fps=8, caption_fraction=0.3,
                 heldout_fraction=0.15, val_fraction=0.1, shard_size=16, workers=1)
TWO_PROCESSES = DaskConfig(workers=2, processes=True)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    generate(out, CFG, SEED)
    # One broken video in the third shard: quarantine and the bad-share check join across shards.
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    (out / records[40]["file"]).write_bytes(b"not a video at all")
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _shard_task_runs(flow_run_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["zoetrope-shards"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert runs, f"no {flow_run_name} flow run on the Prefect server"
        assert runs[0].state.is_completed()
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [runs[0].id]}))


def where(i: int) -> dict:
    """Runs as a shard task: which process and which Dask worker ran it."""
    import distributed

    return {"i": i, "pid": os.getpid(), "worker": distributed.get_worker().address}


def test_shard_calls_run_as_prefect_tasks_on_two_dask_worker_processes(prefect_server):
    out = mapper(TWO_PROCESSES, "probe")(where, [{"i": i} for i in range(6)])
    assert [r["i"] for r in out] == list(range(6))  # results in call order
    assert os.getpid() not in {r["pid"] for r in out}
    assert len({r["worker"] for r in out}) >= 1
    runs = _shard_task_runs("probe-shards")
    assert sorted(r.name for r in runs) == [f"probe-shard-{i:05d}" for i in range(6)]
    assert all(r.state.is_completed() for r in runs)


def test_disabled_dask_is_the_plain_loop():
    assert mapper(DaskConfig(enabled=False), "prepare") is None


def test_prepare_on_dask_writes_the_same_bytes_as_the_plain_loop(raw, tmp_path, prefect_server):
    serial = prepare(raw, tmp_path / "serial", CFG, SEED)
    mapped = prepare(raw, tmp_path / "dask", CFG, SEED, map_shards=mapper(TWO_PROCESSES, "prepare"))
    assert serial["quarantined"] == 1 and serial["shards"] == 4 and serial["clips"] == 49
    drop = ("seconds", "clips_per_s")
    assert {k: v for k, v in mapped.items() if k not in drop} == {k: v for k, v in serial.items() if k not in drop}
    a, b = _files(tmp_path / "serial"), _files(tmp_path / "dask")
    assert sorted(a) == ["manifest.csv", "quarantine.json"] + [f"shard-{i:05d}.pt" for i in range(4)]
    assert a == b  # byte for byte, shards included
    runs = _shard_task_runs("prepare-shards")
    assert sorted(r.name for r in runs) == [f"prepare-shard-{i:05d}" for i in range(4)]


def test_caption_on_dask_writes_the_same_captions_as_the_plain_loop(raw, tmp_path, prefect_server):
    clips = tmp_path / "clips"
    prepare(raw, clips, CFG, SEED)
    cfg = dataclasses.replace(Config(), data=CFG, seed=SEED,
                              caption=CaptionConfig(width=16, layers=1, steps=3, batch_size=4, warmup=1))
    outs = {}
    for name, map_shards in (("serial", None), ("dask", mapper(DaskConfig(workers=2, processes=False), "caption"))):
        caps, model = tmp_path / name / "captions", tmp_path / name / "model"
        caps.mkdir(parents=True)
        model.mkdir(parents=True)
        metrics = run_caption_stage(clips, caps, model, cfg, map_shards=map_shards)
        outs[name] = ((caps / "captions.csv").read_bytes(), {k: v for k, v in metrics.items() if "seconds" not in k},
                      (caps / "features.pt").read_bytes())
    assert outs["dask"] == outs["serial"]
    lines = outs["dask"][0].decode().splitlines()
    assert lines[0] == "clip_id,caption,source" and len(lines) == 1 + 49
    assert any(line.endswith(",captioner") for line in lines)
    runs = _shard_task_runs("caption-shards")
    assert sorted(r.name for r in runs) == [f"caption-shard-{i:05d}" for i in range(4)]


@pytest.mark.parametrize("override, named", [("dask.address=localhost:8786", "dask.address"),
                                             ("dask.workers=-1", "dask.workers"),
                                             ("dask.procesess=true", "dask.procesess")])
def test_bad_dask_settings_fail_with_their_name(override, named):
    from components import config as C
    from tests.conftest import ROOT

    with pytest.raises(C.ConfigError, match=named):
        C.load(ROOT / "params.yaml", "ci", C.overrides_to_dict([override]))


def test_the_runner_follows_the_settings():
    from flows.shards import task_runner

    remote = task_runner(DaskConfig(address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786" and remote.cluster_kwargs == {}
    local = task_runner(DaskConfig(workers=3, processes=False))
    assert local.address is None
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": False,
                                    "dashboard_address": None}


@pytest.mark.slow
def test_a_stage_run_alone_shares_one_temporary_server_with_its_workers(tmp_path):
    """Under plain `dvc repro` no Prefect server is set: the map starts one temporary server and
    its workers report there (none starts its own)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import json\n"
            "from components.config import DaskConfig\n"
            "from flows.shards import mapper\n"
            "from tests.test_shards import where\n"
            "out = mapper(DaskConfig(workers=2, processes=True), 'alone')(where, [{'i': 0}, {'i': 1}, {'i': 2}])\n"
            "print('RESULT', json.dumps([r['i'] for r in out]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), PREFECT_LOGGING_LEVEL="INFO")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT [0, 1, 2]" in done.stdout
    assert (done.stdout + done.stderr).count("Starting temporary server") == 1  # the stage's, no worker's
