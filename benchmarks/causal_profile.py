"""Where the causal benchmark's time goes, against what this machine can do, and the zero-shot row.

Per seed: each run's wall time split into fit and evaluation (from metrics.jsonl), training and
generation throughput in tokens/s and as a fraction of the measured `torch.matmul` limit
(FLOPs ≈ 2·params per token forward; training a frozen model's LoRA ≈ 2× that: the forward, and
a backward that computes activation gradients through every layer but no weight gradients for
the frozen weights; the limit is measured when the report runs, so it is only as quiet as the
machine is then), and the padding share of
training batches (random batches vs batches grouped by length). Also each client's trust in its
local adapter, read from its committed bank.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from functools import cache
from pathlib import Path

import torch

from feddpa.core.config import load_config
from feddpa.core.models.causal import prompt_for
from feddpa.core.storage import client_dir, latest_checkpoint, load_bank
from feddpa.datasets import read_manifest, read_shard

N_PARAMS = 134.5e6  # SmolLM2-135M (DESIGN.md)


@cache
def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    """fp32 `torch.matmul` throughput on this process's threads (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _tokens(run_dir: Path) -> list[int]:
    """Token count of every training sequence of every client (prompt + answer + EOS, cut)."""
    from transformers import AutoTokenizer

    from feddpa.core.models.loading import resolve_model_path

    cfg = load_config(run_dir / "config.yaml")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
    data = str(run_dir / "data")
    lengths = []
    for info in read_manifest(data).clients:
        for ex in read_shard(data, info):
            n = len(tok(prompt_for(ex.instruction))["input_ids"]) + len(tok(ex.output)["input_ids"])
            lengths.append(min(n + 1, cfg.model.max_length))
    return lengths


def padding_share(lengths: list[int], batch: int, grouped: bool, seed: int = 0) -> float:
    """Share of pad tokens when batches of `batch` are padded to their longest row."""
    order = sorted(lengths) if grouped else random.Random(seed).sample(lengths, len(lengths))
    padded = sum(
        max(order[i : i + batch]) * len(order[i : i + batch]) for i in range(0, len(order), batch)
    )
    return 1 - sum(lengths) / padded


def _timing(run_dir: Path, finetune_only: bool) -> dict:
    """Fit and evaluation seconds over the run's rounds (a FedDPA-F fork: its own step only,
    the forked rounds are FedDPA-T's)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if finetune_only:
        records = [r for r in records if r["phase"] == "finetune"]
    return {
        "fit_s": sum(r["timing"]["fit_s"] for r in records),
        "eval_s": sum(r["timing"]["eval_s"] for r in records),
    }


def _trust(run_dir: Path) -> dict[str, float]:
    latest = latest_checkpoint(run_dir / "checkpoints")
    out = {}
    for info in read_manifest(str(run_dir / "data")).clients:
        bank = client_dir(latest, info.client_id) / "bank.safetensors" if latest else None
        if bank is not None and bank.is_file():
            out[str(info.client_id)] = load_bank(bank).trust
    return out


def profile_seed(runs: dict[str, Path], root: Path, limit: float | None = None) -> dict:
    cfg = load_config(runs["feddpa_t"] / "config.yaml")
    lengths = _tokens(runs["feddpa_t"])
    t = cfg.train
    # epochs over every client's data: FedDPA-T (global each round + local from round 1),
    # FedDPA-F's fine-tuning, Local (local each round)
    rounds = cfg.federation.rounds
    epochs = {
        "feddpa_t": rounds * t.epochs + (rounds - 1) * t.local_epochs,
        "feddpa_f": t.finetune_epochs,
        "local": rounds * t.local_epochs,
    }
    measured = limit is None
    limit = matmul_gflops() if limit is None else limit
    runs_out = {}
    for name, run_dir in runs.items():
        timing = _timing(run_dir, finetune_only=name == "feddpa_f")
        tokens = sum(lengths) * epochs[name]
        tok_s = tokens / timing["fit_s"] if timing["fit_s"] else float("nan")
        runs_out[name] = {
            **timing,
            "train_tokens": tokens,
            "train_tokens_per_s": tok_s,
            "train_fraction_of_matmul_limit": 2 * 2 * N_PARAMS * tok_s / 1e9 / limit,
        }
    wall = root / "wall_s.json"
    return {
        "wall_s": json.loads(wall.read_text())["wall_s"] if wall.is_file() else None,
        "matmul_gflops": limit,
        "matmul_source": "measured by this report" if measured else "given with --matmul-gflops",
        "runs": runs_out,
        "padding_share": {
            "random_batches": padding_share(lengths, t.micro_batch_size, grouped=False),
            "grouped_by_length": padding_share(lengths, t.micro_batch_size, grouped=True),
        },
        "trust": {m: _trust(runs[m]) for m in ("feddpa_t", "feddpa_f")},
    }


def zero_shot(run_dir: Path, cache_file: Path, tasks: list[str]) -> dict[str, float]:
    """ROUGE-1 of the base model (fresh adapters: B = 0) per task, computed once and cached."""
    if cache_file.is_file():
        return json.loads(cache_file.read_text())
    from feddpa.actors.host import ClientHost

    cfg = load_config(run_dir / "config.yaml")
    data = str(run_dir / "data")
    host = ClientHost(cfg, data, [])
    scores = host.evaluate_global(host.initial_global()).scores
    by_task: dict[str, list[float]] = {}
    for task, score in zip(tasks, scores, strict=True):
        by_task.setdefault(task, []).append(score)
    out = {t: statistics.mean(v) for t, v in sorted(by_task.items())}
    cache_file.write_text(json.dumps(out, indent=1))
    return out
