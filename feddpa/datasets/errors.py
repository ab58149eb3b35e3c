"""The one error type for unusable data, with messages that say where and what to do.

A `DataError` names the file, the place inside it (``line N`` for JSONL/CSV, 1-based;
``item N`` for JSON arrays and ``row N`` for Parquet, 0-based indices), the field, and the fix::

    dataset1/test.jsonl line 17: field 'output' is 'maybe', which is not among the OPTIONS
    ['yes', 'no']; fix the answer or the OPTIONS block
"""

from __future__ import annotations

from os import PathLike


class DataError(ValueError):
    """Data (a file, a record, a partition request) that cannot be used as given."""


def data_error(
    source: str | PathLike[str],
    problem: str,
    fix: str,
    *,
    location: str = "",
    field: str | None = None,
) -> DataError:
    """Build a `DataError` reading ``"<source> <location>: field '<field>' <problem>; <fix>"``."""
    where = f"{source} {location}" if location else str(source)
    what = f"field {field!r} {problem}" if field else problem
    return DataError(f"{where}: {what}; {fix}")
