"""Helpers shared by the tests that run `feddpa` end to end: the CLI with pytest's logging kept,
a run directory's metrics and latest committed round, adapter digests, the tiny-Llama config."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from feddpa.cli import main
from feddpa.core.config import save_config

TWO_TASKS = ["sentiment_movies", "routing_acme"]


@contextmanager
def restored_logging() -> Iterator[None]:
    """The CLI reconfigures the root logger (force=True); put pytest's handlers back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def cli(*argv: str) -> int:
    with restored_logging():
        return main(list(argv))


def cli_train(cfg, run_dir: Path) -> int:
    config = run_dir.parent / f"{run_dir.name}.yaml"
    save_config(cfg, config)
    return cli("train", "--config", str(config), "--run-dir", str(run_dir))


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def latest_round(run_dir: Path) -> Path:
    ckpts = run_dir / "checkpoints"
    return ckpts / (ckpts / "LATEST").read_text().strip()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_files(round_dir: Path) -> dict[str, str]:
    """Hashes of every adapter/bank tensor file of a committed round, by relative path."""
    return {
        str(p.relative_to(round_dir)): digest(p) for p in sorted(round_dir.rglob("*.safetensors"))
    }


def llama_cfg(small_cfg, llama_dir: Path, overrides: dict):
    base = {
        "model": {"kind": "causal_lm", "path": str(llama_dir), "max_length": 64, "threads": 1},
        "data": {"tasks": TWO_TASKS, "train_per_task": 4, "test_per_task": 1},
        "train": {"lr": 1e-2, "batch_size": 4, "micro_batch_size": 4},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return small_cfg(base)
