"""Registering the ONNX bundle in MLflow and promoting it with aliases (never stages).

A new version that passes every gate gets the alias `challenger` (one that fails a gate is
registered with no alias, its failed gates in its tags). Champion/challenger: a version that passes
every gate takes `champion` (and drops `challenger`) only when it is at least as good as the current
champion on the primary metric (`gates.primary_metric`, `gates.primary_direction`); the first
version to pass every gate always does. Every version carries its evaluation metrics as tags
(`metric.NAME`), so the champion's figure is read from the registry, not from a run that may be
gone. The decision, its reason and both figures go on the version's tags and the register run.
Each promoted version carries the tag `previous_champion`, so "the previous champion" is well
defined and `zoetrope rollback` moves the alias back along it.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from components.config import Config
from flows.project import REGISTERED_MODEL, Project

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_TAG = "previous_champion"
METRIC_TAG = "metric."  # + evaluation metric name: its value on this version
PROMOTED, KEPT_CHALLENGER, FAILED_GATES = "promoted", "kept_challenger", "failed_gates"


class RollbackError(LookupError):
    """The registry has no version to roll back to."""


def _alias_version(client: MlflowClient, alias: str, model: str = REGISTERED_MODEL) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def promote(client: MlflowClient, version: str, model: str = REGISTERED_MODEL) -> str | None:
    """Give `version` the champion alias; remember the champion it replaces. Returns that one."""
    version = str(version)
    previous = _alias_version(client, CHAMPION, model)
    if previous == version:
        return previous
    if previous is not None:
        client.set_model_version_tag(model, version, PREVIOUS_TAG, previous)
    client.set_registered_model_alias(model, CHAMPION, version)
    if _alias_version(client, CHALLENGER, model) == version:
        client.delete_registered_model_alias(model, CHALLENGER)
    return previous


def rollback(client: MlflowClient, to: str | None = None, model: str = REGISTERED_MODEL) -> tuple[str, str]:
    """Move `champion` back to the previous champion (or to version `to`); returns (from, to).

    Rolling back does not rewrite history: the version left keeps its tags, and the target's own
    `previous_champion` tag still points further back, so repeated rollbacks walk the history.
    """
    current = _alias_version(client, CHAMPION, model)
    if current is None:
        raise RollbackError(f"model {model!r} has no {CHAMPION!r} alias: nothing to roll back")
    if to is None:
        to = client.get_model_version(model, current).tags.get(PREVIOUS_TAG)
        if to is None:
            raise RollbackError(
                f"version {current} of {model!r} has no previous champion: pass --to VERSION")
    to = str(to)
    try:
        client.get_model_version(model, to)
    except mlflow.exceptions.MlflowException:
        raise RollbackError(f"model {model!r} has no version {to}: see the MLflow UI for its versions") from None
    if to == current:
        raise RollbackError(f"version {to} is already the {CHAMPION}: pass another --to VERSION")
    client.set_registered_model_alias(model, CHAMPION, to)
    client.set_model_version_tag(model, current, "rolled_back_to", to)
    return current, to

# ---------------------------------------------------------------------------------- champion/challenger


def decide(passed: bool, primary: dict, champion: str | None, champion_value: float | None) -> dict:
    """Whether a version becomes champion, and why. `primary`: evaluation's
    `{"metric", "direction", "value"}`; `champion_value`: the champion's figure on that metric
    (None when it has none recorded)."""
    metric, direction, value = primary["metric"], primary["direction"], float(primary["value"])
    if direction not in ("higher", "lower"):
        raise ValueError(f"primary metric direction {direction!r} is unknown: use higher or lower "
                         f"(gates.primary_direction)")
    out = {"metric": metric, "direction": direction, "value": value,
           "champion_version": int(champion) if champion is not None else None,
           "champion_value": champion_value}
    if not passed:
        return {**out, "promote": False, "decision": FAILED_GATES,
                "reason": "failed a gate: stays challenger, the champion is unchanged"}
    if champion is None:
        return {**out, "promote": True, "decision": PROMOTED,
                "reason": f"first version to pass every gate ({metric} = {value:.4g}): promoted"}
    if champion_value is None:
        return {**out, "promote": True, "decision": PROMOTED,
                "reason": f"champion v{champion} has no recorded {metric} (registered before "
                          f"champion/challenger or under another primary metric): promoted on its gates"}
    op = ">=" if direction == "higher" else "<="
    # NaN compares false: a version without a figure never displaces one with a figure.
    better = value >= champion_value if direction == "higher" else value <= champion_value
    if better:
        return {**out, "promote": True, "decision": PROMOTED,
                "reason": f"{metric} {value:.4g} {op} champion v{champion}'s {champion_value:.4g}: promoted"}
    return {**out, "promote": False, "decision": KEPT_CHALLENGER,
            "reason": f"{metric} {value:.4g} is worse than champion v{champion}'s {champion_value:.4g} "
                      f"({direction} is better): stays challenger, champion stays v{champion}"}


def champion_figure(client: MlflowClient, metric: str, model: str = REGISTERED_MODEL) -> tuple[str | None, float | None]:
    """The current champion's version and its recorded value of `metric` (None, None: no champion)."""
    champion = _alias_version(client, CHAMPION, model)
    if champion is None:
        return None, None
    tag = client.get_model_version(model, champion).tags.get(METRIC_TAG + metric)
    return champion, (float(tag) if tag is not None else None)


def apply_promotion(client: MlflowClient, version: str, evaluation: dict, passed: bool,
                    model: str = REGISTERED_MODEL, run_id: str | None = None) -> dict:
    """Champion/challenger for a newly registered `version`: record its metrics on it, give it
    `challenger` when it passed every gate, compare it with the champion and promote it when `decide` says so. The decision
    goes on the version's tags and, with both figures, on the run `run_id` (tags and metrics)."""
    version = str(version)
    for name, value in sorted(evaluation["metrics"].items()):
        client.set_model_version_tag(model, version, METRIC_TAG + name, repr(float(value)))
    primary = evaluation.get("primary")
    if primary is None:
        raise KeyError("reports/evaluation.json has no primary metric: rerun the evaluate stage "
                       "(it records gates.primary_metric)")
    champion, champion_value = champion_figure(client, primary["metric"], model)
    decision = decide(passed, primary, champion, champion_value)
    if passed:
        client.set_registered_model_alias(model, CHALLENGER, version)
    if decision["promote"]:
        promote(client, version, model)
    for key in ("decision", "reason"):
        client.set_model_version_tag(model, version, f"promotion.{key}", decision[key])
    if run_id is not None:
        client.set_tag(run_id, "promotion.decision", decision["decision"])
        client.set_tag(run_id, "promotion.reason", decision["reason"])
        client.set_tag(run_id, "promotion.metric", decision["metric"])
        client.log_metric(run_id, "promotion.challenger_value", decision["value"])
        if champion_value is not None:
            client.log_metric(run_id, "promotion.champion_value", champion_value)
        client.log_metric(run_id, "promotion.promoted", float(decision["promote"]))
    return decision


SERVING_REQUIREMENTS = [
    "onnxruntime-gpu==1.31.1",
    "numpy>=2,<3",
    "tokenizers==0.23.3",
    "av==18.1.0",
    "zoetrope-mlops",
]


class ZoetropeOnnxModel(mlflow.pyfunc.PythonModel):
    """An MLflow pyfunc over the ONNX bundle: a DataFrame of prompts in, MP4 bytes out."""

    def load_context(self, context):
        from components.onnx_runtime import OnnxT2V

        self.runtime = OnnxT2V(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from components.video_io import encode_mp4

        videos = []
        for row in model_input.to_dict("records"):
            frames = self.runtime.generate(
                str(row["prompt"]), seed=int(row.get("seed", 0) or 0),
            )
            videos.append(encode_mp4(frames, self.runtime.fps))
        return videos


def all_gates(evaluation: dict, export_report: dict) -> list[dict]:
    gates = list(evaluation["gates"])
    gates.append({
        "name": "onnx_max_abs_diff",
        "metric": "onnx_worst_max_abs_diff",
        "op": "<=",
        "value": export_report["worst"],
        "threshold": export_report["threshold"],
        "passed": export_report["passed"],
        "margin": export_report["threshold"] - export_report["worst"],
    })
    return gates


ONNX_REQUIREMENTS = ["onnx==1.23.2", "onnxruntime-gpu==1.31.1"]


def log_onnx_graphs(bundle_dir: Path) -> list[str]:
    """Each ORT-optimised graph of the bundle (fp32 and fp16) with MLflow's ONNX flavour.

    The pyfunc above is what serves; these make every graph loadable on its own with
    `mlflow.onnx.load_model` and visible as an ONNX model in the MLflow UI. The text encoder
    (frozen, pretrained, ~90 MB, the same in every version) travels in the pyfunc bundle only.
    """
    import onnx
    import mlflow.onnx

    names = []
    for path in sorted(Path(bundle_dir).glob("*.onnx")):
        if path.stem.startswith("text_encoder"):
            continue
        name = f"onnx-{path.stem.replace('_', '-')}"
        mlflow.onnx.log_model(onnx.load(str(path)), name=name, save_as_external_data=False,
                              pip_requirements=ONNX_REQUIREMENTS,
                              onnx_execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        names.append(name)
    return names


def register_bundle(project: Project, cfg: Config, bundle_dir: Path, evaluation: dict,
                    export_report: dict) -> dict:
    gates = all_gates(evaluation, export_report)
    passed = all(g["passed"] for g in gates)
    info = mlflow.pyfunc.log_model(
        name="zoetrope-t2v",
        python_model=ZoetropeOnnxModel(),
        artifacts={"bundle": str(bundle_dir)},
        registered_model_name=REGISTERED_MODEL,
        pip_requirements=SERVING_REQUIREMENTS,
        metadata={"gates_passed": passed},
    )
    version = str(info.registered_model_version)
    log_onnx_graphs(bundle_dir)
    client = MlflowClient()
    for g in gates:
        client.set_model_version_tag(REGISTERED_MODEL, version, f"gate.{g['name']}",
                                     f"{'pass' if g['passed'] else 'FAIL'} {g['value']:.4g} {g['op']} {g['threshold']:.4g}")
    client.set_model_version_tag(REGISTERED_MODEL, version, "gates_passed", str(passed).lower())
    client.set_model_version_tag(REGISTERED_MODEL, version, "git.commit", project.git_commit())
    client.set_model_version_tag(REGISTERED_MODEL, version, "dvc.data_version", project.data_version())
    run = mlflow.active_run()
    decision = apply_promotion(client, version, evaluation, passed, run_id=run.info.run_id if run else None)
    promoted = decision["promote"]
    previous = decision["champion_version"]  # the champion before this version (None: first)
    bento_tag = None
    if promoted:
        from serving.store import import_bundle

        bento_tag = import_bundle(
            bundle_dir, labels={"alias": "champion", "mlflow_version": version},
            metadata={"mlflow_model": f"models:/{REGISTERED_MODEL}/{version}"},
        )
    failed = [g for g in gates if not g["passed"]]
    return {
        "model": REGISTERED_MODEL,
        "version": int(version),
        "champion": promoted,
        "alias": CHAMPION if promoted else (CHALLENGER if passed else None),
        "previous_champion": previous,
        "promotion": {k: v for k, v in decision.items() if k != "promote"},
        "failed_gates": [
            f"{g['name']}: {g['value']:.4g} {g['op']} {g['threshold']:.4g} failed by "
            f"{abs(g['margin']):.4g}" for g in failed
        ],
        "bento_model": bento_tag,
        "model_uri": f"models:/{REGISTERED_MODEL}/{version}",
    }
