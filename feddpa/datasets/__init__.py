"""Loading, validation, partitioning and Parquet shards of instruction data for FedDPA.

Load (`load_records`, `load_feddpa_release`, `load_files`) → split across clients
(`partition_by_task`, `partition_dirichlet`, `partition_iid`, `split_holdout`, `subsample`) → write per-client
shards (`write_shards`) that actors read back (`read_manifest`, `read_shard`, `read_test`).
Every problem with the data raises `DataError`, naming the file, line, field and fix.
"""

from feddpa.datasets.errors import DataError
from feddpa.datasets.loaders import (
    SUPPORTED_SUFFIXES,
    FederatedData,
    load_feddpa_release,
    load_files,
    load_records,
)
from feddpa.datasets.partition import (
    partition_by_task,
    partition_dirichlet,
    partition_iid,
    split_holdout,
    subsample,
)
from feddpa.datasets.shards import (
    Manifest,
    ShardInfo,
    read_manifest,
    read_shard,
    read_test,
    write_shards,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "DataError",
    "FederatedData",
    "Manifest",
    "ShardInfo",
    "load_feddpa_release",
    "load_files",
    "load_records",
    "partition_by_task",
    "partition_dirichlet",
    "partition_iid",
    "read_manifest",
    "read_shard",
    "read_test",
    "split_holdout",
    "subsample",
    "write_shards",
]
