"""The client's trust in its local adapter (feddpa.core.trust), how the gate applies it, how it is
stored, and the evaluation shortcuts it enables (rows on the global adapter alone reuse its
scores; client-independent representations are computed once)."""

from __future__ import annotations

import pytest
import torch

from feddpa.core.adapters import Mix
from feddpa.core.config import WeightingConfig
from feddpa.core.evaluation import ClientWeighting, ItemScores, score_items
from feddpa.core.records import Example
from feddpa.core.storage import load_bank, save_bank, save_tensors
from feddpa.core.trust import choose_trust, split_validation, validation_losses
from feddpa.core.weighting import ClientBank, gate_local_weights


def items(n: int, task: str = "t") -> list[Example]:
    return [Example(f"question {i}", f"answer {i}", task) for i in range(n)]


def test_the_validation_slice_is_seeded_disjoint_and_ordered():
    data = items(50)
    train, val = split_validation(data, 0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert not {e.instruction for e in train} & {e.instruction for e in val}
    assert split_validation(data, 0.2, seed=7) == (train, val)
    assert split_validation(data, 0.2, seed=8)[1] != val
    # order kept in both parts (train sees the shard's order)
    assert [data.index(e) for e in train] == sorted(data.index(e) for e in train)


def test_a_tiny_or_zero_validation_slice_leaves_training_data_whole():
    assert split_validation(items(10), 0.0, seed=0) == (items(10), [])
    assert split_validation(items(2), 0.5, seed=0) == (items(2), [])
    train, val = split_validation(items(3), 0.01, seed=0)  # at least one, at least two to train
    assert (len(train), len(val)) == (2, 1)


def test_trust_is_the_weight_with_the_lowest_validation_loss_ties_to_the_global():
    assert choose_trust({0.0: 1.0, 0.5: 0.7, 1.0: 0.9}) == 0.5
    assert choose_trust({0.0: 0.7, 0.5: 0.7, 1.0: 0.7}) == 0.0
    assert choose_trust({1.0: 0.2, 0.0: 0.3}) == 1.0
    with pytest.raises(ValueError, match="no validation losses"):
        choose_trust({})


class QuadraticLoss:
    """A model whose loss under Mix(1 − t, t) is (t − 0.75)² + 1, per batch; records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def loss(self, examples: list[Example], mix: Mix) -> torch.Tensor:
        self.batches.append(len(examples))
        return torch.tensor((float(mix.local_w) - 0.75) ** 2 + 1 + 0 * float(mix.global_w))


def test_validation_losses_score_each_grid_weight_over_every_item():
    model = QuadraticLoss()
    losses = validation_losses(model, items(5), (0.0, 0.5, 0.75, 1.0), batch_size=2)  # type: ignore[arg-type]
    assert losses == pytest.approx({0.0: 1.5625, 0.5: 1.0625, 0.75: 1.0, 1.0: 1.0625})
    assert model.batches == [2, 2, 1] * 4
    assert choose_trust(losses) == 0.75


def bank(trust: float) -> ClientBank:
    vectors = torch.eye(4)[:3] + 0.1
    return ClientBank.build(vectors, topk=2, representation="base", trust=trust)


def test_the_gate_scales_its_local_weight_by_the_clients_trust():
    scores = torch.tensor([-1.0, 0.2, 0.99])
    cfg = WeightingConfig(trust="validation")
    full = gate_local_weights(scores, bank(1.0), cfg)
    half = gate_local_weights(scores, bank(0.5), cfg)
    assert torch.equal(half, 0.5 * full) and float(full.max()) > 0
    assert torch.equal(gate_local_weights(scores, bank(0.0), cfg), torch.zeros(3))
    # trust 'full' ignores what the bank says (e.g. `feddpa eval --set weighting.trust=full`)
    assert torch.equal(gate_local_weights(scores, bank(0.0), WeightingConfig()), full)


def test_a_banks_trust_survives_the_disk_and_an_older_bank_is_fully_trusted(tmp_path):
    save_bank(bank(0.25), tmp_path / "bank.safetensors")
    loaded = load_bank(tmp_path / "bank.safetensors")
    assert loaded.trust == 0.25 and loaded.representation == "base"
    old = bank(0.25)
    save_tensors(
        {"bank": old.vectors, "loo": old.loo, "loo_topk": torch.tensor([2])},
        tmp_path / "old.safetensors",
    )
    assert load_bank(tmp_path / "old.safetensors").trust == 1.0


def test_trust_on_validation_needs_a_validation_slice(small_cfg):
    with pytest.raises(ValueError, match="set data.validation_fraction"):
        small_cfg({"weighting": {"trust": "validation"}})
    cfg = small_cfg({"weighting": {"trust": "validation"}, "data": {"validation_fraction": 0.2}})
    assert cfg.weighting.trust == "validation"
    with pytest.raises(ValueError, match="trust_grid"):
        small_cfg({"weighting": {"trust_grid": [0.0, 1.5]}})


class CountingModel:
    """Scores every item 0.5 and records which items it was asked to score."""

    def __init__(self) -> None:
        self.scored: list[str] = []

    def query_text(self, ex: Example) -> str:
        return ex.instruction

    def score(self, examples: list[Example], mix: Mix) -> tuple[list[float], list[str]]:
        self.scored += [e.instruction for e in examples]
        return [0.5] * len(examples), [""] * len(examples)


def test_items_on_the_global_adapter_alone_reuse_its_scores_and_the_rest_are_scored():
    test = items(4)
    shared = torch.stack([torch.eye(4)[0] + 0.1] * 2 + [torch.eye(4)[3]] * 2)  # 2 familiar
    global_scores = ItemScores((0.9, 0.8, 0.7, 0.6), (1.0,) * 4)
    cfg = WeightingConfig(trust="validation", representation="base")
    model = CountingModel()
    client = ClientWeighting(0, bank(1.0), has_local=True)
    got = score_items(model, test, cfg, client, 0, 2, global_scores=global_scores, shared=shared)  # type: ignore[arg-type]
    local_w = [1 - w for w in got.global_weights]
    assert local_w[0] > 0 and local_w[1] > 0 and local_w[2:] == [0.0, 0.0]
    assert sorted(model.scored) == ["question 0", "question 1"]
    assert got.scores == (0.5, 0.5, 0.7, 0.6)
    # a client that trusts its local adapter 0 is the global adapter: nothing is run again
    model = CountingModel()
    client = ClientWeighting(0, bank(0.0), has_local=True)
    got = score_items(model, test, cfg, client, 0, 2, global_scores=global_scores, shared=shared)  # type: ignore[arg-type]
    assert model.scored == [] and got.scores == global_scores.scores
    # without the global scores every item is scored
    model = CountingModel()
    score_items(model, test, cfg, client, 0, 2, shared=shared)  # type: ignore[arg-type]
    assert len(model.scored) == 4


def test_the_gates_layer_is_stored_with_the_bank_and_a_mismatch_names_the_fix(tmp_path):
    from dataclasses import replace

    from feddpa.core.weighting import instance_mix

    middle = replace(bank(0.5), layer=0.5)
    save_bank(middle, tmp_path / "bank.safetensors")
    assert load_bank(tmp_path / "bank.safetensors").layer == 0.5
    query = torch.eye(4)[:1] + 0.1
    ok = WeightingConfig(representation="base", layer=0.5, trust="validation")
    assert float(instance_mix(query, middle, ok).local_w) > 0
    with pytest.raises(ValueError, match="weighting.layer=0.5"):
        instance_mix(query, middle, WeightingConfig(representation="base"))


def test_a_causal_representation_at_a_layer_is_that_layers_last_prompt_token(
    small_cfg, tiny_llama_dir
):
    from run_helpers import llama_cfg

    from feddpa.core.adapters import mixed
    from feddpa.core.evaluation import NO_ADAPTER, representations
    from feddpa.core.models import build_task_model

    cfg = llama_cfg(small_cfg, tiny_llama_dir, {})
    model = build_task_model(cfg.model, cfg.lora, cfg.eval)
    texts = [
        "### Instruction:\nsay yes\n\n### Response:\n",
        "### Instruction:\nno\n\n### Response:\n",
    ]
    batch = model._prompt_batch(texts)  # type: ignore[attr-defined]
    with torch.no_grad(), mixed(model.peft, NO_ADAPTER):
        states = model.peft(**batch, output_hidden_states=True).hidden_states  # 2 layers: 3
    got = representations(model, texts, "base", layer=0.5)
    torch.testing.assert_close(got, states[1][:, -1].float())
    torch.testing.assert_close(representations(model, texts, "base"), states[2][:, -1].float())
