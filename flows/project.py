"""Where a Zoetrope project keeps things, and the process environment every entry point sets.

Stage order and output paths are read from `dvc.yaml` (their one owner); this module only knows
the local state folder `.zoetrope/` and the resolved-params file that DVC reads.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from components import config as C
from components.checkpoint import atomic_write_text

STATE_DIR = ".zoetrope"
RESOLVED_PARAMS = f"{STATE_DIR}/params.yaml"
SELECTION = f"{STATE_DIR}/selection.yaml"
EXPERIMENT = "zoetrope"
REGISTERED_MODEL = "zoetrope-t2v"

# Telemetry of every tool is off unless the user turned it on.
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    # Prefect's temporary server gets 20 s to start by default; on a busy 2-core machine it took
    # longer and `zoetrope run` died before its first stage.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


class ProjectError(RuntimeError):
    """The project folder is missing something a command needs."""


@dataclass(frozen=True)
class Project:
    root: Path

    @classmethod
    def find(cls, start: str | Path | None = None) -> "Project":
        """The nearest folder at or above `start` (default: cwd or $ZOETROPE_PROJECT) with dvc.yaml."""
        here = Path(start or os.environ.get("ZOETROPE_PROJECT") or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / "dvc.yaml").exists() and (folder / "params.yaml").exists():
                return cls(folder)
        raise ProjectError(
            f"no Zoetrope project (dvc.yaml + params.yaml) at or above {here}: "
            "cd into the project folder or set ZOETROPE_PROJECT"
        )

    # ------------------------------------------------------------------ paths
    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.state / 'mlflow.db'}"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.default_tracking_uri

    @property
    def artifact_location(self) -> str:
        return (self.state / "mlartifacts").as_uri()

    def ckpt_dir(self, stage: str) -> Path:
        return self.state / "checkpoints" / stage

    def error_file(self, stage: str) -> Path:
        return self.state / "errors" / f"{stage}.txt"

    # ------------------------------------------------------------------ dvc.yaml
    def dvc_stages(self) -> dict[str, dict]:
        with open(self.root / "dvc.yaml") as fh:
            return yaml.safe_load(fh)["stages"]

    def stage_names(self) -> list[str]:
        return list(self.dvc_stages())

    def outs(self, stage: str) -> list[Path]:
        outs = []
        for out in self.dvc_stages()[stage].get("outs", []):
            name = next(iter(out)) if isinstance(out, dict) else out
            outs.append(self.root / name)
        return outs

    # ------------------------------------------------------------------ params
    def resolve_params(self, profile: str = "tiny", overrides: list[str] | None = None) -> C.Config:
        """Resolve params.yaml for `profile` and `--set` overrides; write what DVC reads."""
        overrides = list(overrides or [])
        cfg = C.load(self.root / "params.yaml", profile, C.overrides_to_dict(overrides))
        self.state.mkdir(parents=True, exist_ok=True)
        header = (
            "# Written by zoetrope from params.yaml; edit params.yaml, not this file.\n"
            f"# profile: {profile}; overrides: {overrides}\n"
        )
        new_text = header + C.dump(cfg)
        target = self.root / RESOLVED_PARAMS
        if not target.exists() or target.read_text() != new_text:
            atomic_write_text(target, new_text)
        atomic_write_text(
            self.root / SELECTION, yaml.safe_dump({"profile": profile, "overrides": overrides})
        )
        return cfg

    def config(self) -> C.Config:
        """The resolved config the stages run with."""
        target = self.root / RESOLVED_PARAMS
        if not target.exists():
            raise ProjectError(f"{target} is missing: run `zoetrope run` (or `zoetrope resolve`) first")
        with open(target) as fh:
            return C.from_dict(yaml.safe_load(fh))

    def selection(self) -> dict:
        path = self.root / SELECTION
        if not path.exists():
            return {"profile": "tiny", "overrides": []}
        return yaml.safe_load(path.read_text())

    # ------------------------------------------------------------------ lineage
    def git_commit(self) -> str:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=self.root, capture_output=True, text=True, timeout=10
            )
            commit = out.stdout.strip() if out.returncode == 0 else "unknown"
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=self.root, capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            return f"{commit}-dirty" if dirty and commit != "unknown" else commit
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    def data_version(self) -> str:
        """The DVC hash of the prepared clips (from dvc.lock), 'none' before the first run."""
        lock = self.root / "dvc.lock"
        if not lock.exists():
            return "none"
        data = yaml.safe_load(lock.read_text()) or {}
        for stage in data.get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") == "data/clips":
                    return str(out.get("md5", "none"))
        return "none"


def quiet_environment(project: Project | None = None) -> None:
    """Telemetry off, offline model loading, and per-project homes for Prefect and BentoML."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if project is not None:
        # Prefect's home (its settings, the ephemeral server's database) and the results it
        # persists (retries and cached task results) live with the project, never in ~/.prefect.
        os.environ.setdefault("PREFECT_HOME", str(project.state / "prefect"))
        os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(project.state / "prefect" / "storage"))
        # Prefect creates its home without parents; a fresh project has no .zoetrope/ yet.
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("BENTOML_HOME", str(project.state / "bentoml"))
        os.environ["ZOETROPE_PROJECT"] = str(project.root)
