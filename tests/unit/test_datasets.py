"""feddpa.datasets: loading and validation, partitioning, Parquet shards."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feddpa.core.records import Example, format_options
from feddpa.datasets import (
    DataError,
    load_feddpa_release,
    load_files,
    load_records,
    partition_by_task,
    partition_dirichlet,
    partition_iid,
    read_manifest,
    read_shard,
    read_test,
    split_holdout,
    subsample,
    write_shards,
)

DATASET1 = Path(__file__).resolve().parents[3] / "shared/data/feddpa/dataset1"
needs_dataset1 = pytest.mark.skipif(
    not (DATASET1 / "local_training_0.json").is_file(),
    reason=f"FedDPA dataset 1 not found at {DATASET1} (it lives outside the repo in ../shared)",
)


def record(i: int = 0, task: str = "t", answer: str = "yes") -> dict[str, str]:
    return {
        "instruction": format_options(f"Question {i}?", ["yes", "no"]),
        "output": answer,
        "task": task,
        "category": "c",
    }


def pool(tasks: int, per_task: int) -> list[Example]:
    return [
        Example(instruction=f"q{t}-{i}", output="a", task=f"task{t}")
        for t in range(tasks)
        for i in range(per_task)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_release(root: Path, clients: list[list[dict]], test: list[dict]) -> Path:
    root.mkdir()
    for m, rows in enumerate(clients):
        (root / f"local_training_{m}.json").write_text(json.dumps(rows), encoding="utf-8")
    write_jsonl(root / "test.jsonl", test)
    return root


# ---------------------------------------------------------------- loaders: the real dataset 1


@needs_dataset1
def test_dataset1_release_loads_eight_single_task_clients() -> None:
    data = load_feddpa_release(DATASET1)
    assert [len(c) for c in data.clients] == [300] * 8
    assert len(data.test) == 1600
    client_tasks = [{ex.task for ex in client} for client in data.clients]
    assert all(len(tasks) == 1 for tasks in client_tasks)
    assert len(set().union(*client_tasks)) == 8
    assert Counter(ex.task for ex in data.test) == {task: 200 for task in data.tasks}
    for ex in [*data.pooled_train(), *data.test]:
        assert not ex.options or ex.output.strip() in ex.options
    assert sum(1 for client in data.clients if client[0].options) == 6


# ---------------------------------------------------------------- loaders: malformed input


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    rows = [record(0), {"instruction": "no answer here", "task": "t"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl line 2: field 'output' is missing"):
        load_records(path)


def test_answer_not_among_options_names_line_and_options(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "test.jsonl", [record(0), record(1), record(2, answer="maybe")])
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert "test.jsonl line 3: field 'output' is 'maybe'" in message
    assert "['yes', 'no']" in message and "fix the answer or the OPTIONS block" in message


def test_bad_json_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record(0)) + "\n\n" + '{"instruction": "x", \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: is not valid JSON"):
        load_records(path)


def test_json_array_errors_name_the_item(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([record(0), {**record(1), "instruction": "  "}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"arr\.json item 1: field 'instruction' is empty"):
        load_records(path)
    path.write_text(json.dumps([record(0), {**record(1), "output": 3}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"item 1: field 'output' is a int, not a string"):
        load_records(path)


def test_empty_files_and_unknown_suffix(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: contains no records"):
        load_records(empty)
    odd = tmp_path / "data.txt"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported format '\.txt'.*\.jsonl, \.csv, \.parquet"):
        load_records(odd)


def test_release_empty_client_and_gap_are_named(tmp_path: Path) -> None:
    root = write_release(tmp_path / "r1", [[record(0)], []], [record(9)])
    with pytest.raises(DataError, match=r"local_training_1\.json: \(client 1\) contains no"):
        load_feddpa_release(root)
    root = write_release(tmp_path / "r2", [[record(0)], [record(1)]], [record(9)])
    (root / "local_training_1.json").rename(root / "local_training_2.json")
    with pytest.raises(DataError, match=r"local_training_1\.json: is missing"):
        load_feddpa_release(root)


def test_release_test_file_fallback(tmp_path: Path) -> None:
    root = write_release(tmp_path / "r", [[record(0, task="a")]], [record(1, task="b")])
    (root / "test.jsonl").rename(root / "flan_test.jsonl")
    data = load_feddpa_release(root)
    assert data.tasks == ("a", "b") and len(data.test) == 1
    write_jsonl(root / "other.jsonl", [record(2)])
    with pytest.raises(DataError, match="no test.jsonl and 2 other"):
        load_feddpa_release(root)


# ---------------------------------------------------------------- loaders: generic formats


def test_generic_csv_parquet_jsonl_pool_into_one_client(tmp_path: Path) -> None:
    csv_path = tmp_path / "a.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows([{"instruction": format_options("Q?", ["yes", "no"]), "output": "no"}])
        writer.writerow({"instruction": "Say hi", "output": "hi"})
    pq_path = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([record(1, task="pq")]), pq_path)
    test_path = write_jsonl(tmp_path / "held.jsonl", [record(2, task="t")])

    data = load_files([csv_path, pq_path], test_path)
    assert data.num_clients == 1 and len(data.clients[0]) == 3
    assert [ex.task for ex in data.clients[0]] == ["a", "a", "pq"]  # task defaults to file stem
    assert data.clients[0][0].category == "" and data.clients[0][0].output == "no"
    assert load_records(csv_path, default_task="x")[1] == Example("Say hi", "hi", "x")


def test_csv_error_names_the_starting_line_of_a_multiline_record(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "output"])
        writer.writerow([format_options("Q?", ["yes", "no"]), "yes"])  # lines 2-5
        writer.writerow(["fine", ""])
    with pytest.raises(DataError, match=r"m\.csv line 6: field 'output' is empty"):
        load_records(path)


# ---------------------------------------------------------------- partitioners


def test_partition_by_task_one_client_per_sorted_task() -> None:
    examples = list(reversed(pool(3, 4)))
    clients = partition_by_task(examples)
    assert [{ex.task for ex in c} for c in clients] == [{"task0"}, {"task1"}, {"task2"}]
    assert [len(c) for c in clients] == [4, 4, 4]


def test_partition_iid_near_equal_and_deterministic() -> None:
    examples = pool(2, 11)
    clients = partition_iid(examples, 5, seed=3)
    assert sorted(len(c) for c in clients) == [4, 4, 4, 5, 5]
    assert clients == partition_iid(examples, 5, seed=3)
    assert clients != partition_iid(examples, 5, seed=4)
    assert sorted(ex.instruction for c in clients for ex in c) == sorted(
        ex.instruction for ex in examples
    )
    with pytest.raises(DataError, match="lower num_clients"):
        partition_iid(examples, 23, seed=0)


def test_partition_dirichlet_500_clients_complete_deterministic() -> None:
    examples = pool(8, 300)
    clients = partition_dirichlet(examples, 500, alpha=1.0, seed=0)
    assert len(clients) == 500 and min(len(c) for c in clients) >= 1
    assert sum(len(c) for c in clients) == len(examples)
    assert len({ex.instruction for c in clients for ex in c}) == len(examples)
    assert clients == partition_dirichlet(examples, 500, alpha=1.0, seed=0)


def test_partition_dirichlet_skews_tasks_at_small_alpha() -> None:
    examples = pool(8, 300)
    skewed = partition_dirichlet(examples, 8, alpha=0.1, seed=1, min_examples=10)
    even = partition_dirichlet(examples, 8, alpha=1000.0, seed=1)
    assert min(len(c) for c in skewed) >= 10

    def top_task_share(clients: list[list[Example]]) -> float:
        return sum(Counter(ex.task for ex in c).most_common(1)[0][1] / len(c) for c in clients) / 8

    assert top_task_share(skewed) > 0.5 > 0.2 > top_task_share(even)


def test_partition_dirichlet_impossible_request_explains() -> None:
    with pytest.raises(DataError, match="lower num_clients or min_examples, or raise alpha"):
        partition_dirichlet(pool(2, 10), 10, alpha=0.01, seed=0, min_examples=2, max_tries=5)
    with pytest.raises(DataError, match="needs 30 examples but there are 20"):
        partition_dirichlet(pool(2, 10), 10, alpha=1.0, seed=0, min_examples=3)


def test_split_holdout_stratified_and_deterministic() -> None:
    examples = pool(3, 10)
    train, holdout = split_holdout(examples, 0.2, seed=5)
    assert Counter(ex.task for ex in holdout) == {"task0": 2, "task1": 2, "task2": 2}
    assert len(train) == 24 and not set(train) & set(holdout)
    assert (train, holdout) == split_holdout(examples, 0.2, seed=5)
    assert split_holdout(examples, 0.0, seed=5) == (examples, [])


def test_subsample_keeps_order_is_seeded_and_caps_only_when_needed() -> None:
    examples = pool(3, 10)
    kept = subsample(examples, 7, seed=1)
    assert len(kept) == 7 and len(set(kept)) == 7
    assert kept == sorted(kept, key=examples.index)  # input order preserved
    assert kept == subsample(examples, 7, seed=1)
    assert kept != subsample(examples, 7, seed=2)
    assert subsample(examples, 30, seed=1) == examples
    assert subsample(examples, None, seed=1) == examples


def test_prepare_caps_each_client_before_the_holdout(tmp_path: Path) -> None:
    from feddpa.core.config import DataConfig
    from feddpa.datasets.prepare import prepare_shards

    cfg = DataConfig(train_per_task=12, test_per_task=2, max_train_per_client=10)
    manifest = prepare_shards(cfg, tmp_path / "a", model_kind="multiple_choice")
    assert [c.num_examples for c in manifest.clients] == [10] * 8
    held = cfg.model_copy(update={"holdout_fraction": 0.2})
    manifest = prepare_shards(held, tmp_path / "b", model_kind="multiple_choice")
    assert [c.num_examples for c in manifest.clients] == [8] * 8


# ---------------------------------------------------------------- shards


def small_split() -> tuple[list[list[Example]], list[Example]]:
    examples = pool(3, 6)
    return partition_by_task(examples[:15]), examples[15:]


def test_shards_round_trip_local_and_uri(tmp_path: Path) -> None:
    clients, test = small_split()
    out = tmp_path / "shards"
    manifest = write_shards(clients, test, out)
    assert read_manifest(out) == manifest
    assert (out / "clients/client_00002.parquet").is_file()
    body = json.loads((out / "manifest.json").read_text())
    assert body["schema_version"] == 1 and body["created_by"] == "feddpa"
    assert body["clients"][1]["tasks"] == {"task1": 6} and body["test"]["num_examples"] == 3
    uri = out.as_uri()
    for info, examples in zip(read_manifest(uri).clients, clients, strict=True):
        assert read_shard(uri, info) == examples
    assert read_test(out) == test
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_checksum_mismatch_is_detected(tmp_path: Path) -> None:
    clients, test = small_split()
    manifest = write_shards(clients, test, tmp_path / "s")
    pq.write_table(pa.Table.from_pylist([Example("x", "y", "task0").to_dict()]), tmp_path / "s/x")
    (tmp_path / "s/x").replace(tmp_path / "s/clients/client_00000.parquet")
    with pytest.raises(DataError, match=r"client_00000\.parquet: has sha256 .* manifest records"):
        read_shard(tmp_path / "s", manifest.clients[0])
    assert read_shard(tmp_path / "s", manifest.clients[1]) == clients[1]


def test_rewrite_is_idempotent_but_never_overwrites_other_data(tmp_path: Path) -> None:
    clients, test = small_split()
    out = tmp_path / "s"
    first = write_shards(clients, test, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert write_shards(clients, test, out) == first
    with pytest.raises(DataError, match="already holds different shards.*choose a new"):
        write_shards([clients[0], clients[1]], test, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="no manifest.json"):
        write_shards(clients, test, tmp_path / "other")


def test_empty_client_writes_nothing(tmp_path: Path) -> None:
    clients, test = small_split()
    out = tmp_path / "s"
    with pytest.raises(DataError, match="client 1 has no examples"):
        write_shards([clients[0], [], clients[2]], test, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_manifest_is_named(tmp_path: Path) -> None:
    clients, test = small_split()
    out = tmp_path / "s"
    write_shards(clients, test, out)
    body = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**body, "schema_version": 2}))
    with pytest.raises(DataError, match=r"manifest\.json: has schema_version 2"):
        read_manifest(out)
    with pytest.raises(DataError, match=r"nowhere/manifest\.json: cannot be read"):
        read_manifest(tmp_path / "nowhere")
