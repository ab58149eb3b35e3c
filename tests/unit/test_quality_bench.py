"""benchmarks/quality.py: the choices it makes from held-out and per-task results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
quality = pytest.importorskip("quality")


def row(weight_on: str, mode: str, lam: float, p: float, ttp: float) -> dict:
    return {"weight_on": weight_on, "mode": mode, "lam": lam, "P": p, "TTP": ttp}


def test_choose_weighting_takes_best_mix_and_never_a_single_adapter() -> None:
    rows = [
        row("global", "sample", 0.5, 0.90, 0.60),
        row("local", "bank_top5", 0.5, 0.92, 0.70),
        row("local", "bank", 1.0, 0.80, 0.70),
        row("global", "local_only", 0.5, 0.99, 0.99),  # not a mix: never chosen
    ]
    assert quality.choose_weighting(rows) == {
        "mode": "bank",
        "weight_on": "local",
        "lam": 0.5,
        "topk": 5,
    }
    # now it ties with the first row: the earlier (reference) variant wins
    rows[1].update(P=0.90, TTP=0.60)
    rows[2]["P"] = 0.0
    assert quality.choose_weighting(rows[:2] + rows[2:3]) == {
        "mode": "sample",
        "weight_on": "global",
        "lam": 0.5,
    }


def test_learnable_tasks_need_a_margin_over_zero_shot_and_majority() -> None:
    rows = [
        {"task": "trec", "zero_shot": 0.30, "majority": 0.20, "local": 0.70},
        {"task": "qqp", "zero_shot": 0.40, "majority": 0.65, "local": 0.66},
        {"task": "snli", "zero_shot": 0.33, "majority": 0.34, "local": 0.39},
    ]
    assert quality.learnable_tasks(rows) == ["trec", "snli"]
    assert quality.learnable_tasks(rows, margin=0.1) == ["trec"]


def test_over_tasks_restricts_clients_and_items() -> None:
    def client(task: str, p: float, per_task: dict) -> dict:
        return {"tasks": [task], "P": p, "per_task": per_task}

    final = {
        "clients": {
            "0": client("a", 0.8, {"a": 0.8, "b": 0.4, "c": 0.0}),
            "1": client("b", 0.6, {"a": 0.2, "b": 0.6, "c": 1.0}),
            "2": client("c", 0.5, {"a": 0.5, "b": 0.5, "c": 0.5}),
        }
    }
    seed = {m: {"final": final} for m in quality.METHODS}
    out = quality.over_tasks([seed, seed], ["a", "b"])
    assert out["local"]["P"] == pytest.approx(0.7)  # clients 0 and 1
    assert out["local"]["TTP"] == pytest.approx((0.6 + 0.4) / 2)  # their mean over a, b
