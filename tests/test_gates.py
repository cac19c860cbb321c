"""Promotion gates: every threshold is read from params.yaml and a miss is named with its margin."""

import pytest

from components.config import load
from components.evaluation import GATES, check_gates
from flows.registry import all_gates
from tests.conftest import ROOT


def thresholds():
    cfg = load(ROOT / "params.yaml")
    return {g.name: getattr(cfg.gates, g.name) for g in GATES}


def metrics(**over):
    good = {"vae_psnr": 30.0, "caption_accuracy": 0.99, "adherence_seen_color": 1.0,
            "adherence_seen_shape": 1.0, "adherence_seen_motion": 1.0}
    return {**good, **over}


def test_a_good_model_passes_every_gate():
    assert all(g["passed"] for g in check_gates(metrics(), thresholds()))


def test_a_bad_model_fails_the_gate_it_misses_by_its_margin():
    t = thresholds()
    gates = {g["name"]: g for g in check_gates(metrics(adherence_seen_motion=0.1), t)}
    motion = gates["adherence_motion_min"]
    assert not motion["passed"]
    assert motion["margin"] == pytest.approx(0.1 - t["adherence_motion_min"])
    assert all(g["passed"] for n, g in gates.items() if n != "adherence_motion_min")


def test_missing_metric_is_an_error_not_a_pass():
    m = metrics()
    del m["vae_psnr"]
    with pytest.raises(KeyError, match="vae_psnr"):
        check_gates(m, thresholds())


def test_nan_never_passes():
    gates = {g["name"]: g for g in check_gates(metrics(caption_accuracy=float("nan")), thresholds())}
    assert not gates["caption_accuracy_min"]["passed"]


def test_onnx_parity_gate_joins_the_evaluation_gates():
    evaluation = {"gates": check_gates(metrics(), thresholds())}
    export = {"worst": 2e-3, "threshold": 1e-3, "passed": False}
    gates = all_gates(evaluation, export)
    assert gates[-1]["name"] == "onnx_max_abs_diff" and not gates[-1]["passed"]
    assert not all(g["passed"] for g in gates)
