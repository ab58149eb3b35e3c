"""Training variants as phase schedules, and one real training phase on MiniLM."""

from __future__ import annotations

import pytest
import torch

from feddpa.core.adapters import (
    ADAPTERS,
    GLOBAL,
    GLOBAL_ONLY,
    LOCAL,
    LOCAL_ONLY,
    Mix,
    adapter_state,
    fresh_adapter_state,
    load_adapter_state,
)
from feddpa.core.algorithms import derive_seed, method_of
from feddpa.core.config import (
    EvalConfig,
    ExperimentConfig,
    LoraSettings,
    ModelConfig,
    TrainConfig,
    build_config,
)
from feddpa.core.records import Example, format_options
from feddpa.core.training import Phase, batches, run_phase

METHODS = ("fedit", "feddpa_t", "feddpa_f", "local", "centralized")


def config(method: str, **train) -> ExperimentConfig:
    base = {"epochs": 2, "local_epochs": 3, "finetune_epochs": 4, "mix_a": 0.25}
    return build_config({"method": method, "train": {**base, **train}})


def summary(phases: list[Phase]) -> list[tuple]:
    return [(p.name, p.adapter, p.mix, p.epochs) for p in phases]


GLOBAL_PHASE = ("global", GLOBAL, Mix(1.0, 0.0), 2)


# --- schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedit", "centralized", "feddpa_f"])
def test_global_only_rounds(method):
    cfg = config(method)
    for r in range(4):
        assert summary(method_of(cfg).round_phases(r)) == [GLOBAL_PHASE]


def test_feddpa_t_round0_is_fedit_then_local_before_global():
    cfg = config("feddpa_t")
    assert summary(method_of(cfg).round_phases(0)) == summary(
        method_of(config("fedit")).round_phases(0)
    )
    for r in (1, 2, 5):
        phases = method_of(cfg).round_phases(r)
        # order matters: the local adapter trains against the global received, then the global
        assert [p.adapter for p in phases] == [LOCAL, GLOBAL]
        local, glob = summary(phases)
        assert local == ("local", LOCAL, Mix(global_w=0.75, local_w=0.25), 3)
        assert glob == GLOBAL_PHASE


def test_feddpa_t_mix_follows_a():
    (local, _) = method_of(config("feddpa_t", mix_a=0.5)).round_phases(1)
    assert local.mix == Mix(0.5, 0.5)
    (local, _) = method_of(config("feddpa_t", mix_a=1.0)).round_phases(1)
    assert local.mix == Mix(0.0, 1.0)


def test_local_method_trains_local_only():
    cfg = config("local")
    for r in range(3):
        assert summary(method_of(cfg).round_phases(r)) == [("local", LOCAL, LOCAL_ONLY, 3)]


def test_finetune_phases_only_for_feddpa_f():
    assert summary(method_of(config("feddpa_f")).finetune_phases()) == [
        ("finetune", LOCAL, Mix(0.0, 1.0), 4)
    ]
    for method in ("fedit", "feddpa_t", "local", "centralized"):
        assert method_of(config(method)).finetune_phases() == []


def test_uploads_and_trains_local():
    assert {m for m in METHODS if method_of(config(m)).uploads_global} == {
        "fedit",
        "feddpa_t",
        "feddpa_f",
        "centralized",
    }
    assert {m for m in METHODS if method_of(config(m)).trains_local} == {
        "feddpa_t",
        "feddpa_f",
        "local",
    }


def test_eval_weighting_per_method():
    weighting = {"mode": "sample", "k": 3, "weight_on": "local", "lam": 0.4}
    for method, mode in [
        ("fedit", "global_only"),
        ("centralized", "global_only"),
        ("local", "local_only"),
        ("feddpa_t", "sample"),
        ("feddpa_f", "sample"),
    ]:
        cfg = build_config({"method": method, "weighting": weighting})
        got = method_of(cfg).eval_weighting()
        assert got.mode == mode, method
        # everything else is kept
        assert (got.k, got.weight_on, got.lam) == (3, "local", 0.4)
        assert cfg.weighting.mode == "sample"  # the config itself is untouched


def test_derive_seed_is_stable():
    # computed once; sha256-based, so the same in every process and under any PYTHONHASHSEED
    assert derive_seed(0, "round", 3, "client", "c1") == 2651678323808523508
    assert derive_seed(42) == 5100092405008180153
    assert derive_seed(0, "round", 3) != derive_seed(0, "round", 4)
    assert 0 <= derive_seed("x") < 2**63


def test_batches_cover_every_index_once():
    got = batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted(i for b in got for i in b) == list(range(10))
    assert got == batches(10, 4, torch.Generator().manual_seed(0))


# --- one real phase on MiniLM --------------------------------------------------------------------

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
# an easy task: the answer is always the same option
DATA = [
    Example(format_options(f"the word {w}", ["yes", "no", "maybe"]), "maybe", "t") for w in WORDS
]
TRAIN = TrainConfig(batch_size=4, micro_batch_size=4, lr=3e-3)


@pytest.fixture(scope="module")
def mc_model():
    from feddpa.core.models import build_task_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: extra threads only spin on the shared 2-core box
    model = build_task_model(ModelConfig(max_length=16), LoraSettings(), EvalConfig())
    yield model
    torch.set_num_threads(threads)


def reset(model) -> None:
    for i, name in enumerate(ADAPTERS):
        load_adapter_state(model.peft, name, fresh_adapter_state(model.peft, seed=i))


def states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: adapter_state(model.peft, name) for name in ADAPTERS}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_b_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    for k in before:
        if ".lora_B." in k:
            assert not torch.equal(before[k], after[k]), k


def base_params(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.peft.named_parameters() if "lora_" not in k}


def test_run_phase_trains_only_its_adapter_and_lowers_the_loss(mc_model):
    reset(mc_model)
    base = base_params(mc_model)
    start = states(mc_model)

    result = run_phase(mc_model, DATA, Phase("global", GLOBAL, GLOBAL_ONLY, 3), TRAIN, seed=1)
    after_global = states(mc_model)
    assert result.steps == 6 and len(result.epoch_losses) == 3
    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0], result.epoch_losses
    assert_b_changed(start[GLOBAL], after_global[GLOBAL])
    assert_same(start[LOCAL], after_global[LOCAL])

    mix = Mix(0.5, 0.5)
    result = run_phase(mc_model, DATA, Phase("local", LOCAL, mix, 3), TRAIN, seed=2)
    after_local = states(mc_model)
    assert result.epoch_losses[-1] < result.epoch_losses[0], result.epoch_losses
    assert_b_changed(after_global[LOCAL], after_local[LOCAL])
    assert_same(after_global[GLOBAL], after_local[GLOBAL])

    for k, p in mc_model.peft.named_parameters():
        if k in base:
            assert torch.equal(p, base[k]), k
    assert not any(p.requires_grad for p in mc_model.peft.parameters())
    assert not mc_model.peft.training


def test_run_phase_is_deterministic_in_the_seed(mc_model):
    phase = Phase("global", GLOBAL, GLOBAL_ONLY, 1)
    runs = []
    for seed in (5, 5, 6):
        reset(mc_model)
        result = run_phase(mc_model, DATA, phase, TRAIN, seed=seed)
        runs.append((result.epoch_losses, states(mc_model)[GLOBAL]))
    assert runs[0][0] == runs[1][0]
    assert_same(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_run_phase_without_data_raises(mc_model):
    with pytest.raises(ValueError, match="no training examples"):
        run_phase(mc_model, [], Phase("global", GLOBAL, GLOBAL_ONLY, 1), TRAIN, seed=0)
