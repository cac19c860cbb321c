"""components/ is plain Python + PyTorch: it never imports the orchestration libraries."""

import ast

from tests.conftest import ROOT

FORBIDDEN = {"prefect", "mlflow", "dvc", "bentoml", "great_expectations"}


def test_components_never_import_orchestration_libraries():
    offenders = []
    for path in sorted((ROOT / "components").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not offenders, offenders


def test_stage_order_has_one_owner():
    """The Prefect flow runs exactly dvc.yaml's stages, in its order, and each has a command."""
    from flows.project import Project
    from flows.stages import STAGES

    project = Project(ROOT)
    assert project.stage_names() == list(STAGES)
    for name, stage in project.dvc_stages().items():
        assert stage["cmd"] == f"zoetrope stage {name}"
