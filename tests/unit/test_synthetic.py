"""The built-in synthetic federated dataset: determinism, sizes, format, conflicts, no leakage."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from feddpa.datasets.synthetic import CONFLICT_PAIRS, SYNTHETIC_TASKS, generate_synthetic


@pytest.fixture(scope="module")
def data():
    return generate_synthetic(seed=0, train_per_task=300, test_per_task=50)


def _by_task(examples):
    out = {}
    for e in examples:
        out.setdefault(e.task, []).append(e)
    return out


def test_eight_distinct_tasks_in_client_order(data):
    train, test = data
    assert len(SYNTHETIC_TASKS) == len(set(SYNTHETIC_TASKS)) == 8
    assert tuple(train) == SYNTHETIC_TASKS
    assert set(_by_task(test)) == set(SYNTHETIC_TASKS)


def test_sizes_and_fields(data):
    train, test = data
    assert all(len(train[t]) == 300 for t in SYNTHETIC_TASKS)
    assert len(test) == 8 * 50
    assert all(len(v) == 50 for v in _by_task(test).values())
    for task, examples in train.items():
        assert all(e.task == task and e.category for e in examples)


def test_every_output_is_one_of_its_options(data):
    train, test = data
    for e in [*test, *(e for v in train.values() for e in v)]:
        assert len(e.options) >= 2
        assert e.output in e.options
        assert "OPTIONS:" not in e.stem


def test_labels_are_balanced(data):
    train, _ = data
    for task, examples in train.items():
        counts = Counter(e.output for e in examples)
        assert max(counts.values()) - min(counts.values()) <= 1, (task, counts)


def test_deterministic_in_seed():
    a = generate_synthetic(seed=3, train_per_task=40, test_per_task=10)
    b = generate_synthetic(seed=3, train_per_task=40, test_per_task=10)
    c = generate_synthetic(seed=4, train_per_task=40, test_per_task=10)
    assert a == b
    assert a != c


def test_no_duplicates_and_no_train_test_overlap(data):
    train, test = data
    test_by_task = _by_task(test)
    for task in SYNTHETIC_TASKS:
        train_stems = [e.stem for e in train[task]]
        test_stems = [e.stem for e in test_by_task[task]]
        assert len(set(train_stems)) == len(train_stems)
        assert len(set(test_stems)) == len(test_stems)
        assert not set(train_stems) & set(test_stems)
        assert not {e.instruction for e in train[task]} & {
            e.instruction for e in test_by_task[task]
        }


@pytest.mark.parametrize("pair", CONFLICT_PAIRS)
def test_conflict_pairs_share_inputs_but_not_labels(data, pair):
    train, test = data
    first, second = pair
    for split in (train, _by_task(test)):
        a = {e.instruction: e.output for e in split[first]}
        b = {e.instruction: e.output for e in split[second]}
        # Same wording, same fixed option order: identical instruction strings.
        assert a.keys() == b.keys()
        assert {e.options for e in split[first]} == {e.options for e in split[second]}
        assert len({e.options for e in split[first]}) == 1
        # For the same input text, the two organisations always disagree.
        assert all(a[i] != b[i] for i in a)


def test_routing_mapping(data):
    train, _ = data
    globex = {e.instruction: e.output for e in train["routing_globex"]}
    expected = {"refund": ("billing team", "customer care"), "crash": ("tech support", "logistics")}
    for keyword, labels in expected.items():
        tickets = [e for e in train["routing_acme"] if keyword in e.stem]
        assert tickets
        assert all((e.output, globex[e.instruction]) == labels for e in tickets)


def test_shared_tasks_shuffle_options(data):
    train, _ = data
    conflict = {t for pair in CONFLICT_PAIRS for t in pair}
    for task in SYNTHETIC_TASKS:
        if task not in conflict:
            assert len({e.options for e in train[task]}) > 1, task


def test_bad_sizes_raise_a_clear_error():
    with pytest.raises(ValueError, match="train_per_task"):
        generate_synthetic(train_per_task=0)
    with pytest.raises(ValueError, match="test_per_task"):
        generate_synthetic(test_per_task=-1)


def test_does_not_touch_the_global_rng():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_synthetic(train_per_task=10, test_per_task=2)
    assert random.random() == expected
