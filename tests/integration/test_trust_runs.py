"""Trust, the validation slice and the frozen-model representation through real runs on a tiny
Llama: what the benchmarks build on (FedDPA-F forked from FedDPA-T's rounds; FedIT read from them)."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import latest_round, llama_cfg

import feddpa.orchestrator.loop as loop
from feddpa.actors.host import ClientHost
from feddpa.core.adapters import LOCAL
from feddpa.core.evaluation import representations
from feddpa.core.models import build_task_model
from feddpa.core.storage import Stage, client_dir, load_adapter, load_bank
from feddpa.orchestrator.executor import InProcessExecutor
from feddpa.orchestrator.report import fedit_comparison, run_summary

TRUST = {
    "data": {"train_per_task": 10, "validation_fraction": 0.2},
    "weighting": {"representation": "base", "trust": "validation"},
}


def test_fedit_and_feddpa_t_share_one_global_trajectory_bit_for_bit(
    small_cfg, tiny_llama_dir, tmp_path
):
    """FedDPA-T's global phase trains the global adapter alone with FedIT's seeds: its globals
    are FedIT's, so FedIT is read from a FedDPA-T run and FedDPA-F may fork its rounds."""
    globals_ = {}
    for method in ("fedit", "feddpa_t"):
        cfg = llama_cfg(small_cfg, tiny_llama_dir, {"method": method, **TRUST})
        loop.train(cfg, tmp_path / method, InProcessExecutor)
        globals_[method] = load_adapter(latest_round(tmp_path / method) / "global")
    assert globals_["fedit"].keys() == globals_["feddpa_t"].keys()
    for key, value in globals_["fedit"].items():
        assert torch.equal(value, globals_["feddpa_t"][key]), key


@pytest.fixture(scope="module")
def f_run(small_cfg, tiny_llama_dir, tmp_path_factory):
    cfg = llama_cfg(small_cfg, tiny_llama_dir, {"method": "feddpa_f", **TRUST})
    run_dir = tmp_path_factory.mktemp("f_run") / "run"
    final = loop.train(cfg, run_dir, InProcessExecutor)
    return cfg, run_dir, final


def test_the_validation_slice_is_never_trained_on_and_sets_each_clients_trust(f_run):
    cfg, run_dir, final = f_run
    host = ClientHost(cfg, str(run_dir / "data"), [0, 1])
    for cid, state in host.clients.items():
        assert (len(state.data), len(state.validation)) == (8, 2)
        trained = {e.instruction for e in state.data}
        assert not trained & {e.instruction for e in state.validation}, cid
        bank = load_bank(client_dir(latest_round(run_dir), cid) / "bank.safetensors")
        assert bank.trust in cfg.weighting.trust_grid and bank.representation == "base"
        assert len(bank) == 8  # the bank holds the trained items only
    assert set(final["clients"]) == {"0", "1"}
    # FedDPA-F's final evaluation carries FedIT (its global adapter alone) and the paired line
    assert set(final["global_only"]["clients"]) == {"0", "1"}
    item_tasks = [ex.task for ex in host.test]
    line = fedit_comparison(run_summary(run_dir), item_tasks, "FedDPA-F")
    assert line is not None and line.startswith("FedDPA-F − FedIT") and "TTP" in line


def test_the_frozen_model_representation_ignores_the_local_adapter(small_cfg, tiny_llama_dir):
    cfg = llama_cfg(small_cfg, tiny_llama_dir, {"method": "feddpa_t", **TRUST})
    model = build_task_model(cfg.model, cfg.lora, cfg.eval)
    texts = [
        "### Instruction:\nsay yes\n\n### Response:\n",
        "### Instruction:\nno\n\n### Response:\n",
    ]
    before = representations(model, texts, "base")
    local_before = representations(model, texts, "local")
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if f".{LOCAL}." in name and "lora_B" in name:
                p.add_(torch.randn_like(p))
    assert torch.equal(representations(model, texts, "base"), before)
    assert not torch.allclose(representations(model, texts, "local"), local_before)


def test_a_fit_stages_trust_zero_and_calibration_measures_it_against_the_aggregated_global(
    f_run, tmp_path
):
    """Until `calibrate` has run against the global the client will be mixed with, its bank says
    0 (served as FedIT); calibration then gives the trust the run committed and logged."""
    cfg, run_dir, _ = f_run
    step = cfg.federation.rounds  # FedDPA-F's fine-tuning step
    final_global = load_adapter(latest_round(run_dir) / "global")
    host = ClientHost(cfg, str(run_dir / "data"), [0])
    stage = Stage(tmp_path, step)
    host.fit(0, step, final_global, stage)
    assert load_bank(client_dir(tmp_path, 0) / "bank.safetensors").trust == 0.0
    trust = host.calibrate(0, final_global, step, stage)
    committed = load_bank(client_dir(latest_round(run_dir), 0) / "bank.safetensors").trust
    assert trust == committed == load_bank(client_dir(tmp_path, 0) / "bank.safetensors").trust
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["trust"] == {"0": committed, "1": pytest.approx(logged[-1]["trust"]["1"])}
