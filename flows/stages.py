"""`zoetrope stage NAME`: the command of each DVC stage.

Each stage reads the resolved config, opens an MLflow run (nested under the pipeline's parent
run when the Prefect flow started it), calls the pure function in `components/` that does the
work, and logs what it returned. Paths come from dvc.yaml's layout (docs/architecture.md).
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Callable

from components.checkpoint import atomic_write_json, atomic_write_text
from components.config import Config
from flows.project import Project, quiet_environment

StageFn = Callable[[Project, Config, "object"], dict]


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------- stages


def synth(project: Project, cfg: Config, log) -> dict:
    """The raw data: the synthetic world, or a copy of the user's folder (`data.source`), so DVC
    versions the raw input either way."""
    if cfg.data.source != "synthetic":
        from components.ingest import stage_folder

        return stage_folder(cfg.data.source, _fresh(project.path("data/raw")))
    from components.synth import generate

    return generate(_fresh(project.path("data/raw")), cfg.data, cfg.seed)


def prepare(project: Project, cfg: Config, log) -> dict:
    import mlflow

    from components.ingest import SOURCES, ingest
    from components.prepare import prepare as prepare_clips
    from flows import shards, tracking
    from flows.validation import validate_manifest

    out = _fresh(project.path("data/clips"))
    raw = project.path("data/raw")
    if (raw / SOURCES).exists():  # the synth stage staged the user's own videos
        # Not sharded: scene cuts and de-duplication compare clips across the whole folder.
        summary = ingest(raw, out, cfg.data, cfg.ingest, cfg.seed)
    else:
        summary = prepare_clips(raw, out, cfg.data, cfg.seed, map_shards=shards.mapper(cfg.dask, "prepare"))
    for report in ("quarantine.json", "ingest.json"):
        if (out / report).exists():
            mlflow.log_artifact(str(out / report), "data")
    try:
        result = validate_manifest(out / "manifest.csv", cfg.data, out)
    finally:
        if (out / "validation.json").exists():
            mlflow.log_artifact(str(out / "validation.json"), "data")
        if (out / "data_docs").exists():
            mlflow.log_artifacts(str(out / "data_docs"), tracking.DATA_DOCS_ARTIFACT)
            tracking.link_data_docs(project, mlflow.active_run().info.run_id, out / "data_docs")
    summary["validation_passed"] = float(bool(result.get("success", True)))
    return summary


def caption(project: Project, cfg: Config, log) -> dict:
    from components import distributed
    from components.captioner import run_caption_stage
    from flows import shards

    metrics = run_caption_stage(
        project.path("data/clips"),
        _fresh(project.path("data/captions")),
        _fresh(project.path("models/captioner")),
        cfg,
        log=log,
        ckpt_dir=project.ckpt_dir("caption"),
        device=distributed.device(),
        map_shards=shards.mapper(cfg.dask, "caption"),
    )
    atomic_write_json(project.path("reports/caption.json"), metrics)
    return metrics


def train_vae(project: Project, cfg: Config, log) -> dict:
    from components import distributed
    from components.vae import run_train_vae

    return run_train_vae(
        project.path("data/clips"), _fresh(project.path("models/vae")), cfg,
        log=log, ckpt_dir=project.ckpt_dir("train_vae"), device=distributed.device(),
    )


def encode(project: Project, cfg: Config, log) -> dict:
    from components import distributed
    from components.encode import run_encode

    return run_encode(
        project.path("data/clips"), project.path("data/captions"), project.path("models/vae/vae.pt"),
        _fresh(project.path("data/encoded")), cfg, log=log, device=distributed.device(),
    )


def train_dit(project: Project, cfg: Config, log) -> dict:
    from components import distributed
    from components.train_dit import run_train_dit

    # Under torchrun every rank trains (DDP); rank 0 alone clears and writes the outputs.
    with distributed.session() as env:
        model_dir = project.path("models/dit")
        if env.is_main:
            _fresh(model_dir)
        distributed.barrier()
        return run_train_dit(
            project.path("data/encoded"), model_dir, cfg,
            log=log, ckpt_dir=project.ckpt_dir("train_dit"), device=distributed.device(),
        )


def evaluate(project: Project, cfg: Config, log) -> dict:
    import mlflow

    from components import distributed
    from components.evaluation import run_evaluate

    out = _fresh(project.path("reports/eval"))
    report = run_evaluate(
        project.path("data/clips"), project.path("models/vae/vae.pt"),
        project.path("models/dit/dit.pt"), out, cfg, log=log,
        caption_metrics=_read_json(project.path("reports/caption.json")),
        ckpt_dir=project.ckpt_dir("evaluate"), encoded_dir=project.path("data/encoded"),
        device=distributed.device(),
    )
    # Where the sample grids the report links to live (the Prefect report links them in the UI).
    report["mlflow_run_id"] = mlflow.active_run().info.run_id
    atomic_write_json(project.path("reports/evaluation.json"), report)
    mlflow.log_artifacts(str(out / "samples"), "samples")
    if (out / "report.md").exists():
        mlflow.log_artifact(str(out / "report.md"))
    mlflow.log_dict(report, "evaluation.json")
    for gate in report["gates"]:
        mlflow.log_metric(f"gate.{gate['name']}.passed", float(gate["passed"]))
    return report["metrics"]


def export(project: Project, cfg: Config, log) -> dict:
    from components.export import export_bundle
    from components.parity import generation_parity

    out = project.path("models/onnx")
    if out.exists():
        shutil.rmtree(out)
    result = export_bundle(project.path("models/vae/vae.pt"), project.path("models/dit/dit.pt"), out, cfg,
                           cache_dir=project.state / "cache")
    parity = generation_parity(out, project.path("models/vae/vae.pt"), project.path("models/dit/dit.pt"), cfg)
    diffs = {f"max_abs_diff.{k}": float(v) for k, v in result["max_abs_diff"].items()}
    diffs["max_abs_diff.generation"] = float(parity["max_abs_diff"])
    worst = max(diffs.values())
    report = {
        "max_abs_diff": diffs,
        "worst": worst,
        "threshold": cfg.gates.onnx_max_abs_diff,
        "passed": bool(worst <= cfg.gates.onnx_max_abs_diff),
        "seconds": result.get("seconds"),
    }
    atomic_write_json(project.path("reports/export.json"), report)
    return {**diffs, "onnx_parity_passed": float(report["passed"])}


def register(project: Project, cfg: Config, log) -> dict:
    from flows.registry import register_bundle

    evaluation = _read_json(project.path("reports/evaluation.json"))
    export_report = _read_json(project.path("reports/export.json"))
    info = register_bundle(project, cfg, project.path("models/onnx"), evaluation, export_report)
    atomic_write_json(project.path("reports/register.json"), info)
    return {"registered_version": float(info["version"]), "champion": float(info["champion"])}


# Stages that may run under `torchrun --nproc_per_node=N` (DistributedDataParallel).
DISTRIBUTED_STAGES = ("train_dit",)

STAGES: dict[str, StageFn] = {
    "synth": synth,
    "prepare": prepare,
    "caption": caption,
    "train_vae": train_vae,
    "encode": encode,
    "train_dit": train_dit,
    "evaluate": evaluate,
    "export": export,
    "register": register,
}


def run(name: str, project: Project | None = None) -> dict:
    """Run one stage in this process (what `zoetrope stage NAME` and `dvc repro` call)."""
    project = project or Project.find()
    quiet_environment(project)
    from components.trainer import flush_denormals

    flush_denormals()  # inference (encode, captioning, generation) in the float mode training uses
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}: stages are {', '.join(STAGES)}")
    from components.distributed import DistEnv

    env = DistEnv.from_env()
    if env.world_size > 1:
        if name not in DISTRIBUTED_STAGES:
            raise ValueError(f"stage {name} cannot run under torchrun (WORLD_SIZE={env.world_size}): "
                             f"run it as one process; stages that can: {', '.join(DISTRIBUTED_STAGES)}")
        if not env.is_main:  # rank 0 alone tracks in MLflow and writes outputs
            return STAGES[name](project, project.config(), None) or {}
    from flows import tracking

    cfg = project.config()
    err = project.error_file(name)
    err.unlink(missing_ok=True)
    try:
        with tracking.stage_run(project, name, cfg) as log:
            metrics = STAGES[name](project, cfg, log) or {}
            tracking.log_summary_metrics(metrics)
        return metrics
    except BaseException as exc:
        message = f"stage {name} failed: {type(exc).__name__}: {exc}"
        atomic_write_text(err, message + "\n\n" + traceback.format_exc())
        raise


def main(name: str) -> int:
    try:
        run(name)
    except KeyboardInterrupt:
        print(f"stage {name} interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line for DVC/Prefect
        traceback.print_exc()
        print(f"\nzoetrope: stage {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0

