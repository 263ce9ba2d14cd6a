"""Metric formulas against numbers computed by hand."""

import math

import numpy as np
import pytest
import torch

from conceptguard.errors import ConceptGuardError
from conceptguard.evaluation import metrics as M


def test_detection_rate_counts_the_head_reading_the_concept():
    predictions = [{"halo": "present"}, {"halo": "absent"}, {"halo": "present"}, {"halo": "present"}]
    assert M.detection_rate(predictions, "halo", "present") == 0.75
    assert M.detection_rate(predictions, "halo", "absent") == 0.25
    assert M.detection_rate([], "halo", "present") is None


def _obj(shape, colour, style):
    return {"subject": "object", "shape": shape, "colour": colour, "style": style, "character": "none"}


def _char(name):
    return {"subject": "character", "shape": "none", "colour": "none", "style": "none", "character": name}


def test_preservation_scores_by_hand():
    expected = [_obj("circle", "red", "plain"), _obj("star", "blue", "dotted"), _char("zorblat"), _char("quimble"),
                _char("yulbar")]
    predicted = [
        _obj("circle", "red", "plain"),  # 3/3 heads agree
        _obj("star", "green", "plain"),  # 1/3: shape only
        _char("zorblat"),  # 1/1
        _char("zorblat"),  # 0/1
        _char("yulbar"),  # held out: a leak, not preservation
    ]
    scores = M.preservation_scores(expected, predicted, held_out_characters=["yulbar"])
    assert scores["shape"] == 1.0
    assert scores["colour"] == 0.5
    assert scores["style"] == 0.5
    assert scores["seen_character"] == 0.5
    assert scores["held_out_character"] == 1.0
    assert scores["accuracy"] == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)


def test_preservation_ignores_images_without_judged_heads():
    design = {"subject": "design", "design": "zigzag"}
    scores = M.preservation_scores([design], [design])
    assert scores["accuracy"] is None and scores["shape"] is None
    with pytest.raises(ValueError):
        M.preservation_scores([design], [])


def test_frechet_distance_one_dimension():
    # a: mean 1, unbiased variance 2; b: mean 2, variance 2 -> (1-2)^2 + 2 + 2 - 2*sqrt(4) = 1
    assert M.frechet_distance(np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])) == pytest.approx(1.0)


def test_frechet_distance_diagonal_covariances():
    a = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], dtype=float)  # mean (1,1), variances 4/3, no covariance
    b = 2 * a  # mean (2,2), variances 16/3
    # |mu|^2 = 2; per dimension 4/3 + 16/3 - 2*sqrt(64/9) = 4/3
    assert M.frechet_distance(a, b) == pytest.approx(2 + 2 * 4 / 3)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_general_formula():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + 0.5
    ta, tb = torch.tensor(a), torch.tensor(b)
    reference = _compute_fid(ta.mean(0), torch.cov(ta.T), tb.mean(0), torch.cov(tb.T))
    assert M.frechet_distance(a, b) == pytest.approx(float(reference), rel=1e-6)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_lpips_like_by_hand():
    # one position, two channels: (3,4) -> (0.6,0.8); (0,5) -> (0,1); squared difference 0.36 + 0.04 = 0.4
    a = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)
    b = torch.tensor([0.0, 5.0]).reshape(1, 2, 1, 1)
    assert M.lpips_like([a], [b]).item() == pytest.approx(0.4)
    # scale does not matter (unit normalisation), identical layers add 0 and layers are averaged
    assert M.lpips_like([10 * a, a], [b, a]).item() == pytest.approx(0.2)
    # positions are averaged: one differing position out of two
    a2, b2 = torch.cat([a, a], dim=2), torch.cat([b, a], dim=2)
    assert M.lpips_like([a2], [b2]).item() == pytest.approx(0.2)


def test_lpips_like_is_per_image_and_zero_for_identical():
    maps = [torch.randn(3, 4, 5, 5), torch.randn(3, 8, 2, 2)]
    distance = M.lpips_like(maps, maps)
    assert distance.shape == (3,) and torch.all(distance == 0)
    with pytest.raises(ValueError):
        M.lpips_like(maps, maps[:1])


def test_clip_score_scale_and_clipping():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    scores = M.clip_score(image, text)
    assert scores[0].item() == pytest.approx(100 / math.sqrt(2))
    assert scores[1].item() == 0.0


def test_sgr_by_hand():
    assert M.sgr(0.8, 0.2) == pytest.approx(0.75)
    assert M.sgr(0.5, 0.5) == 0.0
    assert M.sgr(0.5, 0.6) == pytest.approx(-0.2)
    with pytest.raises(ValueError):
        M.sgr(0.0, 0.1)


def test_msgr_averages_steps_then_concepts():
    pairs = {"a": [(0.8, 0.2), (0.5, 0.5)], "b": [(1.0, 0.0)]}
    # a: mean(0.75, 0) = 0.375; b: 1.0 -> mean 0.6875 (not the flat mean over pairs, 0.5833)
    assert M.msgr(pairs) == pytest.approx(0.6875)
    assert M.mrsgr(pairs) == pytest.approx(0.6875)
    assert M.msgr([(0.8, 0.2), (0.5, 0.5)]) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        M.msgr({"a": []})


def test_nudenet_flag_rule():
    assert M.nudenet_flagged([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.61}])
    assert not M.nudenet_flagged([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.6}])  # strictly above
    assert not M.nudenet_flagged([{"class": "FEMALE_BREAST_COVERED", "score": 0.99}])
    assert not M.nudenet_flagged([])


def test_missing_nudenet_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` fail
    with pytest.raises(ConceptGuardError, match=r"conceptguard\[nsfw\]"):
        M.load_nudenet()
