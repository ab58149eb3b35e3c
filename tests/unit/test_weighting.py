"""Instance-wise weighting w(x) = λ · mean_k cos(e(x), e(x_k)) against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from feddpa.core.adapters import Mix
from feddpa.core.config import WeightingConfig
from feddpa.core.weighting import (
    cosine_matrix,
    instance_mix,
    mix_for_weight,
    needs_bank,
    sample_references,
    similarity_weights,
)

R2 = 1 / math.sqrt(2)  # cos((1,0),(1,1))

# bank rows (1,0), (0,1), (1,1); queries (1,0) and (1,1)
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
QUERIES = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
COS = [[1.0, 0.0, R2], [R2, R2, 1.0]]


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
        instance_mix(QUERIES, BANK, cfg(mode="sample"))


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
    m = instance_mix(QUERIES, BANK, cfg(mode="bank", lam=0.5, weight_on="global"))
    close(m.global_w, [0.2845178, 0.4023689])
    close(m.local_w, [1 - 0.2845178, 1 - 0.4023689])
    m = instance_mix(QUERIES, BANK, cfg(mode="bank", lam=0.5, weight_on="local"))
    close(m.local_w, [0.2845178, 0.4023689])
    close(m.global_w, [1 - 0.2845178, 1 - 0.4023689])


def test_instance_mix_sample_is_seeded():
    bank = torch.randn(20, 4, generator=gen(8))
    q = torch.randn(5, 4, generator=gen(9))
    c = cfg(mode="sample", k=3)
    a = instance_mix(q, bank, c, gen(1))
    b = instance_mix(q, bank, c, gen(1))
    assert torch.equal(a.global_w, b.global_w)
    assert a.global_w.shape == (5,)


@pytest.mark.parametrize("mode", ["bank", "sample"])
def test_bank_modes_without_bank_raise(mode):
    c = cfg(mode=mode)
    with pytest.raises(ValueError, match="bank"):
        instance_mix(QUERIES, None, c, gen())
    with pytest.raises(ValueError, match="bank"):
        instance_mix(QUERIES, torch.zeros(0, 2), c, gen())
    with pytest.raises(ValueError, match="bank"):
        instance_mix(None, BANK, c, gen())


def test_needs_bank():
    assert needs_bank(cfg(mode="bank")) and needs_bank(cfg(mode="sample"))
    assert not any(needs_bank(cfg(mode=m)) for m in ("fixed", "global_only", "local_only"))
