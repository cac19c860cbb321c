"""Fast checks of the platform glue: the dashboard form, registry aliases and rollback on a real
MLflow SQLite registry, and the per-project Prefect isolation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.knobs import OVERRIDE_KEYS, Knobs


def test_knobs_become_set_overrides_in_a_stable_order():
    knobs = Knobs(vae_steps=7, dit_lr=3e-4, gate_adherence_shape_min=0, extra=["sample.steps=2"])
    assert knobs.overrides() == ["dit.lr=0.0003", "vae.steps=7", "gates.adherence_shape_min=0.0",
                                 "sample.steps=2"]
    assert Knobs().overrides() == []


@pytest.mark.parametrize("bad", [{"dit_steps": 0}, {"dit_lr": -1.0}, {"dit_preset": "huge"},
                                 {"gate_adherence_color_min": 1.5}, {"dit_stepz": 3}])
def test_the_form_refuses_bad_values(bad):
    with pytest.raises(ValidationError):
        Knobs(**bad)


def test_every_knob_is_a_real_params_key_and_presets_match_the_dit():
    from typing import get_args

    from components import config as C
    from components.dit import DIT_PRESETS
    from flows.knobs import DitPreset

    assert set(get_args(DitPreset)) == set(DIT_PRESETS)
    flat = C.load(Path(__file__).resolve().parents[1] / "params.yaml", "ci").flat()
    assert set(OVERRIDE_KEYS.values()) <= set(flat)
    every = Knobs(dit_preset="small", dit_steps=3, dit_lr=0.01, vae_steps=4, vae_lr=0.02, caption_steps=5,
                  gate_vae_psnr_min=20, gate_caption_accuracy_min=0.5, gate_adherence_color_min=0.1,
                  gate_adherence_shape_min=0.2, gate_adherence_motion_min=0.3)
    cfg = C.load(Path(__file__).resolve().parents[1] / "params.yaml", "ci",
                 C.overrides_to_dict(every.overrides())).flat()
    for name, key in OVERRIDE_KEYS.items():
        assert cfg[key] == getattr(every, name), key


def test_quiet_environment_keeps_prefect_state_in_the_project(tmp_path, monkeypatch):
    from flows.project import Project, quiet_environment

    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "BENTOML_HOME", "ZOETROPE_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    quiet_environment(Project(tmp_path))
    assert os.environ["PREFECT_HOME"] == str(tmp_path / ".zoetrope" / "prefect")
    assert os.environ["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path / ".zoetrope" / "prefect" / "storage")
    assert os.environ["BENTOML_HOME"] == str(tmp_path / ".zoetrope" / "bentoml")
    assert (tmp_path / ".zoetrope" / "prefect").is_dir()


# ---------------------------------------------------------------------------------- registry


@pytest.fixture()
def registry(empty_registry):
    """A real MLflow SQLite registry with three versions of one model."""
    client, exp = empty_registry
    for _ in range(3):
        run = client.create_run(exp)
        client.create_model_version("m", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return client


def _champion(client) -> str:
    return str(client.get_model_version_by_alias("m", "champion").version)


def test_promotion_keeps_history_and_rollback_walks_it_back(registry):
    from flows.registry import CHALLENGER, promote, rollback

    registry.set_registered_model_alias("m", CHALLENGER, "1")
    assert promote(registry, "1", "m") is None
    assert "challenger" not in registry.get_registered_model("m").aliases  # promoted: no longer challenger
    promote(registry, "2", "m")
    promote(registry, "3", "m")
    assert registry.get_model_version("m", "3").tags["previous_champion"] == "2"
    assert rollback(registry, model="m") == ("3", "2")
    assert _champion(registry) == "2"
    assert rollback(registry, model="m") == ("2", "1")
    with pytest.raises(LookupError, match="no previous champion: pass --to VERSION"):
        rollback(registry, model="m")
    assert rollback(registry, to="3", model="m") == ("1", "3")
    assert _champion(registry) == "3"
    with pytest.raises(LookupError, match="no version 9"):
        rollback(registry, to="9", model="m")
    assert registry.get_model_version("m", "2").tags["rolled_back_to"] == "1"


def test_rollback_without_a_champion_says_so(registry):
    from flows.registry import rollback

    with pytest.raises(LookupError, match="has no 'champion' alias"):
        rollback(registry, model="m")
