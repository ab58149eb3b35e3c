"""`feddpa eval RUN_DIR`: evaluate a run's latest committed checkpoint again, optionally with another
weighting (direction, mode, λ) — no retraining, the same scoring code as training."""

from __future__ import annotations

from pathlib import Path

from feddpa.core.config import apply_overrides, build_config
from feddpa.orchestrator.checkpoint import Checkpoints
from feddpa.orchestrator.executor import InProcessExecutor
from feddpa.orchestrator.loop import evaluate, resumed_config, run_manifest
from feddpa.orchestrator.report import write_report

ALLOWED = ("weighting.", "eval.batch_size", "eval.num_beams", "eval.max_new_tokens", "eval.causal")


def reevaluate(run_dir: Path, overrides: list[str], out: Path | None) -> str:
    for text in overrides:
        if not text.startswith(ALLOWED):
            raise ValueError(f"--set {text!r}: eval can only change {', '.join(ALLOWED)}")
    cfg = resumed_config(run_dir)
    cfg = build_config(apply_overrides(cfg.to_dict(), overrides), str(run_dir / "config.yaml"))
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.keep_checkpoints)
    latest = ckpts.latest()
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no committed round to evaluate")
    step = ckpts.state(latest)["completed_steps"] - 1
    manifest = run_manifest(run_dir)
    executor = InProcessExecutor(cfg, str(run_dir / "data"), manifest.client_ids, ckpts.root)
    from feddpa.datasets import read_test

    test = read_test(str(run_dir / "data"), manifest)
    record = evaluate(executor, cfg, manifest, test, step, ckpts.global_state(latest))
    title = f"{cfg.method} ({record['weighting']}, weight on {cfg.weighting.weight_on})"
    summary = {"final": record, "curve": [[step, record["avg"]["P"], record["avg"]["TTP"]]]}
    table = write_report({title: summary}, out or run_dir / "results-eval", title)
    return f"{title} — round {step}\n\n{table}"
