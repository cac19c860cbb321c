"""DistributedDataParallel under torchrun with gloo on CPU: two processes train like one.

Tolerance: the two-process loss curve equals the one-process curve (same global batch, same
seed) within 1e-5 at every step, and the final weights within 1e-5. The only difference allowed
is float rounding: DDP sums the two halves' gradients where one process sums all rows at once
(measured: at most ~3e-7 on this curve).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.distributed import DistEnv, shard_batch, shard_bounds
from tests.conftest import make_project

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "engine_child.py"
TOL = 1e-5


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ZOETROPE_PROJECT", "MLFLOW_TRACKING_URI")}
    return dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def test_shard_bounds_split_the_global_batch_and_refuse_uneven_splits():
    assert [shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    x, g = torch.arange(6).view(6, 1), torch.Generator()
    null = torch.zeros(1, 3)
    part = shard_batch((x, {"y": x * 2}, [null], g), 6, 2, 3)
    assert part[0].flatten().tolist() == [4, 5] and part[1]["y"].flatten().tolist() == [8, 10]
    assert part[2][0] is null and part[3] is g
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_bounds(6, 0, 4)


def test_env_outside_torchrun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert DistEnv.from_env() == DistEnv(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        DistEnv.from_env()


def test_two_processes_reach_the_loss_curve_of_one(tmp_path):
    args = ["--objective", "fixed", "--steps", "20", "--batch", "8", "--ckpt-every", "5"]
    one = subprocess.run([sys.executable, str(CHILD), "--out", str(tmp_path / "one"), *args],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    two = _torchrun(str(CHILD), "--out", str(tmp_path / "two"), "--ckpt", str(tmp_path / "ckpt"), *args)
    assert two.returncode == 0, two.stdout + two.stderr

    a = json.loads((tmp_path / "one" / "log-rank0.json").read_text())
    b = json.loads((tmp_path / "two" / "log-rank0.json").read_text())
    assert json.loads((tmp_path / "two" / "result.json").read_text())["world_size"] == 2
    assert b["last"]["rows"] == 4 and a["last"]["rows"] == 8  # each rank trained on half the batch
    assert list(a["losses"]) == list(b["losses"]) == [str(s) for s in range(1, 21)]
    la, lb = list(a["losses"].values()), list(b["losses"].values())
    assert la[-1] < 0.9 * la[0]  # the curve moves: matching it is not matching a constant
    worst = max(abs(x - y) for x, y in zip(la, lb))
    assert worst <= TOL, worst
    # The FLOPs of the global batch are the same whichever way it is split.
    assert a["last"]["flops_per_step"] == b["last"]["flops_per_step"]

    # Only rank 0 reported and wrote: one log, one checkpoint.
    assert not (tmp_path / "two" / "log-rank1.json").exists()
    assert len(list((tmp_path / "ckpt").glob("state-*.pt"))) == 1
    wa = torch.load(tmp_path / "one" / "final.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "two" / "final.pt", weights_only=False)["model"]
    for name, t in wa.items():
        assert torch.allclose(t, wb[name], atol=TOL), (name, (t - wb[name]).abs().max())


def test_ranks_that_would_resume_from_different_steps_fail_instead_of_hanging(tmp_path):
    args = ["--objective", "fixed", "--steps", "6", "--ckpt-every", "3"]
    # Rank 0's folder holds a finished run; rank 1's is empty (two nodes, no shared file system).
    one = subprocess.run([sys.executable, str(CHILD), "--out", str(tmp_path / "one"),
                          "--ckpt", str(tmp_path / "ckpt-rank0"), *args],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    two = _torchrun(str(CHILD), "--out", str(tmp_path / "two"), "--ckpt", str(tmp_path / "ckpt"),
                    "--ckpt-per-rank", *args)
    assert two.returncode != 0
    assert "processes disagree on the step to resume from: between 0 and 6" in two.stdout + two.stderr


def _fake_encoded(folder: Path, n: int = 24) -> None:
    """What the encode stage writes (components/encode.py), at the ci profile's latent shape."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    torch.save({
        "latents": torch.randn(n, 4, 5, 8, 8, generator=g),
        "clip_id": [f"c{i}" for i in range(n)],
        "caption_index": torch.randint(0, 3, (n,), generator=g),
        "split": ["val" if i % 6 == 0 else "train" for i in range(n)],
    }, folder / "latents.pt")
    torch.save(torch.randn(n, 16, 5, 4, 4, generator=g).half(), folder / "features.pt")  # REPA targets
    mask = torch.zeros(3, 32, dtype=torch.bool)
    mask[0, :2], mask[1, :5], mask[2, :7] = True, True, True
    torch.save({"captions": ["", "a red circle", "a blue square moving left"],
                "tokens": torch.randn(3, 32, 384, generator=g).half(), "mask": mask}, folder / "text.pt")


def test_train_dit_stage_runs_under_torchrun(tmp_path):
    from flows.project import Project

    root = make_project(tmp_path / "proj")
    project = Project(root)
    project.resolve_params("ci", ["dit.steps=6", "dit.batch_size=8"])
    _fake_encoded(root / "data" / "encoded")

    proc = _torchrun("-m", "flows.cli", "stage", "train_dit", cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    from components.dit import load_dit

    dit = load_dit(root / "models" / "dit" / "dit.pt", "cpu")
    assert dit.spec.dim == 128
    assert len(list(project.ckpt_dir("train_dit").glob("state-*.pt"))) == 1

    import mlflow

    mlflow.set_tracking_uri(project.default_tracking_uri)
    runs = mlflow.search_runs(experiment_names=["zoetrope"], output_format="list")
    assert [r.info.run_name for r in runs] == ["train_dit"]  # rank 0 alone tracked
    metrics = runs[0].data.metrics
    assert metrics["flops_per_step"] > 0 and "val_loss" in metrics and "tokens_per_s" in metrics

    refused = _torchrun("-m", "flows.cli", "stage", "train_vae", cwd=root)
    assert refused.returncode != 0
    assert "stage train_vae cannot run under torchrun" in refused.stdout + refused.stderr
