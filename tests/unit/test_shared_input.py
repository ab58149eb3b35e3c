"""The shared-input federation: one input generator for every task, tasks differ in the question."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path

import pytest

from feddpa.datasets.shared_input import (
    ATTRIBUTES,
    CONFLICT_PAIRS,
    QUESTIONS,
    REPORTS,
    SHARED_INPUT_TASKS,
    generate_shared_input,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data():
    return generate_shared_input(seed=0, train_per_task=300, test_per_task=50)


def _by_task(examples):
    out = {}
    for e in examples:
        out.setdefault(e.task, []).append(e)
    return out


def _report_patterns() -> list[re.Pattern[str]]:
    """One regex per shared template: each field matches any keyword of its attribute."""
    patterns = []
    for template in REPORTS:
        parts = []
        for literal, field, _, _ in string.Formatter().parse(template):
            parts.append(re.escape(literal))
            if field:
                words = sorted((w for ws in ATTRIBUTES[field].values() for w in ws), key=len)
                parts.append(f"(?P<{field}>{'|'.join(map(re.escape, reversed(words)))})")
        patterns.append(re.compile("".join(parts)))
    return patterns


def _parse(example, patterns):
    """(template index, question placement, {attribute: concept}) of a stem, or None if its
    input is not a report of the shared generator followed or preceded by the task's question."""
    question = QUESTIONS[example.task][1]
    stem = example.stem
    if stem.startswith(question + " "):
        report, placement = stem[len(question) + 1 :], "before"
    elif stem.endswith(" " + question):
        report, placement = stem[: -len(question) - 1], "after"
    else:
        return None
    report = re.sub(r"\b([Aa])n (?=[aeiouAEIOU])", r"\1 ", report)  # undo "a owl" -> "an owl"
    for index, pattern in enumerate(patterns):
        if match := pattern.fullmatch(report):
            concepts = {
                attr: next(c for c, ws in ATTRIBUTES[attr].items() if word in ws)
                for attr, word in match.groupdict().items()
            }
            return index, placement, concepts
    return None


def test_eight_tasks_in_client_order_and_sizes(data):
    train, test = data
    assert len(SHARED_INPUT_TASKS) == len(set(SHARED_INPUT_TASKS)) == 8
    assert tuple(train) == SHARED_INPUT_TASKS
    assert all(len(train[t]) == 300 for t in SHARED_INPUT_TASKS)
    assert {t: len(v) for t, v in _by_task(test).items()} == dict.fromkeys(SHARED_INPUT_TASKS, 50)
    for e in [*test, *(e for v in train.values() for e in v)]:
        assert len(e.options) >= 2 and e.output in e.options and e.category


def test_labels_are_balanced(data):
    train, test = data
    for split in (train, _by_task(test)):
        for task, examples in split.items():
            counts = Counter(e.output for e in examples)
            assert len(counts) == len(examples[0].options), task
            assert max(counts.values()) - min(counts.values()) <= 1, (task, counts)


def test_deterministic_in_seed():
    a = generate_shared_input(seed=3, train_per_task=40, test_per_task=10)
    assert a == generate_shared_input(seed=3, train_per_task=40, test_per_task=10)
    assert a != generate_shared_input(seed=4, train_per_task=40, test_per_task=10)


def test_no_duplicates_and_no_train_test_overlap(data):
    train, test = data
    test_by_task = _by_task(test)
    for task in SHARED_INPUT_TASKS:
        train_stems = [e.stem for e in train[task]]
        test_stems = [e.stem for e in test_by_task[task]]
        assert len(set(train_stems)) == len(train_stems)
        assert len(set(test_stems)) == len(test_stems)
        assert not set(train_stems) & set(test_stems)


def test_every_task_reads_reports_of_the_one_shared_generator(data):
    """Strip each task's question: what is left is a report of the shared templates naming every
    attribute, with the same template use and the same attribute distribution in every task; the
    label is the asked attribute's concept (through the task's convention)."""
    train, _ = data
    patterns = _report_patterns()
    tribune = {
        "sports": "business",
        "business": "science",
        "science": "politics",
        "politics": "sports",
    }
    for task in SHARED_INPUT_TASKS:
        asked = QUESTIONS[task][0]
        parsed = [_parse(e, patterns) for e in train[task]]
        assert None not in parsed, task
        assert {(i, p) for i, p, _ in parsed} == {
            (i, p) for i in range(len(REPORTS)) for p in ("before", "after")
        }, task
        for attr, vocab in ATTRIBUTES.items():
            counts = Counter(concepts[attr] for _, _, concepts in parsed)
            for concept in vocab:  # uniform: 300 draws, a 5-sigma band
                assert abs(counts[concept] / len(parsed) - 1 / len(vocab)) < 0.12, (task, attr)
        for e, (_, _, concepts) in zip(train[task], parsed, strict=True):
            label = concepts[asked]
            assert e.output == (tribune[label] if task == "section_tribune" else label)


def test_tasks_differ_only_in_the_question():
    assert len({q for _, q in QUESTIONS.values()}) == len(SHARED_INPUT_TASKS) - 1
    assert {a for a, _ in QUESTIONS.values()} == set(ATTRIBUTES)
    for template in REPORTS:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        assert sorted(fields) == sorted(ATTRIBUTES), template


@pytest.mark.parametrize("pair", CONFLICT_PAIRS)
def test_conflict_pair_same_instructions_opposite_labels(data, pair):
    train, test = data
    first, second = pair
    assert QUESTIONS[first] == QUESTIONS[second]
    for split in (train, _by_task(test)):
        a = {e.instruction: e.output for e in split[first]}
        b = {e.instruction: e.output for e in split[second]}
        assert a.keys() == b.keys()  # same reports, same question, same option order
        assert len({e.options for e in split[first]}) == 1
        assert all(a[i] != b[i] for i in a)


def test_single_attribute_tasks_shuffle_options(data):
    train, _ = data
    conflict = {t for pair in CONFLICT_PAIRS for t in pair}
    for task in set(SHARED_INPUT_TASKS) - conflict:
        assert len({e.options for e in train[task]}) > 1, task


def test_bad_sizes_raise_and_global_rng_is_untouched():
    with pytest.raises(ValueError, match="train_per_task"):
        generate_shared_input(train_per_task=0)
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_shared_input(train_per_task=8, test_per_task=2)
    assert random.random() == expected


def test_config_loads_and_prepare_writes_eight_clients(tmp_path: Path):
    from feddpa.core.config import DataConfig, load_config
    from feddpa.datasets.prepare import prepare_shards

    cfg = load_config(ROOT / "configs" / "shared_input.yaml")
    assert cfg.data.source == "shared_input"
    small = DataConfig(source="shared_input", train_per_task=12, test_per_task=2, seed=1)
    manifest = prepare_shards(small, tmp_path / "shards", model_kind="multiple_choice")
    assert [c.num_examples for c in manifest.clients] == [12] * 8
    assert [tuple(c.tasks) for c in manifest.clients] == [(t,) for t in SHARED_INPUT_TASKS]
    assert manifest.test.tasks == dict.fromkeys(SHARED_INPUT_TASKS, 2)
