"""Per-client Parquet shards with a checksummed manifest, written atomically, read from any fs.

Layout of a shard directory::

    manifest.json                  schema_version, created_by, and per shard: path,
                                   num_examples, tasks {task: count}, sha256 of the file
    clients/client_{id:05d}.parquet   columns instruction, output, task, category (strings)
    test.parquet

`write_shards` builds everything in a sibling temp directory, fsyncs it, then renames it into
place: a reader sees either no directory or a complete one. It never overwrites or deletes an
existing directory; rewriting identical data is a no-op that returns the existing manifest.
Readers take a local path or a URI (``file:///...``, ``s3://...``) resolved by
`pyarrow.fs.FileSystem.from_uri`, and check each file's sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feddpa.core.atomic import fsync_dir, write_synced
from feddpa.core.records import Example
from feddpa.datasets.errors import DataError, data_error

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
COLUMNS = ("instruction", "output", "task", "category")

StrPath = str | PathLike[str]


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file as the manifest records it; `client_id` is None for the test shard."""

    path: str
    num_examples: int
    tasks: dict[str, int] = field(hash=False)
    sha256: str
    client_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        body = {
            "path": self.path,
            "num_examples": self.num_examples,
            "tasks": dict(self.tasks),
            "sha256": self.sha256,
        }
        return body if self.client_id is None else {"client_id": self.client_id, **body}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MANIFEST_NAME, where: str = "test") -> ShardInfo:
        entry = _typed(data, dict, source, where)
        path = _get(entry, "path", str, source, where)
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise _manifest_error(source, f"{where}.path is {path!r}, not a path inside the folder")
        tasks = _get(entry, "tasks", dict, source, where)
        for task, count in tasks.items():
            _typed(count, int, source, f"{where}.tasks[{task!r}]")
        client_id = _get(entry, "client_id", int, source, where) if "client_id" in entry else None
        return cls(
            path=path,
            num_examples=_get(entry, "num_examples", int, source, where),
            tasks=dict(tasks),
            sha256=_get(entry, "sha256", str, source, where),
            client_id=client_id,
        )


@dataclass(frozen=True)
class Manifest:
    """What a shard directory holds; `clients[i].client_id == i`."""

    clients: tuple[ShardInfo, ...]
    test: ShardInfo
    schema_version: int = SCHEMA_VERSION
    created_by: str = "feddpa"

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def client_ids(self) -> list[int]:
        return list(range(len(self.clients)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "clients": [info.to_dict() for info in self.clients],
            "test": self.test.to_dict(),
            "created_by": self.created_by,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MANIFEST_NAME) -> Manifest:
        body = _typed(data, dict, source, "the manifest")
        version = body.get("schema_version")
        if version != SCHEMA_VERSION:
            raise data_error(
                source,
                f"has schema_version {version!r} but this feddpa reads {SCHEMA_VERSION}",
                "rewrite the shards with this feddpa version (feddpa data) into a new directory",
            )
        entries = _get(body, "clients", list, source, "the manifest")
        clients = tuple(
            ShardInfo.from_dict(entry, source=source, where=f"clients[{i}]")
            for i, entry in enumerate(entries)
        )
        for i, info in enumerate(clients):
            if info.client_id != i:
                raise _manifest_error(source, f"clients[{i}] has client_id {info.client_id!r}")
        test = ShardInfo.from_dict(_get(body, "test", dict, source, "the manifest"), source=source)
        created_by = _get(body, "created_by", str, source, "the manifest")
        return cls(clients=clients, test=test, schema_version=version, created_by=created_by)


def write_shards(
    clients: Sequence[Sequence[Example]], test: Sequence[Example], out_dir: StrPath
) -> Manifest:
    """Write one Parquet shard per client plus the test shard and a manifest, atomically."""
    if not clients:
        raise data_error(out_dir, "would hold no clients", "pass at least one client's examples")
    for client_id, examples in enumerate(clients):
        if not examples:
            raise data_error(
                out_dir,
                f"client {client_id} has no examples, so nothing was written",
                "drop the empty client or repartition (fewer clients, or a larger alpha)",
            )
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        return _existing_if_identical(out, clients, test)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"  # mkdir honours the umask
    tmp.mkdir()
    try:
        (tmp / "clients").mkdir()
        infos = []
        for info, data in _encoded_shards(clients, test):
            write_synced(tmp / info.path, data)
            infos.append(info)
        manifest = Manifest(clients=tuple(infos[:-1]), test=infos[-1])
        write_synced(tmp / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2).encode())
        fsync_dir(tmp / "clients")
        fsync_dir(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return manifest


def read_manifest(directory_or_uri: StrPath) -> Manifest:
    """Read and validate ``manifest.json`` from a local directory or a URI."""
    fs, base = _resolve(directory_or_uri)
    source = f"{directory_or_uri}/{MANIFEST_NAME}"
    raw = _read_bytes(fs, f"{base}/{MANIFEST_NAME}", source)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _manifest_error(source, f"is not valid JSON ({err})") from err
    return Manifest.from_dict(data, source=source)


def read_shard(
    manifest_dir_or_uri: StrPath, info: ShardInfo, *, verify: bool = True
) -> list[Example]:
    """Read one shard; with `verify`, its sha256 must match the manifest's."""
    fs, base = _resolve(manifest_dir_or_uri)
    source = f"{manifest_dir_or_uri}/{info.path}"
    data = _read_bytes(fs, f"{base}/{info.path}", source)
    if verify and (actual := hashlib.sha256(data).hexdigest()) != info.sha256:
        raise data_error(
            source,
            f"has sha256 {actual} but the manifest records {info.sha256}",
            "the file changed after it was written; rewrite the shards into a new directory",
        )
    try:
        table = pq.read_table(pa.BufferReader(data), columns=list(COLUMNS))
    except (pa.ArrowInvalid, KeyError) as err:
        raise data_error(
            source, f"is not a shard with columns {list(COLUMNS)} ({err})", "rewrite the shards"
        ) from err
    examples = [Example(**row) for row in table.to_pylist()]
    if len(examples) != info.num_examples:
        raise data_error(
            source,
            f"holds {len(examples)} examples but the manifest records {info.num_examples}",
            "rewrite the shards into a new directory",
        )
    return examples


def read_test(
    manifest_dir_or_uri: StrPath, manifest: Manifest | None = None, *, verify: bool = True
) -> list[Example]:
    """Read the test shard (reading the manifest first unless given)."""
    manifest = manifest if manifest is not None else read_manifest(manifest_dir_or_uri)
    return read_shard(manifest_dir_or_uri, manifest.test, verify=verify)


def _encoded_shards(
    clients: Sequence[Sequence[Example]], test: Sequence[Example]
) -> Iterator[tuple[ShardInfo, bytes]]:
    """(info, Parquet bytes) per client, then the test shard; same examples give same bytes."""
    shards = [(f"clients/client_{i:05d}.parquet", ex, i) for i, ex in enumerate(clients)]
    for rel_path, examples, client_id in [*shards, ("test.parquet", test, None)]:
        columns = {name: [getattr(ex, name) for ex in examples] for name in COLUMNS}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}), sink)
        data = sink.getvalue().to_pybytes()
        tasks = dict(sorted(Counter(columns["task"]).items()))
        digest = hashlib.sha256(data).hexdigest()
        yield ShardInfo(rel_path, len(examples), tasks, digest, client_id), data


def _existing_if_identical(
    out: Path, clients: Sequence[Sequence[Example]], test: Sequence[Example]
) -> Manifest:
    """The manifest already in `out` when it holds exactly these shards, intact; else an error."""
    fix = "choose a new output directory (nothing was overwritten)"
    if not (out / MANIFEST_NAME).is_file():
        raise data_error(out, "already exists and is not a shard directory (no manifest.json)", fix)
    existing = read_manifest(out)
    *infos, test_info = (info for info, _ in _encoded_shards(clients, test))
    if existing.to_dict() != Manifest(clients=tuple(infos), test=test_info).to_dict():
        raise data_error(out, "already holds different shards (checksums differ)", fix)
    for info in (*existing.clients, existing.test):
        if hashlib.sha256((out / info.path).read_bytes()).hexdigest() != info.sha256:
            raise data_error(out / info.path, "does not match its manifest checksum", fix)
    return existing


def _resolve(directory_or_uri: StrPath) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path without trailing slash) for a local path or a URI."""
    text = os.fspath(directory_or_uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, ValueError) as err:
        raise data_error(
            text, f"is not a URI pyarrow can open ({err})", "use file:///abs/dir or a local path"
        ) from err
    return fs, path.rstrip("/")


def _read_bytes(fs: pafs.FileSystem, path: str, source: str) -> bytes:
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read()
    except OSError as err:
        fix = "check the path; write_shards (feddpa data) makes shard directories"
        raise data_error(source, f"cannot be read ({err})", fix) from err


def _get(mapping: Mapping[str, Any], key: str, kind: type, source: str, where: str) -> Any:
    if key not in mapping:
        raise _manifest_error(source, f"{where} has no {key!r}")
    return _typed(mapping[key], kind, source, f"{where}.{key}")


def _typed(value: Any, kind: type, source: str, where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _manifest_error(source, f"{where} is {value!r}, not a {kind.__name__}")
    return value


def _manifest_error(source: str, problem: str) -> DataError:
    return data_error(
        source, problem, "rewrite the shards into a new directory with write_shards (feddpa data)"
    )
