"""On-disk formats shared by training and serving: adapters in stock PEFT format, representation
banks, and atomic writes (write to a temp file, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from feddpa.core.config import WeightingConfig
from feddpa.core.weighting import ClientBank

ADAPTER_FILE = "adapter_model.safetensors"
BANK_FILE = "bank.safetensors"
DEFAULT_GATE_TOPK = WeightingConfig().gate_topk
REPRESENTATIONS = ("local", "embedding")  # stored in a bank file as the index


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
    return load_file(str(directory / ADAPTER_FILE))


def save_bank(bank: ClientBank, path: Path) -> None:
    """The representations and the gate's calibration, in one file (one atomic rename)."""
    topk = torch.tensor([bank.topk])
    kind = torch.tensor([REPRESENTATIONS.index(bank.representation)])
    tensors = {"bank": bank.vectors, "loo": bank.loo, "loo_topk": topk, "representation": kind}
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
    return ClientBank(tensors["bank"], tensors["loo"], int(tensors["loo_topk"][0]), kind)


LATEST = "LATEST"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest committed round directory under a run's checkpoints/, or None."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which has no state.json")
    return path
