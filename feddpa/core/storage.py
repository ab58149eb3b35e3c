"""The run directory's layout and on-disk formats, shared by training, serving and the CLI: paths
(rounds, stages, client directories, LATEST), adapters in stock PEFT format, representation banks,
and atomic writes (write to a temp file or directory, fsync, rename).

    RUN/checkpoints/round_00003/clients/client_00007/{local/, bank.safetensors}
    RUN/checkpoints/.stage_00004/...   the round being written (hosts stage their clients here)
    RUN/checkpoints/LATEST             name of the newest committed round
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from feddpa.core.config import WeightingConfig
from feddpa.core.weighting import ClientBank

ADAPTER_FILE = "adapter_model.safetensors"
BANK_FILE = "bank.safetensors"
DEFAULT_GATE_TOPK = WeightingConfig().gate_topk
REPRESENTATIONS = ("local", "embedding", "base")  # stored in a bank file as the index


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_adapter(state: dict[str, torch.Tensor], config: LoraConfig, directory: Path) -> None:
    """Stock PEFT layout: `PeftModel.from_pretrained(base, directory)` loads it."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(state, directory / ADAPTER_FILE)
    config.save_pretrained(str(directory))


def load_adapter(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_FILE
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: adapter file missing") from None
    except Exception as err:  # safetensors raises its own error types, naming no file
        raise ValueError(
            f"{path}: unreadable adapter ({err}); restore it from an earlier round or retrain"
        ) from None


def save_bank(bank: ClientBank, path: Path) -> None:
    """The representations and the gate's calibration, in one file (one atomic rename)."""
    topk = torch.tensor([bank.topk])
    kind = torch.tensor([REPRESENTATIONS.index(bank.representation)])
    tensors = {
        "bank": bank.vectors,
        "loo": bank.loo,
        "loo_topk": topk,
        "representation": kind,
        "trust": torch.tensor([bank.trust]),
        "layer": torch.tensor([bank.layer]),
    }
    save_tensors(tensors, path)


def load_bank(path: Path) -> ClientBank:
    """A client's bank; one written before the gate existed is calibrated on load."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types, naming no file
        raise ValueError(
            f"{path}: unreadable representation bank ({err}); "
            "restore it from an earlier round or retrain the client"
        ) from None
    if "bank" not in tensors:
        raise ValueError(f"{path}: no 'bank' tensor in this file: not a feddpa bank")
    if "loo" not in tensors:
        return ClientBank.build(tensors["bank"], DEFAULT_GATE_TOPK)
    kind = (
        REPRESENTATIONS[int(tensors["representation"][0])]
        if "representation" in tensors
        else "local"
    )
    trust = float(tensors["trust"][0]) if "trust" in tensors else 1.0  # older banks: full trust
    layer = float(tensors["layer"][0]) if "layer" in tensors else 1.0  # older banks: final
    topk = int(tensors["loo_topk"][0])
    return ClientBank(tensors["bank"], tensors["loo"], topk, kind, trust, layer)


LATEST = "LATEST"
EXECUTION_FILE = "execution.json"  # how the run was started: {"ray": null | "local" | ADDRESS}
LOCK_FILE = ".lock"  # held by the one process writing the run directory
ROUND_NAME = re.compile(r"round_\d{5,}")


def round_name(step: int) -> str:
    return f"round_{step:05d}"


def stage_dir(checkpoints: Path, step: int) -> Path:
    """Where round `step` is written before it is committed."""
    return checkpoints / f".stage_{step:05d}"


def client_dir(root: Path, client_id: int) -> Path:
    """A client's files inside a round or a stage directory."""
    return root / "clients" / f"client_{client_id:05d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest committed round directory under a run's checkpoints/, or None."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    if not ROUND_NAME.fullmatch(name):
        raise ValueError(
            f"{marker} names {name!r}, not a round directory (round_NNNNN): "
            "write the newest round_* directory's name into it"
        )
    path = root / name
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which has no state.json")
    return path


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def stage_client(stage: Path, client_id: int, write: Callable[[Path], None]) -> Path:
    """Write a client's files with `write(tmp_dir)` and move them into the stage in one rename:
    the stage holds all of a client's files or none (a crash leaves only a hidden temp dir)."""
    final = client_dir(stage, client_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        write(tmp)
        fsync_tree(tmp)
        if final.exists():  # the same client staged again in this round: the newer one wins
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class RunLocked(RuntimeError):
    """Another process is writing this run directory."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive ownership of a run directory for the block (an advisory `flock` on RUN/.lock,
    released by the OS if the process dies). A second writer fails at once with a clear error.
    On a cluster the lock is only as good as the shared filesystem's flock."""
    import fcntl
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            raise RunLocked(
                f"{run_dir} is being written by {owner}; wait for it to finish or stop it "
                "before resuming"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield  # closing the file releases the lock


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a corrupt line is an error naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number}: not a JSON record ({err.msg}); delete that line and resume"
            ) from None
    return records
