"""The training engine: counted FLOPs, throughput metrics, autocast and compile switches, and a
run SIGKILLed at random moments that resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from components.flops import train_step_flops
from components.trainer import TrainSpec, data_digest, fit

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "engine_child.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))


def _regression():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 12, generator=g), torch.randn(12, 3, generator=g)
    y = torch.tanh(x @ w)

    def batch_fn(step, gen):
        i = torch.randint(64, (16,), generator=gen)
        return x[i], y[i]

    def loss_fn(m, b):
        return (m(b[0]) - b[1]).pow(2).mean(), {}

    return batch_fn, loss_fn


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def test_flops_of_a_step_match_a_hand_count():
    """Linear(a, b) on B rows: 2Bab forward; backward 2Bab for the weight, and 2Bab more for the
    input unless the input is the data (which needs no gradient)."""
    batch_fn, loss_fn = _regression()
    B, a, h, c = 16, 12, 20, 3
    first = 2 * B * a * h * 2  # forward + weight gradient
    second = 2 * B * h * c * 3  # forward + weight gradient + input gradient
    model = _mlp()
    assert train_step_flops(model, loss_fn, batch_fn(0, torch.Generator().manual_seed(0))) == first + second
    assert all(p.grad is None for p in model.parameters())


def test_cpu_attention_is_counted():
    """PyTorch's registry has no formula for the CPU attention kernel; without ours it counts 0."""
    B, nh, N, M, hs = 2, 3, 10, 7, 8
    q = torch.randn(B, nh, N, hs, requires_grad=True)
    k = torch.randn(B, nh, M, hs, requires_grad=True)
    v = torch.randn(B, nh, M, hs, requires_grad=True)
    model = nn.Module()

    def loss_fn(m, batch):
        return nn.functional.scaled_dot_product_attention(*batch).sum(), {}

    # Forward: q k^T and p v. Backward (PyTorch's formula): the scores recomputed, then the
    # gradients of p, v, q and k: five more matmuls of the same size.
    matmul = 2 * B * nh * N * M * hs
    assert train_step_flops(model, loss_fn, (q, k, v)) == (2 + 5) * matmul


def test_counting_flops_changes_no_weight_and_throughput_is_reported():
    batch_fn, loss_fn = _regression()
    spec = TrainSpec(steps=12, lr=1e-2, warmup=2, grad_clip=1.0, ema=0.9, log_every=4)
    logged: list[tuple[int, dict]] = []
    counted = fit(_mlp(), loss_fn, batch_fn, spec, samples_per_batch=16, tokens_per_batch=16 * 5,
                  log=lambda s, m: logged.append((s, m)))
    plain = fit(_mlp(), loss_fn, batch_fn, spec, count_flops=False)
    for a, b in zip(counted.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)
    assert counted.flops_per_step == 2 * 16 * 12 * 20 * 2 + 2 * 16 * 20 * 3 * 3
    assert plain.flops_per_step is None
    assert [s for s, _ in logged] == [4, 8, 12]
    m = logged[-1][1]
    assert m["samples_per_s"] == pytest.approx(16 * m["steps_per_s"])
    assert m["tokens_per_s"] == pytest.approx(80 * m["steps_per_s"])
    assert m["flop_per_s"] == pytest.approx(counted.flops_per_step * m["steps_per_s"])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="flushing subnormal floats (FTZ/DAZ) is an x86 switch")
def test_training_flushes_subnormal_floats_to_zero():
    """Subnormal floats take the CPU's slow path (the judge's training slowed from 250 to 90
    samples/s): fit turns them into zeros. In a fresh process, so no earlier test set it."""
    child = (
        "import torch\n"
        "from torch import nn\n"
        "from components.trainer import TrainSpec, fit\n"
        "tiny = torch.tensor([1e-39])\n"
        "before = float((tiny * 1.0)[0])\n"
        "x = torch.randn(8, 4)\n"
        "fit(nn.Linear(4, 1), lambda m, b: (m(b).pow(2).mean(), {}), lambda s, g: x,\n"
        "    TrainSpec(steps=2, lr=1e-2), count_flops=False)\n"
        "print(before, float((tiny * 1.0)[0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert before > 0.0 and after == 0.0


def test_no_autocast_on_cpu_and_execution_switches_keep_the_checkpoint():
    batch_fn, loss_fn = _regression()
    seen = []

    def watched(m, b):
        seen.append(torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))
        return loss_fn(m, b)

    spec = TrainSpec(steps=3, lr=1e-2, bf16=True)
    fit(_mlp(), watched, batch_fn, spec)
    assert seen and not any(seen)
    # Fingerprints ignore how steps execute and are unchanged for specs written before the switches.
    old = {k: v for k, v in asdict(spec).items() if k not in ("bf16", "compile")}
    blob = json.dumps({"spec": old, "extra": {}}, sort_keys=True, default=str)
    assert spec.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert TrainSpec(steps=3, lr=1e-2, bf16=False, compile=True).fingerprint() == spec.fingerprint()


def test_compiled_training_matches_eager():
    batch_fn, loss_fn = _regression()
    spec = TrainSpec(steps=5, lr=1e-2, warmup=1)
    eager = fit(_mlp(), loss_fn, batch_fn, spec)
    compiled = fit(_mlp(), loss_fn, batch_fn, TrainSpec(steps=5, lr=1e-2, warmup=1, compile=True))
    # The checkpointable module is the plain one, not the compiled wrapper.
    assert not any(k.startswith("_orig_mod") for k in compiled.model.state_dict())
    for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


# ----------------------------------------------------------------------------------------------
# Kill and resume
# ----------------------------------------------------------------------------------------------


def _child(out: Path, ckpt: Path | None, **kw) -> subprocess.Popen:
    args = [sys.executable, str(CHILD), "--out", str(out)]
    if ckpt is not None:
        args += ["--ckpt", str(ckpt)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoint_step(ckpt: Path) -> int:
    files = list(ckpt.glob("state-*.pt"))
    if not files:
        return 0
    # A checkpoint is renamed into place whole, so whenever one exists it loads.
    return int(torch.load(files[0], map_location="cpu", weights_only=False)["step"])


def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    steps, every = 30, 3
    kw = dict(steps=steps, ckpt_every=every, sleep=0.05)
    whole = _child(tmp_path / "whole", tmp_path / "whole-ckpt", **kw)
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    rng = random.SystemRandom()
    ckpt, out = tmp_path / "ckpt", tmp_path / "killed"
    kills = []
    for _ in range(2):  # killed twice, each time at a random moment after a new checkpoint
        before = _checkpoint_step(ckpt)
        proc = _child(out, ckpt, **kw)
        deadline = time.time() + 300
        while _checkpoint_step(ckpt) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        delay = rng.uniform(0.0, 0.4)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
        log = proc.stdout.read()
        assert code == -signal.SIGKILL, f"the run ended ({code}) before it was killed {delay:.2f}s in:\n{log}"
        kills.append((delay, _checkpoint_step(ckpt)))
    assert not (out / "final.pt").exists()

    last = _child(out, ckpt, **kw)
    assert last.wait(timeout=300) == 0, last.stdout.read()
    result = json.loads((out / "result.json").read_text())
    assert 0 < result["resumed_from"] < steps, (result, kills)
    assert result["resumed_from"] % every == 0

    a = torch.load(tmp_path / "whole" / "final.pt", weights_only=False)
    b = torch.load(out / "final.pt", weights_only=False)
    for part in ("model", "ema"):
        for name, t in a[part].items():
            assert torch.equal(t, b[part][name]), (part, name, kills)


def test_the_data_digest_tells_apart_what_a_run_trains_on():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    base = data_digest(x, ["a red circle", "a blue square"], {"shape": ["circle", "square"]})
    assert base == data_digest(x.clone(), ["a red circle", "a blue square"], {"shape": ["circle", "square"]})
    changed = x.clone()
    changed[2, 3] += 1e-3
    others = [
        data_digest(changed, ["a red circle", "a blue square"], {"shape": ["circle", "square"]}),
        data_digest(x, ["a red circle", "a blue circle"], {"shape": ["circle", "square"]}),
        data_digest(x, ["a red circle", "a blue square"], {"shape": ["square", "circle"]}),
        data_digest(x.reshape(4, 3), ["a red circle", "a blue square"], {"shape": ["circle", "square"]}),
        data_digest(x.double(), ["a red circle", "a blue square"], {"shape": ["circle", "square"]}),
    ]
    assert len({base, *others}) == 6
    with pytest.raises(TypeError, match="not int"):
        data_digest(3)
