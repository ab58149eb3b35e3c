"""Instance-wise weighting against hand-computed numbers: the paper's w(x) = λ · mean_k cos(e(x),
e(x_k)), the calibrated gate, and `mix_rows` (the one mixing function of evaluation and serving)."""

from __future__ import annotations

import math

import pytest
import torch

from feddpa.core.adapters import Mix
from feddpa.core.config import WeightingConfig
from feddpa.core.weighting import (
    MIN_GATE_WIDTH,
    ClientBank,
    RowWeighting,
    cosine_matrix,
    gate_calibration,
    gate_local_weights,
    instance_mix,
    knn_scores,
    leave_one_out_scores,
    mix_for_weight,
    mix_rows,
    needs_bank,
    sample_references,
    similarity_weights,
)

R2 = 1 / math.sqrt(2)  # cos((1,0),(1,1))

# bank rows (1,0), (0,1), (1,1); queries (1,0) and (1,1)
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
QUERIES = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
COS = [[1.0, 0.0, R2], [R2, R2, 1.0]]
CB = ClientBank.build(BANK, 5)


def cfg(**kw) -> WeightingConfig:
    return WeightingConfig(**kw)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(got: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_cosine_matrix_2d():
    close(cosine_matrix(QUERIES, BANK), COS)


def test_cosine_matrix_3d_is_scale_invariant():
    # (1,2,2) has norm 3: cos with (2,0,0) = 1/3, with (0,0,5) = 2/3, with (0,-4,0) = -2/3
    q = torch.tensor([[1.0, 2.0, 2.0], [-3.0, -6.0, -6.0]])
    bank = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, -4.0, 0.0]])
    close(cosine_matrix(q, bank), [[1 / 3, 2 / 3, -2 / 3], [-1 / 3, -2 / 3, 2 / 3]])


def test_cosine_matrix_upcasts_half_inputs():
    got = cosine_matrix(QUERIES.half(), BANK.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(COS), atol=1e-3, rtol=0)


def test_bank_mean_times_lambda():
    # λ = 0.5: (1 + 0 + 0.70711)/3 · 0.5 = 0.284518 ; (0.70711 + 0.70711 + 1)/3 · 0.5 = 0.402369
    w = similarity_weights(QUERIES, BANK, cfg(mode="bank", lam=0.5))
    close(w, [0.2845178, 0.4023689])


def test_lambda_scales_linearly():
    full = similarity_weights(QUERIES, BANK, cfg(mode="bank", lam=1.0))
    close(full, [0.5690356, 0.8047379])
    close(similarity_weights(QUERIES, BANK, cfg(mode="bank", lam=0.25)), [0.1422589, 0.2011845])
    close(similarity_weights(QUERIES, BANK, cfg(mode="bank", lam=0.0)), [0.0, 0.0])


@pytest.mark.parametrize(
    "topk,expected",
    [
        (1, [1.0, 1.0]),  # best cosine: 1 and 1
        (2, [(1 + R2) / 2, (1 + R2) / 2]),  # 0.853553 for both
        (3, [(1 + R2) / 3, (2 * R2 + 1) / 3]),  # all rows = the plain mean
        (10, [(1 + R2) / 3, (2 * R2 + 1) / 3]),  # more than the bank holds
    ],
)
def test_bank_topk(topk, expected):
    w = similarity_weights(QUERIES, BANK, cfg(mode="bank", topk=topk, lam=1.0))
    close(w, expected)


def test_bank_3d_example():
    q = torch.tensor([[1.0, 2.0, 2.0]])
    bank = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    close(similarity_weights(q, bank, cfg(mode="bank", lam=0.5)), [0.25])  # (1/3 + 2/3)/2 · 0.5


def test_sample_references_are_distinct_rows():
    refs = sample_references(batch=50, bank_size=7, k=5, generator=gen(1))
    assert refs.shape == (50, 5)
    assert refs.min() >= 0 and refs.max() < 7
    for row in refs.tolist():
        assert len(set(row)) == 5
    # all seven rows get drawn somewhere, i.e. it is not always the same prefix
    assert set(refs.flatten().tolist()) == set(range(7))


def test_sample_references_caps_k_at_bank_size():
    refs = sample_references(batch=3, bank_size=4, k=9, generator=gen(2))
    assert refs.shape == (3, 4)
    for row in refs.tolist():
        assert sorted(row) == [0, 1, 2, 3]


def test_sample_is_deterministic_in_the_seed():
    bank = torch.randn(40, 8, generator=gen(3))
    queries = torch.randn(6, 8, generator=gen(4))
    c = cfg(mode="sample", k=5)
    a = similarity_weights(queries, bank, c, gen(11))
    b = similarity_weights(queries, bank, c, gen(11))
    other = similarity_weights(queries, bank, c, gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, other)


def test_sample_equals_mean_over_the_drawn_rows():
    bank = torch.randn(30, 4, generator=gen(5))
    queries = torch.randn(3, 4, generator=gen(6))
    refs = sample_references(3, 30, 5, gen(7))
    cos = cosine_matrix(queries, bank)
    expected = torch.stack([cos[i, refs[i]].mean() for i in range(3)]) * 0.5
    got = similarity_weights(queries, bank, cfg(mode="sample", k=5, lam=0.5), gen(7))
    torch.testing.assert_close(got, expected)


def test_sample_with_k_at_least_bank_size_is_the_bank_mean():
    got = similarity_weights(QUERIES, BANK, cfg(mode="sample", k=5, lam=1.0), gen(0))
    close(got, [(1 + R2) / 3, (2 * R2 + 1) / 3])


def test_sample_with_k1_picks_one_cosine():
    got = similarity_weights(QUERIES[:1], BANK, cfg(mode="sample", k=1, lam=1.0), gen(0))
    assert any(math.isclose(float(got[0]), c, abs_tol=1e-6) for c in COS[0])


def test_sample_without_generator_raises():
    with pytest.raises(ValueError, match="generator"):
        similarity_weights(QUERIES, BANK, cfg(mode="sample"))
    with pytest.raises(ValueError, match="generator"):
        instance_mix(QUERIES, CB, cfg(mode="sample"))


def test_mix_for_weight_direction():
    assert mix_for_weight(0.3, "global") == Mix(0.3, pytest.approx(0.7))
    assert mix_for_weight(0.3, "local") == Mix(pytest.approx(0.7), 0.3)
    w = torch.tensor([0.0, 0.25, 1.0])
    g = mix_for_weight(w, "global")
    close(g.global_w, [0.0, 0.25, 1.0])
    close(g.local_w, [1.0, 0.75, 0.0])
    loc = mix_for_weight(w, "local")
    close(loc.global_w, [1.0, 0.75, 0.0])
    close(loc.local_w, [0.0, 0.25, 1.0])


def test_instance_mix_fixed():
    m = instance_mix(None, None, cfg(mode="fixed", fixed=0.3, weight_on="global"))
    assert (m.global_w, m.local_w) == (pytest.approx(0.3), pytest.approx(0.7))
    m = instance_mix(None, None, cfg(mode="fixed", fixed=0.3, weight_on="local"))
    assert (m.global_w, m.local_w) == (pytest.approx(0.7), pytest.approx(0.3))


@pytest.mark.parametrize("weight_on", ["global", "local"])
def test_instance_mix_single_adapter_modes_ignore_direction(weight_on):
    assert instance_mix(None, None, cfg(mode="global_only", weight_on=weight_on)) == Mix(1.0, 0.0)
    assert instance_mix(None, None, cfg(mode="local_only", weight_on=weight_on)) == Mix(0.0, 1.0)


def test_instance_mix_bank_per_row():
    m = instance_mix(QUERIES, CB, cfg(mode="bank", lam=0.5, weight_on="global"))
    close(m.global_w, [0.2845178, 0.4023689])
    close(m.local_w, [1 - 0.2845178, 1 - 0.4023689])
    m = instance_mix(QUERIES, CB, cfg(mode="bank", lam=0.5, weight_on="local"))
    close(m.local_w, [0.2845178, 0.4023689])
    close(m.global_w, [1 - 0.2845178, 1 - 0.4023689])


def test_instance_mix_sample_is_seeded():
    bank = torch.randn(20, 4, generator=gen(8))
    q = torch.randn(5, 4, generator=gen(9))
    c = cfg(mode="sample", k=3)
    a = instance_mix(q, ClientBank.build(bank, 5), c, gen(1))
    b = instance_mix(q, ClientBank.build(bank, 5), c, gen(1))
    assert torch.equal(a.global_w, b.global_w)
    assert a.global_w.shape == (5,)


@pytest.mark.parametrize("mode", ["bank", "sample", "gate"])
def test_bank_modes_without_bank_raise(mode):
    c = cfg(mode=mode)
    with pytest.raises(ValueError, match="bank"):
        instance_mix(QUERIES, None, c, gen())
    with pytest.raises(ValueError, match="bank"):
        instance_mix(QUERIES, ClientBank(torch.zeros(0, 2), torch.zeros(0), 5), c, gen())
    with pytest.raises(ValueError, match="bank"):
        instance_mix(None, CB, c, gen())


def test_needs_bank():
    assert all(needs_bank(cfg(mode=m)) for m in ("bank", "sample", "gate"))
    assert not any(needs_bank(cfg(mode=m)) for m in ("fixed", "global_only", "local_only"))


# --- the calibrated gate ----------------------------------------------------------------------------


def test_leave_one_out_scores_exclude_the_row_itself():
    # BANK self-cosines: [[1, 0, R2], [0, 1, R2], [R2, R2, 1]]; without the diagonal:
    close(leave_one_out_scores(BANK, 1), [R2, R2, R2])
    close(leave_one_out_scores(BANK, 2), [R2 / 2, R2 / 2, R2])
    close(leave_one_out_scores(BANK, 9), [R2 / 2, R2 / 2, R2])  # k capped at N − 1
    close(leave_one_out_scores(BANK[:1], 5), [1.0])  # a lone row: nothing to leave out


def test_knn_scores_mean_of_top_k():
    cos = torch.tensor(COS)
    close(knn_scores(cos, 2), [(1 + R2) / 2, (1 + R2) / 2])
    close(knn_scores(cos, 7), [(1 + R2) / 3, (2 * R2 + 1) / 3])


def test_client_bank_build_and_recalibrate():
    assert CB.topk == 5 and len(CB) == 3
    close(CB.loo, [R2 / 2, R2 / 2, R2])
    assert CB.calibrated(5) is CB
    close(CB.calibrated(1).loo, [R2, R2, R2])


def test_gate_calibration_threshold_and_width():
    loo = torch.arange(11, dtype=torch.float32) / 10  # 0.0 … 1.0
    tau, width = gate_calibration(loo, cfg(gate_quantile=0.1, gate_width=0.25))
    assert tau == pytest.approx(0.1) and width == pytest.approx(0.25 * (0.5 - 0.1))
    tau, width = gate_calibration(torch.full((4,), 0.3), cfg())  # no spread: a hard step
    assert tau == pytest.approx(0.3) and width == MIN_GATE_WIDTH


def test_gate_weights_hand_computed():
    loo = torch.arange(11, dtype=torch.float32) / 10
    bank = ClientBank(torch.eye(11), loo, 5)
    c = cfg(mode="gate", gate_quantile=0.1, gate_width=0.25)  # τ = 0.1, ω = 0.1
    got = gate_local_weights(torch.tensor([0.1, 0.5, -0.3]), bank, c)
    close(got, [0.5, 1 / (1 + math.exp(-4)), 1 / (1 + math.exp(4))])
    bounded = cfg(mode="gate", gate_quantile=0.1, gate_width=0.25, gate_floor=0.2, gate_ceiling=0.8)
    close(gate_local_weights(torch.tensor([0.1, 50.0, -50.0]), bank, bounded), [0.5, 0.8, 0.2])


def test_gate_is_monotone_and_bounded_per_client():
    bank = ClientBank.build(torch.randn(50, 8, generator=gen(1)), 5)
    scores = torch.linspace(-1, 1, 101)
    w = gate_local_weights(scores, bank, cfg(mode="gate", gate_floor=0.1, gate_ceiling=0.9))
    assert bool((w[1:] >= w[:-1]).all())
    eps = 1e-6  # float32 rounding of floor + (ceiling − floor) · σ, a few ulps of 1
    assert float(w.min()) >= 0.1 - eps and float(w.max()) <= 0.9 + eps


def test_gate_leans_local_on_own_inputs_global_on_others():
    """Two clusters: the bank is cluster A. Inputs from A get a local weight near 1, inputs from B
    near 0, whatever the absolute level of the cosines."""
    g = gen(3)
    a_center, b_center = torch.randn(16, generator=g), torch.randn(16, generator=g)
    bank_rows = a_center + 0.3 * torch.randn(40, 16, generator=g)
    own = a_center + 0.3 * torch.randn(10, 16, generator=g)
    other = b_center + 0.3 * torch.randn(10, 16, generator=g)
    sharp = cfg(mode="gate", gate_width=0.25)
    mix = instance_mix(torch.cat([own, other]), ClientBank.build(bank_rows, 5), sharp)
    # τ is the 5th percentile of the bank's own scores, so about 1 in 20 own inputs falls below it
    assert float((mix.local_w[:10] > 0.5).float().mean()) >= 0.8
    assert float(mix.local_w[:10].median()) > 0.9 and float(mix.local_w[10:].max()) < 0.1
    close(mix.global_w + mix.local_w, [1.0] * 20)
    soft = instance_mix(torch.cat([own, other]), ClientBank.build(bank_rows, 5), cfg(mode="gate"))
    assert float(soft.local_w[:10].median()) > 0.5 > float(soft.local_w[10:].max())


# --- mix_rows: one batch, many clients ---------------------------------------------------------------


def test_mix_rows_per_row_clients_and_modes():
    other_bank = ClientBank.build(torch.tensor([[0.0, 1.0], [0.1, 1.0]]), 5)
    rows = [
        RowWeighting(cfg(mode="bank", lam=0.5), CB, True),
        RowWeighting(cfg(mode="fixed", fixed=0.3), CB, True),
        RowWeighting(cfg(mode="gate"), other_bank, False),  # no local adapter: global alone
        RowWeighting(cfg(mode="gate"), other_bank, True),
    ]
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # rows 0 and 3 need one
    mix = mix_rows(rows, q)
    want_gate = instance_mix(q[1:], other_bank, cfg(mode="gate"))
    close(mix.global_w, [0.2845178, 0.3, 1.0, float(want_gate.global_w[0])])
    close(mix.local_w, [1 - 0.2845178, 0.7, 0.0, float(want_gate.local_w[0])])


@pytest.mark.parametrize("mode", ["gate", "bank", "sample", "fixed", "local_only"])
def test_mix_rows_without_local_adapter_is_global_only(mode):
    mix = mix_rows([RowWeighting(cfg(mode=mode), None, False)], None)
    close(mix.global_w, [1.0])
    close(mix.local_w, [0.0])


def test_mix_rows_sample_seed_is_the_rows():
    bank = ClientBank.build(torch.randn(20, 4, generator=gen(8)), 5)
    q = torch.randn(1, 4, generator=gen(9))
    c = cfg(mode="sample", k=3)
    got = mix_rows([RowWeighting(c, bank, True, seed=42)], q)
    want = instance_mix(q, bank, c, gen(42))
    assert torch.equal(got.global_w, want.global_w)


def test_mix_rows_checks_the_query_count():
    rows = [RowWeighting(cfg(mode="gate"), CB, True)] * 2
    with pytest.raises(ValueError, match="2 rows need a query"):
        mix_rows(rows, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="2 rows need a query"):
        mix_rows(rows, None)


# --- the bank on disk: representations and calibration in one file ---------------------------------


def test_bank_file_round_trip_keeps_the_calibration(tmp_path):
    from feddpa.core.storage import load_bank, save_bank

    bank = ClientBank.build(torch.randn(7, 4, generator=gen(2)), 3)
    save_bank(bank, tmp_path / "bank.safetensors")
    got = load_bank(tmp_path / "bank.safetensors")
    assert torch.equal(got.vectors, bank.vectors) and torch.equal(got.loo, bank.loo)
    assert got.topk == 3 and got.representation == "local"
    save_bank(ClientBank.build(bank.vectors, 3, "embedding"), tmp_path / "emb.safetensors")
    assert load_bank(tmp_path / "emb.safetensors").representation == "embedding"


def test_bank_file_without_calibration_is_calibrated_on_load(tmp_path):
    from safetensors.torch import save_file

    from feddpa.core.storage import DEFAULT_GATE_TOPK, load_bank

    vectors = torch.randn(6, 4, generator=gen(3))
    save_file({"bank": vectors}, str(tmp_path / "bank.safetensors"))  # an older run's bank
    got = load_bank(tmp_path / "bank.safetensors")
    assert got.topk == DEFAULT_GATE_TOPK
    assert torch.equal(got.loo, leave_one_out_scores(vectors, DEFAULT_GATE_TOPK))


def test_corrupt_bank_file_error_names_the_file(tmp_path):
    from feddpa.core.storage import load_bank

    path = tmp_path / "client_00004" / "bank.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError, match="client_00004/bank.safetensors: unreadable"):
        load_bank(path)


def test_gate_snaps_saturated_weights_to_one_adapter_exactly():
    loo = torch.arange(11, dtype=torch.float32) / 10
    bank = ClientBank(torch.eye(11), loo, 5)
    c = cfg(mode="gate", gate_quantile=0.1, gate_width=0.25)  # τ = 0.1, ω = 0.1
    got = gate_local_weights(torch.tensor([-5.0, 5.0, 0.1]), bank, c)
    assert got.tolist() == [0.0, 1.0, 0.5]
    bounded = cfg(mode="gate", gate_quantile=0.1, gate_floor=0.2, gate_ceiling=0.9)
    close(gate_local_weights(torch.tensor([-5.0, 5.0]), bank, bounded), [0.2, 0.9])
    unsnapped = cfg(mode="gate", gate_quantile=0.1, gate_width=0.25, gate_snap=0.0)
    assert 0 < float(gate_local_weights(torch.tensor([-0.7]), bank, unsnapped)[0]) < 1e-3


def test_bank_of_another_representation_is_refused():
    emb = ClientBank.build(BANK, 5, "embedding")
    with pytest.raises(ValueError, match="weighting.representation=embedding"):
        instance_mix(QUERIES, emb, cfg(mode="gate"))
    got = instance_mix(QUERIES, emb, cfg(mode="gate", representation="embedding"))
    assert got.local_w.shape == (2,)
