"""Generation metrics of the evaluate stage: Fréchet distance, temporal consistency, paraphrases,
the flow-matching validation loss and the report that shows them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from components import world
from components.config import load
from components.evaluation import (
    eval_prompts,
    frechet_distance,
    paraphrase_prompts,
    report_markdown,
    synonyms,
    temporal_consistency,
)
from tests.conftest import ROOT


# ---------------------------------------------------------------------------------- Fréchet


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = np.random.default_rng(0).standard_normal((200, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(x, x + d) for d in (0.5, 1.0, 2.0)]
    # A mean shift of d on 16 dimensions adds exactly 16 d^2; the covariances are equal.
    assert shifts == pytest.approx([16 * 0.25, 16 * 1.0, 16 * 4.0], rel=1e-6)


def test_frechet_distance_sees_a_covariance_change_and_tolerates_fewer_samples_than_dims():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 64)), rng.standard_normal((40, 64))
    wide = 3.0 * rng.standard_normal((40, 64))
    same_law, other_law = frechet_distance(a, b), frechet_distance(a, wide)
    assert np.isfinite(same_law) and same_law > 0  # finite-sample floor, singular covariances
    assert other_law > 3 * same_law
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(same_law)


def test_frechet_distance_refuses_mismatched_sets():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------------- temporal


def test_a_still_video_is_perfectly_consistent_and_noise_is_not():
    frame = torch.randint(0, 256, (2, 3, 1, 16, 16), dtype=torch.uint8)
    still = temporal_consistency(frame.expand(2, 3, 9, 16, 16).contiguous())
    assert still["cosine"] == pytest.approx(1.0) and still["l1"] == pytest.approx(0.0)
    noise = temporal_consistency(torch.randint(0, 256, (2, 3, 9, 16, 16), dtype=torch.uint8,
                                               generator=torch.Generator().manual_seed(0)))
    assert abs(noise["cosine"]) < 0.05  # independent frames, centred on the [-1, 1] scale
    assert noise["l1"] == pytest.approx(1 / 3, abs=0.02)  # E|U - V| for uniform U, V on [0, 1]


def test_a_moving_square_sits_between_still_and_noise():
    video = torch.zeros(1, 3, 9, 16, 16, dtype=torch.uint8)
    for t in range(9):
        video[0, :, t, 4:10, t:t + 6] = 255
    tc = temporal_consistency(video)
    assert 0.5 < tc["cosine"] < 1.0 and 0.0 < tc["l1"] < 0.1


def test_temporal_consistency_wants_uint8_clips_of_two_frames_or_more():
    with pytest.raises(ValueError, match="uint8"):
        temporal_consistency(torch.zeros(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_consistency(torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------------------------- paraphrases


def _seen(n: int) -> list[dict[str, str]]:
    cfg = load(ROOT / "params.yaml")
    return eval_prompts(cfg, random.Random(cfg.seed + 101))["seen"][:n]


def _anchor_index() -> dict[str, tuple[str, str]]:
    from components.expand import ANCHORS

    return {p: (a, v) for a, values in ANCHORS.items() for v, ps in values.items() for p in ps}


def test_paraphrases_name_every_attribute_by_a_synonym_never_by_its_caption_word():
    attrs_list = _seen(16)
    texts = paraphrase_prompts(attrs_list, seed=0)
    assert texts == paraphrase_prompts(attrs_list, seed=0)  # seeded: the same set every run
    assert len(set(texts)) == len(texts)
    index = _anchor_index()
    for attrs, text in zip(attrs_list, texts):
        canonical = world.caption(attrs)
        assert text != canonical
        # The words the caption uses for the graded attributes are gone ...
        words = set(text.replace(",", " ").split())
        for a in world.GRADED:
            assert attrs[a] not in words, (a, text)
        # ... and the synonyms standing for them parse back to the same attributes.
        found = {index[p] for p in index if f" {p} " in f" {text.replace(',', ' ')} "}
        for a in ("color", "shape", "motion", "size", "background"):
            assert (a, attrs[a]) in found, (a, text)
            assert not any(b == a and v != attrs[a] for b, v in found), (a, text, found)


def test_every_value_of_the_world_has_a_synonym():
    for attr, values in world.ATTRIBUTES.items():
        for v in values:
            assert synonyms(attr, v), (attr, v)


def test_prompt_expansion_grounds_the_paraphrases_back_to_the_canonical_captions():
    """What evaluation measures as `paraphrase_expanded_*` rests on this: the real MiniLM
    grounding maps every reworded seen prompt onto its canonical caption."""
    from components.expand import expand

    attrs_list = _seen(16)
    for attrs, text in zip(attrs_list, paraphrase_prompts(attrs_list, seed=0)):
        result = expand(text, seed=0)
        assert {a: result["attributes"][a] for a in world.GRADED} == {a: attrs[a] for a in world.GRADED}, text
        assert result["caption"] == world.caption(attrs), text


# ---------------------------------------------------------------------------------- val loss, report


def test_flow_val_loss_reads_the_val_latents_of_data_encoded(tmp_path, one_thread):
    from components.dit import DiT, DiTSpec
    from components.evaluation import flow_val_loss
    from components.train_dit import val_loss

    torch.manual_seed(0)
    latents = torch.randn(6, 4, 2, 4, 4)
    torch.save({"latents": latents, "clip_id": [str(i) for i in range(6)],
                "caption_index": torch.tensor([1, 1, 2, 1, 2, 2]),
                "split": ["train", "val", "train", "val", "heldout", "val"]}, tmp_path / "latents.pt")
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :3] = True
    torch.save({"captions": ["", "a red circle", "a blue square"], "tokens": torch.randn(3, 8, 384).half(),
                "mask": mask}, tmp_path / "text.pt")
    cfg = load(ROOT / "params.yaml", profile="ci")
    dit = DiT(DiTSpec.from_config(cfg.dit, latent_channels=4)).eval()
    out = flow_val_loss(tmp_path, dit, seed=0)
    assert out["flow_val_clips"] == 3
    text = torch.load(tmp_path / "text.pt")
    val = torch.tensor([1, 3, 5])
    c = torch.tensor([1, 1, 2])
    want = val_loss(dit, latents[val], text["tokens"][c, :3].float(), text["mask"][c, :3], seed=0)
    assert out["flow_val_loss"] == pytest.approx(want, rel=1e-5)
    assert np.isfinite(out["flow_val_loss"]) and out["flow_val_loss"] > 0


def test_report_shows_new_metrics_gates_primary_and_sample_grids():
    metrics = {"adherence_seen_color": 0.9, "adherence_seen_all": 0.5, "adherence_heldout_all": 0.25,
               "paraphrase_all": 0.4, "paraphrase_gap_all": 0.1, "paraphrase_expanded_all": 0.5,
               "fd_generated": 12.5, "fd_real_baseline": 3.25, "fd_clips": 64.0,
               "temporal_cosine_generated": 0.97, "temporal_cosine_real": 0.98, "flow_val_loss": 0.61}
    gates = [{"name": "adherence_color_min", "metric": "adherence_seen_color", "op": ">=", "value": 0.9,
              "threshold": 0.6, "passed": True, "margin": 0.3}]
    md = report_markdown({"metrics": metrics, "gates": gates, "passed": True,
                          "primary": {"metric": "adherence_seen_all", "direction": "higher", "value": 0.5}})
    assert "| adherence_color_min | 0.9 | >= 0.6 | pass | +0.3 |" in md
    assert "`adherence_seen_all` = 0.5 (higher is better)" in md
    assert "| 12.5 | 3.25 (two disjoint real sets) |" in md
    assert "0.4 (gap 0.1)" in md and "0.61" in md
    for grid in ("grid_seen", "grid_heldout", "grid_paraphrase"):
        assert f"(samples/{grid}.gif)" in md
