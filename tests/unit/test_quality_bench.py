"""benchmarks/quality.py: the choices it makes from held-out and per-task results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
quality = pytest.importorskip("quality")


def row(weighting: dict, p: float, ttp: float) -> dict:
    return {"name": str(weighting), "weighting": weighting, "P": p, "TTP": ttp}


def test_choose_weighting_takes_best_mix_and_never_a_single_adapter() -> None:
    sample = {"mode": "sample", "weight_on": "global", "lam": 0.5}
    top5 = {"mode": "bank", "topk": 5, "weight_on": "local", "lam": 0.5}
    gate = {"mode": "gate", "gate_quantile": 0.2, "gate_width": 1.0}
    rows = [
        row(sample, 0.90, 0.60),
        row(top5, 0.92, 0.70),
        row(gate, 0.80, 0.70),
        row({"mode": "local_only"}, 0.99, 0.99),  # not a mix: never chosen
    ]
    assert quality.choose_weighting(rows) == top5
    rows[2].update(P=0.95)
    assert quality.choose_weighting(rows) == gate
    # now all three tie: the earlier (reference) variant wins
    rows[1].update(P=0.90, TTP=0.60)
    rows[2].update(P=0.90, TTP=0.60)
    assert quality.choose_weighting(rows) == sample


def test_weighting_variants_are_valid_configs_with_unique_names() -> None:
    from feddpa.core.config import WeightingConfig

    variants = quality.weighting_variants()
    assert len({name for name, _ in variants}) == len(variants)
    modes = {WeightingConfig(**w).mode for _, w in variants}
    assert {"gate", "bank", "sample", "fixed", "global_only", "local_only"} <= modes


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
