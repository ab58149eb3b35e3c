"""The run directory: its one blueprint and its on-disk formats. Every module that reads or writes
a run directory goes through this file — no other module spells a name inside it.

    RUN/config.yaml            the resolved configuration (written once, atomically)
    RUN/execution.json         how the run was started: {"ray": null | "local" | ADDRESS}
    RUN/metrics.jsonl          one record per committed round
    RUN/.lock                  held by the one process writing the run directory
    RUN/data/                  the run's data shards (their layout: datasets.shards)
    RUN/results/, RUN/results-eval/    tables and plots of `feddpa train` / `feddpa eval`
    RUN/checkpoints/round_00003/   global/ (PEFT adapter)  clients/client_00007/{local/, bank.safetensors}
                                   state.json  metrics.json
    RUN/checkpoints/.stage_00004/  the round being written (hosts stage their clients here)
    RUN/checkpoints/LATEST     name of the newest committed round

Objects: `RunDir` (the directory), `Checkpoints` (its rounds: latest, stage, commit, prune),
`Round` (a committed round: state, metrics, global adapter, `client(id)`), `Stage` (a round being
written: `write_client`, then `Checkpoints.commit`), `ClientFiles` (a client's local adapter and
bank in a round or a stage). Writes are atomic (temp file, fsync, rename, fsync of the directory).

Committing: hosts stage the clients they changed; the driver hard-links every unchanged client from
the previous round (each round directory is complete on its own), writes the global adapter, the
round's metrics and state, fsyncs and renames the stage into place, then replaces LATEST
atomically. A crash at any point leaves the previous round intact; a stale stage is discarded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch
import yaml
from peft import LoraConfig
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from feddpa.core.atomic import atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree
from feddpa.core.config import ExperimentConfig, WeightingConfig, load_config
from feddpa.core.weighting import ClientBank

AdapterState = dict[str, torch.Tensor]

ADAPTER_FILE = "adapter_model.safetensors"
BANK_FILE = "bank.safetensors"
LOCAL_DIR = "local"
GLOBAL_DIR = "global"
STATE_FILE = "state.json"
ROUND_METRICS_FILE = "metrics.json"
CLIENTS_DIR = "clients"
LATEST = "LATEST"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EXECUTION_FILE = "execution.json"
LOCK_FILE = ".lock"
DATA_DIR = "data"
LOG_FILE = "train.log"
RESULTS_DIR = "results"
REEVALUATION_DIR = "results-eval"  # `feddpa eval` writes its tables here unless told otherwise
DEEPSPEED_FILE = "deepspeed_config.json"
ROUND_NAME = re.compile(r"round_\d{5,}")
DEFAULT_GATE_TOPK = WeightingConfig().gate_topk
REPRESENTATIONS = ("local", "embedding", "base")  # stored in a bank file as the index


# --- formats: adapters and banks --------------------------------------------------------------


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(cpu, metadata={"format": "pt"}))


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


# --- records --------------------------------------------------------------------------------


class Timing(TypedDict):
    """Seconds a round spent, by part."""

    fit_s: float  # wall time of the fit phase, aggregation folds included
    client_compute_s: float  # summed over clients
    transfer_s: float
    aggregate_s: float
    eval_s: float
    checkpoint_s: float
    wall_s: float


class RoundRecord(TypedDict):
    """A committed round's record: RUN/checkpoints/round_N/metrics.json and the same line in
    RUN/metrics.jsonl (written complete, once, before the commit)."""

    round: int
    phase: str  # "round" or "finetune"
    sampled: list[int]
    losses: dict[str, dict]
    bytes_up: int
    bytes_down: int
    timing: Timing
    eval: dict  # {} when the round was not evaluated
    trust: dict[str, float]
    failures: list[dict]
    privacy: dict  # ε at δ, clip, uploads, masking attempts (feddpa.core.privacy); {} when off


# --- a client's files, a round, a stage -------------------------------------------------------


def round_name(step: int) -> str:
    return f"round_{step:05d}"


def stage_dir(checkpoints: Path, step: int) -> Path:
    """Where round `step` is written before it is committed."""
    return checkpoints / f".stage_{step:05d}"


def client_dir(root: Path, client_id: int) -> Path:
    """A client's files inside a round or a stage directory."""
    return root / CLIENTS_DIR / f"client_{client_id:05d}"


@dataclass(frozen=True)
class ClientFiles:
    """A client's files in a round or a stage: its local adapter (stock PEFT) and its bank."""

    path: Path

    @property
    def local_dir(self) -> Path:
        return self.path / LOCAL_DIR

    @property
    def local_file(self) -> Path:
        return self.local_dir / ADAPTER_FILE

    @property
    def bank_file(self) -> Path:
        return self.path / BANK_FILE

    def exists(self) -> bool:
        return self.path.is_dir()

    def has_local(self) -> bool:
        return self.local_dir.is_dir()

    def has_bank(self) -> bool:
        return self.bank_file.is_file()

    def read_local(self) -> AdapterState | None:
        return load_adapter(self.local_dir) if self.has_local() else None

    def read_bank(self) -> ClientBank | None:
        return load_bank(self.bank_file) if self.has_bank() else None

    def write(
        self, local: AdapterState | None, bank: ClientBank | None, config: LoraConfig
    ) -> None:
        if local is not None:
            save_adapter(local, config, self.local_dir)
        if bank is not None:
            save_bank(bank, self.bank_file)


@dataclass(frozen=True)
class Round:
    """A committed round directory."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def global_dir(self) -> Path:
        return self.path / GLOBAL_DIR

    @property
    def global_file(self) -> Path:
        return self.global_dir / ADAPTER_FILE

    def committed(self) -> bool:
        """False once the round was pruned (or while it is not there at all)."""
        return (self.path / STATE_FILE).is_file()

    def state(self) -> dict:
        return json.loads((self.path / STATE_FILE).read_text())

    def completed_rounds(self) -> int:
        return int(self.state()["completed_steps"])

    def client_ids(self) -> list[int]:
        return sorted(int(c) for c in self.state()["clients"])

    def metrics(self) -> RoundRecord:
        """The round's own record (the line metrics.jsonl gets)."""
        return json.loads((self.path / ROUND_METRICS_FILE).read_text())

    def global_adapter(self) -> AdapterState:
        return load_adapter(self.global_dir)

    def client(self, client_id: int) -> ClientFiles:
        return ClientFiles(client_dir(self.path, client_id))


@dataclass(frozen=True)
class Stage:
    """Round `step` while it is written: hosts write clients into it, the driver commits it."""

    path: Path
    step: int

    def client(self, client_id: int) -> ClientFiles:
        return ClientFiles(client_dir(self.path, client_id))

    def exists(self) -> bool:
        return self.path.is_dir()

    def write_client(
        self,
        client_id: int,
        local: AdapterState | None,
        bank: ClientBank | None,
        config: LoraConfig,
    ) -> ClientFiles:
        """A client's local adapter and bank, staged together (one rename: all or nothing)."""
        return ClientFiles(
            stage_client(self.path, client_id, lambda d: ClientFiles(d).write(local, bank, config))
        )

    def drop_unreported(self, reported: set[int]) -> None:
        """Remove staged files of clients that did not report (and half-staged temp dirs)."""
        clients = self.path / CLIENTS_DIR
        if not clients.is_dir():
            return
        for cdir in clients.iterdir():
            if cdir.name.startswith(".") or int(cdir.name.split("_")[1]) not in reported:
                shutil.rmtree(cdir)


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
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which has no {STATE_FILE}")
    return path


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src into dst (copy where links are not supported)."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


class Checkpoints:
    """A run's committed rounds (RUN/checkpoints): the latest, staging the next, committing it."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep

    def latest(self) -> Round | None:
        path = latest_checkpoint(self.root)
        return None if path is None else Round(path)

    def stage(self, step: int) -> Stage:
        """A fresh, empty stage for round `step` (a stale one from a killed run is discarded)."""
        stage = self.staged(step)
        if stage.path.exists():
            shutil.rmtree(stage.path)
        stage.path.mkdir(parents=True)
        return stage

    def staged(self, step: int) -> Stage:
        """Round `step`'s stage as it is (it may not exist)."""
        return Stage(stage_dir(self.root, step), step)

    def prepare(
        self,
        stage: Stage,
        global_state: AdapterState,
        config: LoraConfig,
        reported: set[int] | None = None,
    ) -> None:
        """Complete the stage's files: of the staged clients only those in `reported` are kept (a
        client that failed or timed out may have staged files: they are dropped); every other
        client is carried forward from the previous round (hard links); the global adapter is
        written; everything is fsynced. Nothing is visible until `commit`."""
        path = stage.path
        if reported is not None:
            stage.drop_unreported(reported)
        previous = self.latest()
        if previous is not None and (previous.path / CLIENTS_DIR).is_dir():
            for cdir in (previous.path / CLIENTS_DIR).iterdir():
                if not (path / CLIENTS_DIR / cdir.name).exists():
                    _link_tree(cdir, path / CLIENTS_DIR / cdir.name)
        save_adapter(global_state, config, path / GLOBAL_DIR)
        fsync_tree(path)

    def commit(self, stage: Stage, state: dict, record: RoundRecord | dict) -> Round:
        """Commit a prepared stage as its round: its record and state (state.json last: a round
        directory with it is complete), one rename, then LATEST names it."""
        atomic_write_json(stage.path / ROUND_METRICS_FILE, record)
        atomic_write_json(stage.path / STATE_FILE, state)
        final = self.root / round_name(stage.step)
        if final.exists():  # a committed round being redone after LATEST moved back: never mix
            shutil.rmtree(final)
        os.rename(stage.path, final)
        fsync_dir(self.root)
        atomic_write_bytes(self.root / LATEST, final.name.encode())
        self._prune()
        return Round(final)

    def _prune(self) -> None:
        rounds = sorted(p for p in self.root.glob("round_*") if p.is_dir())
        for old in rounds[: -self.keep]:
            shutil.rmtree(old)
        for stale in self.root.glob(".stage_*"):
            shutil.rmtree(stale)


# --- the run directory ------------------------------------------------------------------------


class RunLocked(RuntimeError):
    """Another process is writing this run directory."""


class RunDir:
    """A run directory: its configuration, metrics log, execution record, lock and checkpoints."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def data_dir(self) -> Path:
        return self.path / DATA_DIR

    @property
    def results_dir(self) -> Path:
        return self.path / RESULTS_DIR

    @property
    def reevaluation_dir(self) -> Path:
        return self.path / REEVALUATION_DIR

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def deepspeed_file(self) -> Path:
        return self.path / DEEPSPEED_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoints(self, keep: int = 2) -> Checkpoints:
        return Checkpoints(self.checkpoints_dir, keep)

    def latest(self) -> Round | None:
        return self.checkpoints().latest()

    # the configuration ---------------------------------------------------------------------

    def write_config(self, cfg: ExperimentConfig) -> None:
        atomic_write_bytes(
            self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
        )

    def read_config(self) -> ExperimentConfig:
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} has no {CONFIG_FILE}: not a feddpa run directory")
        return load_config(self.config_file)

    # how the run was started ---------------------------------------------------------------

    def write_execution(self, ray: str | None) -> None:
        atomic_write_json(self.path / EXECUTION_FILE, {"ray": ray})

    def read_execution(self) -> tuple[bool, str | None]:
        """(found, ray address or None); a run from before the file existed: (False, None)."""
        path = self.path / EXECUTION_FILE
        if not path.is_file():
            return False, None
        return True, json.loads(path.read_text()).get("ray")

    @property
    def execution_file(self) -> Path:
        return self.path / EXECUTION_FILE

    # the metrics log -----------------------------------------------------------------------

    def read_metrics(self) -> list[dict]:  # RoundRecords; older runs' lines may lack fields
        return read_jsonl(self.metrics_file) if self.metrics_file.exists() else []

    def append_metrics(self, record: RoundRecord | dict, upto_round: int) -> None:
        """Append `record`, first dropping lines of rounds >= upto_round left by a killed run; the
        file is replaced atomically, so a kill leaves the old or the new file, never a torn line."""
        kept = [r for r in self.read_metrics() if r["round"] < upto_round]
        lines = [json.dumps(r, sort_keys=True) + "\n" for r in [*kept, record]]
        atomic_write_bytes(self.metrics_file, "".join(lines).encode())

    # a new run, and the one writer ---------------------------------------------------------

    def ensure_new(self) -> None:
        """Refuse a directory that holds anything but what the CLI writes before training."""
        written_first = (LOG_FILE, EXECUTION_FILE, LOCK_FILE)
        if self.path.exists() and any(p.name not in written_first for p in self.path.iterdir()):
            raise FileExistsError(
                f"run directory {self.path} already exists and is not empty; choose another "
                f"--run-dir or continue it with --resume {self.path}"
            )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive ownership for the block (an advisory `flock` on RUN/.lock, released by the
        OS if the process dies). A second writer fails at once with a clear error. On a cluster
        the lock is only as good as the shared filesystem's flock."""
        import fcntl
        import socket

        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                owner = fh.read().strip() or "another process"
                raise RunLocked(
                    f"{self.path} is being written by {owner}; wait for it to finish or stop it "
                    "before resuming"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()
            yield  # closing the file releases the lock
