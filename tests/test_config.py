import dataclasses

import pytest

from components import config as C
from tests.conftest import ROOT


def test_default_profile_loads_and_validates():
    cfg = C.load(ROOT / "params.yaml")
    assert cfg.dit.preset == "tiny"
    assert (cfg.data.frames - 1) % 4 == 0


def test_ci_profile_overlays_default():
    tiny = C.load(ROOT / "params.yaml")
    ci = C.load(ROOT / "params.yaml", profile="ci")
    assert ci.dit.steps < tiny.dit.steps
    assert ci.dit.lr == tiny.dit.lr  # keys the profile does not name keep the default


def test_params_yaml_mirrors_dataclasses_key_for_key():
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.pop("profiles")
    for section in dataclasses.fields(C.Config):
        if dataclasses.is_dataclass(section.type) or isinstance(getattr(C.Config(), section.name), object):
            value = getattr(C.Config(), section.name)
            if dataclasses.is_dataclass(value):
                assert set(raw[section.name]) == {f.name for f in dataclasses.fields(value)}, section.name


@pytest.mark.parametrize("override, message", [
    ({"dit": {"lrr": 1.0}}, "unknown key dit.lrr"),
    ({"nope": 1}, "unknown key nope"),
    ({"dit": {"steps": "many"}}, "dit.steps='many' should be int"),
    ({"data": {"frames": 16}}, "data.frames=16 is invalid"),
    ({"vae": {"train_frames": 8}}, "vae.train_frames=8 is invalid"),
    ({"vae": {"full_clip_fraction": 1.5}}, "vae.full_clip_fraction=1.5 is invalid"),
    ({"data": {"frames": 9, "clip_frames": [9]}, "vae": {"train_frames": 13}},
     "vae.train_frames=13 is invalid: use at most data.frames"),
    ({"data": {"frames": 9}}, "the longest length: it is the length the captioner"),
    ({"sample": {"sampler": "ddim"}}, "sample.sampler='ddim' is invalid"),
])
def test_bad_values_fail_with_their_name(override, message):
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        C.load(ROOT / "params.yaml", overrides=override)


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(C.ConfigError, match="known profiles are tiny, ci"):
        C.load(ROOT / "params.yaml", profile="huge")


def test_overrides_parse_yaml_values():
    over = C.overrides_to_dict(["dit.lr=1e-3", "sample.sampler=heun", "data.num_videos=200"])
    cfg = C.load(ROOT / "params.yaml", overrides=over)
    assert cfg.dit.lr == 1e-3 and cfg.sample.sampler == "heun" and cfg.data.num_videos == 200
    with pytest.raises(C.ConfigError, match="section.key=value"):
        C.overrides_to_dict(["dit.lr"])


def test_int_is_accepted_for_float_but_not_bool_for_int():
    cfg = C.load(ROOT / "params.yaml", overrides={"dit": {"lr": 1}})
    assert cfg.dit.lr == 1.0 and isinstance(cfg.dit.lr, float)
    with pytest.raises(C.ConfigError):
        C.load(ROOT / "params.yaml", overrides={"dit": {"steps": True}})


def test_flat_round_trip():
    cfg = C.load(ROOT / "params.yaml", profile="ci")
    assert C.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["dit.lr"] == cfg.dit.lr


def test_eval_prompts_cover_every_colour_and_keep_splits_apart():
    import random

    from components import world
    from components.evaluation import eval_prompts

    cfg = C.load(ROOT / "params.yaml")
    prompts = eval_prompts(cfg, random.Random(0))
    held = world.heldout_triples(cfg.data.heldout_fraction, cfg.seed)
    assert {p["color"] for p in prompts["seen"]} == set(world.COLORS)
    assert all((p["color"], p["shape"], p["motion"]) not in held for p in prompts["seen"])
    assert all((p["color"], p["shape"], p["motion"]) in held for p in prompts["heldout"])
