"""Privacy end to end, in process (tiny Llama, 2 clients): FedDPA-T with DP (client-placed noise,
adaptive clipping) under secure aggregation — ε per round in metrics.jsonl and the report, the
resolved settings and the accountant in the run directory, only sealed uploads reaching the
driver, and a crash + --resume that continues the accountant and ends bit-identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from run_helpers import adapter_files, cli, latest_round, llama_cfg, metrics

import feddpa.orchestrator.loop as loop
from feddpa.core import dp
from feddpa.orchestrator.executor import InProcessExecutor

PRIVATE = {
    "method": "feddpa_t",
    "federation": {"rounds": 3, "min_fit_clients": 2},
    "privacy": {
        "dp": {
            "enabled": True,
            "noise_multiplier": 0.8,
            "target_epsilon": 60.0,
            "clip": 0.05,
            "noise": "client",
            "adaptive": True,
            "count_stddev": 2.0,
        },
        "secure_aggregation": {"enabled": True},
    },
}


class SpyExecutor(InProcessExecutor):
    """Records what the driver receives from every fit."""

    received: list = []

    def fit(self, step, client_ids, global_state, stage, task=None):
        for res in super().fit(step, client_ids, global_state, stage, task):
            SpyExecutor.received.append((step, res))
            yield res


@pytest.fixture(scope="module")
def private_run(small_cfg, tiny_llama_dir, tmp_path_factory) -> Path:
    cfg = llama_cfg(small_cfg, tiny_llama_dir, PRIVATE)
    run_dir = tmp_path_factory.mktemp("private") / "run"
    SpyExecutor.received = []
    loop.train(cfg, run_dir, SpyExecutor)
    return run_dir


def test_epsilon_per_round_is_logged_and_grows(private_run):
    records = metrics(private_run)
    eps = [r["privacy"]["epsilon"] for r in records]
    assert [r["privacy"]["rounds_accounted"] for r in records] == [1, 2, 3]
    assert 0 < eps[0] < eps[1] < eps[2] <= 60.0
    full = dp.Sampling("fixed", 2, size=2)
    assert eps[2] == pytest.approx(dp.epsilon(0.8, full, 3, 1e-5), rel=1e-12)
    assert all(r["privacy"]["secure_aggregation"] and r["privacy"]["uploads"] == 2 for r in records)
    clips = [r["privacy"]["clip"] for r in records]
    assert clips[0] == 0.05 and len(set(clips)) == 3  # adaptive clipping moved C


def test_resolved_settings_and_the_accountant_are_in_the_run_directory(private_run):
    saved = yaml.safe_load((private_run / "config.yaml").read_text())
    assert saved["privacy"]["dp"]["noise_multiplier"] == 0.8
    assert saved["privacy"]["secure_aggregation"]["enabled"] is True
    state = loop.RunDir(private_run).latest().state()
    assert state["privacy"]["accountant"]["rounds"] == 3
    assert state["privacy"]["clip"] == metrics(private_run)[-1]["privacy"]["next_clip"]


def test_the_driver_receives_sealed_uploads_only(private_run):
    received = SpyExecutor.received
    assert received and all(res.global_state is None for _, res in received)
    assert all(res.sealed is not None and res.sealed.dtype == np.uint64 for _, res in received)


def test_resume_continues_the_accountant_and_is_bit_identical(
    small_cfg, tiny_llama_dir, private_run, tmp_path, monkeypatch
):
    cfg = llama_cfg(small_cfg, tiny_llama_dir, PRIVATE)
    run_dir = tmp_path / "run"
    real_step = loop.run_step

    def crash_after_round_1(cfg, step, *args):
        out = real_step(cfg, step, *args)
        if step == 1:
            raise RuntimeError("simulated crash after round 1 committed")
        return out

    monkeypatch.setattr(loop, "run_step", crash_after_round_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg, run_dir, InProcessExecutor)
    monkeypatch.undo()
    assert cli("train", "--resume", str(run_dir)) == 0
    ref, got = latest_round(private_run), latest_round(run_dir)
    assert adapter_files(got) == adapter_files(ref)
    assert [r["privacy"] for r in metrics(run_dir)] == [r["privacy"] for r in metrics(private_run)]
    table = (run_dir / "results" / "results.md").read_text()  # the final table states the ε
    eps = metrics(run_dir)[-1]["privacy"]["epsilon"]
    assert f"(ε, δ) = ({eps:.3g}, 1e-05)" in table and "secure aggregation (the driver" in table
