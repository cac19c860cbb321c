"""The judge: it learns, predicts valid words, and round-trips through the checkpoint format."""

from __future__ import annotations

import pytest
import torch

from components import world
from components.config import EvalConfig
from components.judge import Judge, train_judge
from components.synth import render

import numpy as np


def _videos(n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, list[str]]]:
    rng = np.random.default_rng(seed)
    labels: dict[str, list[str]] = {a: [] for a in world.ATTRIBUTES}
    clips = []
    for i in range(n):
        attrs = {a: values[(i * (k + 1)) % len(values)] for k, (a, values) in enumerate(world.ATTRIBUTES.items())}
        clips.append(torch.from_numpy(render(attrs, 16, 5, rng)).permute(3, 0, 1, 2))  # (3, T, H, W)
        for a in labels:
            labels[a].append(attrs[a])
    return torch.stack(clips), labels


def test_a_few_steps_lower_the_loss_and_predict_valid_words(tmp_path):
    videos, labels = _videos(16)
    logged = []
    cfg = EvalConfig(judge_steps=15, judge_batch_size=8, judge_width=16, judge_lr=3e-3)
    judge = train_judge(videos, labels, cfg, seed=0, log=lambda s, m: logged.append(m["loss"]))
    assert logged[-1] < logged[0]
    pred = judge.predict(videos[:5])
    assert set(pred) == set(world.ATTRIBUTES)
    for a, words in pred.items():
        assert len(words) == 5 and all(w in world.ATTRIBUTES[a] for w in words)
    acc = judge.accuracy(videos, labels)
    assert set(world.GRADED) <= set(acc) and all(0 <= v <= 1 for v in acc.values())
    assert judge.features(videos[:3]).shape == (3, 2 * cfg.judge_width)

    judge.save(tmp_path / "judge.pt")
    again = Judge.load(tmp_path / "judge.pt")
    assert again.predict(videos[:5]) == pred


def test_bad_inputs_are_named():
    videos, labels = _videos(4)
    cfg = EvalConfig(judge_steps=1, judge_batch_size=2, judge_width=16)
    with pytest.raises(ValueError, match="lack motion"):
        train_judge(videos, {a: v for a, v in labels.items() if a != "motion"}, cfg, seed=0)
    with pytest.raises(ValueError, match="unknown color"):
        train_judge(videos, {**labels, "color": ["teal"] * 4}, cfg, seed=0)
    judge = train_judge(videos, labels, cfg, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(videos.float())


def test_a_checkpoint_resumes_only_for_the_clips_it_was_trained_on(tmp_path):
    # The evaluation stage trains the judge on a VAE's reconstructions: the same count and labels
    # from another VAE are other data, and must not get the old, finished judge back.
    videos, labels = _videos(8)
    other = (255 - videos).contiguous()
    cfg = EvalConfig(judge_steps=4, judge_batch_size=4, judge_width=16)
    ckpt = tmp_path / "ckpt"
    first = train_judge(videos, labels, cfg, seed=0, ckpt_dir=ckpt)
    on_other = train_judge(other, labels, cfg, seed=0, ckpt_dir=ckpt)
    fresh_other = train_judge(other, labels, cfg, seed=0)
    again = train_judge(videos, labels, cfg, seed=0, ckpt_dir=ckpt)
    for a, b, c, d in zip(first.state_dict().values(), on_other.state_dict().values(),
                          fresh_other.state_dict().values(), again.state_dict().values()):
        assert torch.equal(b, c)  # trained afresh on the other clips
        assert torch.equal(a, d)  # the first clips' checkpoint still resumes
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), on_other.state_dict().values()))
