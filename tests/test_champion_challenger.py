"""Champion/challenger on a real MLflow SQLite registry: a version passing every gate replaces the
champion only when it is at least as good on the primary metric; the decision, its reason and
both figures are logged on the version and on the run."""

from __future__ import annotations

import pytest

from flows.registry import (
    CHALLENGER,
    CHAMPION,
    FAILED_GATES,
    KEPT_CHALLENGER,
    PROMOTED,
    apply_promotion,
    decide,
    promote,
    rollback,
)

MODEL = "m"


@pytest.fixture()
def registry(empty_registry):
    return empty_registry  # model MODEL ("m"), no versions yet


def _register(registry, adherence: float, direction: str = "higher", passed: bool = True):
    """A new version with its register run, then champion/challenger as the register stage runs it."""
    client, exp = registry
    run = client.create_run(exp)
    version = client.create_model_version(MODEL, source=f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id).version
    evaluation = {"metrics": {"adherence_seen_all": adherence, "fd_generated": 3.0},
                  "primary": {"metric": "adherence_seen_all", "direction": direction, "value": adherence}}
    decision = apply_promotion(client, version, evaluation, passed, model=MODEL, run_id=run.info.run_id)
    return str(version), run.info.run_id, decision


def _alias(client, alias):
    return str(client.get_model_version_by_alias(MODEL, alias).version)


def test_first_passing_version_is_promoted(registry):
    client, _ = registry
    version, run_id, decision = _register(registry, 0.5)
    assert decision["promote"] and decision["decision"] == PROMOTED
    assert "first version to pass every gate" in decision["reason"]
    assert set(client.get_registered_model(MODEL).aliases) == {CHAMPION}
    tags = client.get_model_version(MODEL, version).tags
    assert tags["metric.adherence_seen_all"] == "0.5" and tags["promotion.decision"] == PROMOTED
    run = client.get_run(run_id)
    assert run.data.tags["promotion.decision"] == PROMOTED
    assert run.data.metrics["promotion.challenger_value"] == 0.5
    assert "promotion.champion_value" not in run.data.metrics  # there was none


def test_a_worse_version_passing_every_gate_stays_challenger_and_the_log_says_why(registry):
    client, _ = registry
    champion, _, _ = _register(registry, 0.5)
    worse, run_id, decision = _register(registry, 0.375)
    assert not decision["promote"] and decision["decision"] == KEPT_CHALLENGER
    assert _alias(client, CHAMPION) == champion
    assert _alias(client, CHALLENGER) == worse
    for text in (decision["reason"], client.get_model_version(MODEL, worse).tags["promotion.reason"],
                 client.get_run(run_id).data.tags["promotion.reason"]):
        assert "0.375" in text and "0.5" in text and f"v{champion}" in text and "stays challenger" in text
    metrics = client.get_run(run_id).data.metrics
    assert metrics["promotion.challenger_value"] == 0.375 and metrics["promotion.champion_value"] == 0.5
    assert metrics["promotion.promoted"] == 0.0


def test_a_better_or_equal_version_is_promoted_and_rollback_still_walks_back(registry):
    client, _ = registry
    first, _, _ = _register(registry, 0.5)
    _register(registry, 0.25)  # worse: stays challenger
    equal, _, decision = _register(registry, 0.5)
    assert decision["promote"] and "0.5 >= champion v1's 0.5" in decision["reason"]
    better, run_id, decision = _register(registry, 0.75)
    assert decision["promote"] and decision["champion_value"] == 0.5
    assert _alias(client, CHAMPION) == better and CHALLENGER not in client.get_registered_model(MODEL).aliases
    assert client.get_run(run_id).data.metrics["promotion.champion_value"] == 0.5
    assert rollback(client, model=MODEL) == (better, equal)
    assert rollback(client, model=MODEL) == (equal, first)


def test_a_version_failing_a_gate_is_never_promoted_even_when_better(registry):
    client, _ = registry
    champion, _, _ = _register(registry, 0.5)
    failing, _, decision = _register(registry, 0.9, passed=False)
    assert not decision["promote"] and decision["decision"] == FAILED_GATES
    assert _alias(client, CHAMPION) == champion
    assert CHALLENGER not in client.get_registered_model(MODEL).aliases  # a failing version is no challenger
    assert client.get_model_version(MODEL, failing).tags["promotion.decision"] == FAILED_GATES


def test_lower_is_better_metrics_compare_the_other_way(registry):
    client, _ = registry
    _register(registry, 0.5, direction="lower")
    _, _, higher = _register(registry, 0.6, direction="lower")
    assert not higher["promote"] and "lower is better" in higher["reason"]
    lower, _, decision = _register(registry, 0.4, direction="lower")
    assert decision["promote"] and _alias(client, CHAMPION) == lower


def test_a_champion_without_a_recorded_figure_is_replaced_on_gates(registry):
    client, exp = registry
    run = client.create_run(exp)
    old = client.create_model_version(MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    promote(client, old, MODEL)  # registered before champion/challenger: no metric tags
    version, _, decision = _register(registry, 0.1)
    assert decision["promote"] and "no recorded adherence_seen_all" in decision["reason"]
    assert _alias(client, CHAMPION) == version


def test_decide_refuses_an_unknown_direction_and_nan_never_wins():
    primary = {"metric": "x", "direction": "sideways", "value": 1.0}
    with pytest.raises(ValueError, match="gates.primary_direction"):
        decide(True, primary, None, None)
    nan = decide(True, {"metric": "x", "direction": "higher", "value": float("nan")}, "1", 0.2)
    assert not nan["promote"]


def test_the_prefect_report_states_the_decision_with_both_figures(registry, tmp_path, monkeypatch):
    from flows.pipeline import evaluation_report, report_markdown
    from flows.project import Project

    _register(registry, 0.5)
    _, _, decision = _register(registry, 0.375)
    summary = {"mlflow_run_id": "r", "mlflow_run_url": "u", "tracking_uri": "t", "gates": [],
               "registered_version": 2, "champion": False, "alias": "challenger", "samples": "s",
               "stages": [], "promotion": {k: v for k, v in decision.items() if k != "promote"}}
    md = report_markdown(summary)
    assert "alias **challenger**" in md and "Decision **kept_challenger**" in md
    assert "this version 0.375, champion v1: 0.5" in md

    project = Project(tmp_path)
    (tmp_path / "reports/eval").mkdir(parents=True)
    (tmp_path / "reports/eval/report.md").write_text("![seen](samples/grid_seen.gif)\n")
    monkeypatch.setenv("ZOETROPE_MLFLOW_UI", "http://127.0.0.1:5999")
    assert evaluation_report(project, {"mlflow_run_id": "abc"}) == (
        "![seen](http://127.0.0.1:5999/get-artifact?run_uuid=abc&path=samples/grid_seen.gif)\n")
