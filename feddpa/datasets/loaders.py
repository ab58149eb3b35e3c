"""Load and validate instruction records: generic files and the FedDPA release layout.

Every record becomes a `feddpa.core.records.Example`. Each one is checked on load: `instruction`
and `output` must be non-empty strings, `task` and `category` strings when present, and when the
instruction ends in an ``OPTIONS:`` block the output (stripped) must be one of the options.
Any problem raises a `DataError` naming the file, the line or item, the field and the fix.

The FedDPA release (Yang et al., arXiv 2403.19211; Lydia-yang/FedDPA, data/dataset1) is one JSON
array per client, ``local_training_{m}.json`` for m = 0..M-1, and one shared ``test.jsonl``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from feddpa.core.records import Example, parse_options
from feddpa.datasets.errors import DataError, data_error

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_CLIENT_FILE = re.compile(r"local_training_(0|[1-9][0-9]*)\.json")

StrPath = str | PathLike[str]


@dataclass(frozen=True)
class FederatedData:
    """Training examples per client and one shared test set, as loaded from `source`."""

    clients: tuple[tuple[Example, ...], ...]
    test: tuple[Example, ...]
    source: str

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Sorted unique task names over all clients and the test set."""
        names = {ex.task for client in self.clients for ex in client}
        names.update(ex.task for ex in self.test)
        return tuple(sorted(names))

    def pooled_train(self) -> list[Example]:
        """All clients' training examples in client order (e.g. for re-partitioning)."""
        return [ex for client in self.clients for ex in client]


def load_records(path: StrPath, *, default_task: str | None = None) -> list[Example]:
    """Read one file (.json array, .jsonl, .csv or .parquet) into validated examples.

    A record without a `task` gets `default_task`, or the file stem when that is None; a record
    without a `category` gets "". An empty file is an error.
    """
    examples = _read_examples(Path(path), default_task)
    if not examples:
        raise data_error(
            path, "contains no records", "add records or leave the file out of the inputs"
        )
    return examples


def load_feddpa_release(directory: StrPath) -> FederatedData:
    """Load the FedDPA layout: ``local_training_{0..M-1}.json`` plus the test ``*.jsonl``."""
    root = Path(directory)
    if not root.is_dir():
        raise data_error(
            root, "is not a directory", "pass the folder holding local_training_*.json"
        )
    clients = []
    for client_id, path in enumerate(_client_files(root)):
        examples = _read_examples(path, None)
        if not examples:
            raise data_error(
                path,
                f"(client {client_id}) contains no records",
                "every client needs at least one training example; add records, or remove this "
                "client and renumber the files after it",
            )
        clients.append(tuple(examples))
    test = load_records(_test_file(root))
    return FederatedData(clients=tuple(clients), test=tuple(test), source=str(root))


def load_files(
    train_paths: Sequence[StrPath], test_path: StrPath, *, default_task: str | None = None
) -> FederatedData:
    """Load generic files: all training records pooled as one client, to be partitioned later."""
    if not train_paths:
        raise data_error(
            "load_files", "got no training files", "pass at least one training file path"
        )
    pooled = [ex for path in train_paths for ex in load_records(path, default_task=default_task)]
    test = load_records(test_path, default_task=default_task)
    source = ", ".join(str(p) for p in [*train_paths, test_path])
    return FederatedData(clients=(tuple(pooled),), test=tuple(test), source=source)


def _client_files(root: Path) -> list[Path]:
    """``local_training_{m}.json`` for m = 0..M-1; a gap or an odd name is an error."""
    found: dict[int, Path] = {}
    for path in sorted(root.glob("local_training_*.json")):
        match = _CLIENT_FILE.fullmatch(path.name)
        if match is None:
            raise data_error(
                path,
                "does not match local_training_<m>.json with m a client number without leading zeros",
                "rename it (clients are numbered 0, 1, 2, ...) or move it out of the folder",
            )
        found[int(match.group(1))] = path
    if not found:
        raise data_error(
            root,
            "holds no local_training_<m>.json files, so it is not the FedDPA release layout",
            "point at the release folder, or load generic files with load_files",
        )
    for client_id in range(max(found) + 1):
        if client_id not in found:
            raise data_error(
                root / f"local_training_{client_id}.json",
                f"is missing, but clients up to {max(found)} exist",
                "client files must be numbered contiguously from 0; add it or renumber the others",
            )
    return [found[m] for m in range(len(found))]


def _test_file(root: Path) -> Path:
    """``test.jsonl`` if present, otherwise the one and only ``*.jsonl`` in the folder."""
    preferred = root / "test.jsonl"
    if preferred.is_file():
        return preferred
    candidates = sorted(root.glob("*.jsonl"))
    if len(candidates) != 1:
        names = [p.name for p in candidates]
        raise data_error(
            root,
            f"has no test.jsonl and {len(candidates)} other .jsonl files {names}",
            "name the test file test.jsonl (or keep exactly one .jsonl file in the folder)",
        )
    return candidates[0]


def _read_examples(path: Path, default_task: str | None) -> list[Example]:
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise data_error(
            path,
            f"has an unsupported format {path.suffix or '(no suffix)'!r}",
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    if not path.is_file():
        raise data_error(path, "does not exist or is not a file", "check the path")
    task = default_task if default_task is not None else path.stem
    try:
        return [_to_example(row, path, where, task) for where, row in _rows(path)]
    except UnicodeDecodeError as err:
        raise data_error(path, f"is not valid UTF-8 ({err})", "re-save it as UTF-8") from err


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) pairs; the location is what error messages quote."""
    if path.suffix == ".json":
        yield from _json_rows(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".csv":
        yield from _csv_rows(path)
    else:
        yield from _parquet_rows(path)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise data_error(
            path,
            f"is not valid JSON ({err.msg})",
            "fix the syntax there; a .json file must hold one JSON array of objects",
            location=f"line {err.lineno} column {err.colno}",
        ) from err
    if not isinstance(data, list):
        raise data_error(
            path,
            f"holds a JSON {type(data).__name__}, not an array",
            "wrap the records in [...] or save them one per line as .jsonl",
        )
    for index, row in enumerate(data):
        yield f"item {index}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise data_error(
                    path,
                    f"is not valid JSON ({err.msg} at column {err.colno})",
                    "each line of a .jsonl file must be one complete JSON object; fix or remove it",
                    location=f"line {number}",
                ) from err
            yield f"line {number}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows keyed by the header; a record's line is where it starts (cells may span lines)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        last_line = reader.line_num
        for cells in reader:
            where, last_line = f"line {last_line + 1}", reader.line_num
            if not cells:
                continue
            if len(cells) > len(header):
                raise data_error(
                    path,
                    f"has {len(cells)} cells but the header has {len(header)} columns",
                    "quote cells that contain commas, or add the missing header names",
                    location=where,
                )
            yield where, dict(zip(header, cells, strict=False))  # short rows: missing fields


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise data_error(path, f"is not a readable Parquet file ({err})", "re-export it") from err
    for index, row in enumerate(table.to_pylist()):
        yield f"row {index}", row


def _to_example(row: Any, path: Path, where: str, default_task: str) -> Example:
    if not isinstance(row, dict):
        raise data_error(
            path,
            f"is a {type(row).__name__}, not an object",
            "each record must be an object with instruction and output fields",
            location=where,
        )

    def fail(field: str, problem: str, fix: str) -> DataError:
        return data_error(path, problem, fix, location=where, field=field)

    for field in ("instruction", "output"):
        value = row.get(field)
        if value is None:
            raise fail(field, "is missing", f"add a non-empty {field!r} to the record")
        if not isinstance(value, str):
            raise fail(field, f"is a {type(value).__name__}, not a string", "store it as text")
        if not value.strip():
            raise fail(field, "is empty", f"give the record a non-empty {field!r} or remove it")
    task = row.get("task")
    if task is None:
        task = default_task
    elif not isinstance(task, str) or not task.strip():
        raise fail("task", f"is {task!r}, not a task name", "give a non-empty task name or drop it")
    category = row.get("category")
    if category is None:
        category = ""
    elif not isinstance(category, str):
        raise fail("category", f"is a {type(category).__name__}, not a string", "store it as text")
    instruction, output = row["instruction"], row["output"]
    options = parse_options(instruction)
    if options and output.strip() not in options:
        raise fail(
            "output",
            f"is {output!r}, which is not among the OPTIONS {list(options)}",
            "fix the answer or the OPTIONS block",
        )
    return Example(instruction=instruction, output=output, task=task, category=category)
