"""FedAvg as a running weighted sum: hand-computed means, order independence, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from feddpa.core.fedavg import FlatState, RunningAverage, fedavg, state_nbytes


def test_weighted_mean_by_hand():
    # (1·[1, 2] + 3·[3, 6]) / 4 = [10, 20] / 4 = [2.5, 5.0]
    got = fedavg([({"a": torch.tensor([1.0, 2.0])}, 1), ({"a": torch.tensor([3.0, 6.0])}, 3)])
    assert torch.equal(got["a"], torch.tensor([2.5, 5.0]))


def test_weighted_mean_several_keys_by_hand():
    updates = [
        ({"a": torch.tensor([[0.0, 4.0]]), "b": torch.tensor(1.0)}, 2),
        ({"a": torch.tensor([[6.0, -4.0]]), "b": torch.tensor(-2.0)}, 1),
        ({"a": torch.tensor([[3.0, 1.0]]), "b": torch.tensor(4.0)}, 1),
    ]
    # a: (2·[0,4] + [6,-4] + [3,1]) / 4 = [9, 5] / 4 ; b: (2 − 2 + 4) / 4 = 1
    got = fedavg(updates)
    assert torch.equal(got["a"], torch.tensor([[2.25, 1.25]]))
    assert torch.equal(got["b"], torch.tensor(1.0))
    assert got.keys() == {"a", "b"}


def test_single_update_is_returned_unchanged():
    state = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0))}
    assert torch.equal(fedavg([(state, 7.0)])["w"], state["w"])


def test_equal_weights_give_the_plain_mean():
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 3.0]), torch.tensor([6.0, 3.0])]
    assert torch.equal(fedavg([({"x": x}, 5) for x in xs])["x"], torch.tensor([3.0, 2.0]))


def test_result_does_not_alias_inputs():
    a = {"w": torch.tensor([1.0, 1.0])}
    got = fedavg([(a, 1)])
    got["w"].add_(1)
    assert torch.equal(a["w"], torch.tensor([1.0, 1.0]))


def _updates(n: int = 20) -> list[tuple[dict[str, torch.Tensor], float]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        state = {
            "lora_A": torch.randn(8, 64, generator=gen) * 10 ** (i % 4 - 2),
            "lora_B": torch.randn(64, 8, generator=gen),
        }
        out.append((state, float(torch.randint(1, 500, (1,), generator=gen))))
    return out


def test_fold_order_does_not_change_the_result_bitwise():
    updates = _updates()
    reference = fedavg(updates)
    for seed in range(5):
        order = torch.randperm(len(updates), generator=torch.Generator().manual_seed(seed))
        got = fedavg([updates[i] for i in order.tolist()])
        for key, value in reference.items():
            assert got[key].dtype == torch.float32
            assert torch.equal(got[key], value), (seed, key)


def test_running_average_matches_float64_reference():
    updates = _updates()
    avg = RunningAverage()
    for state, w in updates:
        avg.add(state, w)
    assert avg.count == 20
    assert avg.total_weight == sum(w for _, w in updates)
    total = sum(w for _, w in updates)
    for key, value in avg.result().items():
        expected = sum(s[key].double() * w for s, w in updates) / total
        torch.testing.assert_close(value, expected.float(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_preserved(dtype):
    got = fedavg(
        [
            ({"a": torch.tensor([1.0, 2.0], dtype=dtype)}, 1),
            ({"a": torch.tensor([3.0, 6.0], dtype=dtype)}, 3),
        ]
    )
    assert got["a"].dtype == dtype
    assert torch.equal(got["a"], torch.tensor([2.5, 5.0], dtype=dtype))


def test_mismatched_keys_raise():
    avg = RunningAverage()
    avg.add({"a": torch.zeros(2), "b": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="'c'"):
        avg.add({"a": torch.zeros(2), "c": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="'b'"):
        avg.add({"a": torch.zeros(2)}, 1)
    # a rejected update leaves the running sum untouched
    avg.add({"a": torch.ones(2), "b": torch.ones(2)}, 1)
    assert torch.equal(avg.result()["a"], torch.full((2,), 0.5))


def test_mismatched_shapes_raise_instead_of_broadcasting():
    avg = RunningAverage()
    avg.add({"a": torch.zeros(8, 4), "b": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="'a'"):
        avg.add({"a": torch.ones(1, 4), "b": torch.ones(2)}, 1)
    assert avg.count == 1
    assert torch.equal(avg.result()["b"], torch.zeros(2))


@pytest.mark.parametrize("weight", [0, 0.0, -1, -0.5, math.nan, math.inf])
def test_non_positive_or_non_finite_weight_raises(weight):
    with pytest.raises(ValueError, match="weight"):
        fedavg([({"a": torch.ones(2)}, weight)])


def test_empty_raises():
    with pytest.raises(ValueError, match="zero updates"):
        fedavg([])
    with pytest.raises(ValueError, match="zero updates"):
        RunningAverage().result()


def test_flat_state_round_trips_and_folds_like_the_dict():
    updates = _updates()
    flat = FlatState.of(updates[0][0])
    assert flat.layout.keys == tuple(sorted(updates[0][0]))
    back = flat.state()
    assert back.keys() == updates[0][0].keys()
    for key, value in back.items():
        assert torch.equal(value, updates[0][0][key])
        assert value.untyped_storage().data_ptr() != flat.data.untyped_storage().data_ptr()
    by_dict, by_flat = RunningAverage(), RunningAverage()
    for state, w in updates:
        by_dict.add(state, w)
        by_flat.add(FlatState.of(state), w)
    for key, value in by_dict.result().items():
        assert torch.equal(value, by_flat.result()[key])
    assert state_nbytes(flat) == state_nbytes(updates[0][0])


def test_flat_state_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="mixes dtypes"):
        FlatState.of({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float16)})


def test_flat_update_with_other_layout_raises():
    avg = RunningAverage()
    avg.add({"a": torch.zeros(2, 3), "b": torch.zeros(6)}, 1)
    with pytest.raises(ValueError, match="'a' has shape"):  # same element count, other shape
        avg.add(FlatState.of({"a": torch.zeros(3, 2), "b": torch.zeros(6)}), 1)
    assert avg.count == 1
