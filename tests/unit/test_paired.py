"""Paired differences with bootstrap intervals (feddpa.orchestrator.paired), checked by hand."""

from __future__ import annotations

import pytest

from feddpa.orchestrator.paired import paired

TASKS = ["a", "a", "b", "b"]  # the task of each test item


def run(scores_0: list[float], scores_1: list[float]) -> dict[str, dict]:
    return {"0": {"task": "a", "scores": scores_0}, "1": {"task": "b", "scores": scores_1}}


def test_a_constant_difference_has_a_point_interval():
    a = [run([1, 1, 1, 1], [1, 1, 1, 1])]
    b = [run([0.5] * 4, [0.5] * 4)]
    d = paired(a, b, TASKS, resamples=200)
    for key in ("P", "TTP"):
        assert d[key] == pytest.approx({"mean": 0.5, "lo": 0.5, "hi": 0.5})
    assert d["per_task"]["a"]["mean"] == pytest.approx(0.5)


def test_p_reads_each_clients_own_items_and_ttp_all_items():
    # client 0 (task a) gains 1 on its own items, loses 1 on b's; client 1 (task b) gains 0.5 on
    # its own items only
    a = [run([1, 1, 0, 0], [0, 0, 0.5, 0.5])]
    b = [run([0, 0, 1, 1], [0, 0, 0, 0])]
    d = paired(a, b, TASKS, resamples=200)
    assert d["P"]["mean"] == pytest.approx((1 + 0.5) / 2)
    assert d["TTP"]["mean"] == pytest.approx((0 + 0.25) / 2)
    assert d["per_task"]["a"]["mean"] == pytest.approx(1.0)
    assert d["per_task"]["b"]["mean"] == pytest.approx(0.5)


def test_seeds_are_averaged_and_noisy_items_widen_the_interval():
    a = [run([1, 0, 1, 0], [1, 1, 1, 1]), run([1, 1, 1, 1], [1, 1, 1, 1])]
    b = [run([0, 0, 0, 0], [1, 1, 1, 1]), run([1, 1, 1, 1], [1, 1, 1, 1])]
    d = paired(a, b, TASKS, resamples=500, seed=1)
    assert d["P"]["mean"] == pytest.approx((0.5 + 0) / 2 / 2)  # only seed 0, client 0 differs
    assert d["P"]["lo"] < d["P"]["mean"] < d["P"]["hi"]
    assert d["P"]["lo"] >= 0  # every resampled difference is >= 0
    with pytest.raises(ValueError, match="different clients"):
        paired(a, [run([0] * 4, [0] * 4) | {"2": {"task": "a", "scores": [0] * 4}}] * 2, TASKS)
