"""Shared by the benchmark scripts: machine description, number formatting, writing results."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from pathlib import Path

import psutil
import ray
import torch


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": names[0] if names else platform.processor(),
        "ram_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_results(
    out: Path, name: str, figures: dict, details: dict, meta: dict, markdown: str
) -> None:
    """`out/NAME.json` (a top-level key per figure, plus targets/details/meta) and `out/NAME.md`;
    `figures` maps a key to (value, "<=" / ">=" / None, target)."""
    result: dict = {k: v[0] for k, v in figures.items()}
    result["targets"] = {k: f"{op} {b:g}" if op else None for k, (_, op, b) in figures.items()}
    result |= {"details": details, "meta": meta}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    logging.getLogger(f"bench.{name}").info(
        "wrote %s in %.0f s", out / f"{name}.json", meta["total_s"]
    )
