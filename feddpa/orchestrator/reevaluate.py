"""`feddpa eval RUN_DIR`: evaluate a run's latest committed checkpoint again, optionally with another
weighting (direction, mode, λ) — no retraining, the same scoring code as training."""

from __future__ import annotations

from pathlib import Path

from feddpa.core.config import apply_overrides, build_config
from feddpa.core.storage import RunDir
from feddpa.datasets import read_test
from feddpa.orchestrator.executor import InProcessExecutor
from feddpa.orchestrator.loop import evaluate, run_manifest
from feddpa.orchestrator.report import write_report

ALLOWED = ("weighting.", "eval.batch_size", "eval.num_beams", "eval.max_new_tokens", "eval.causal")


class RunEvaluator:
    """The latest committed round of a run, loaded once, evaluated under any weighting."""

    def __init__(self, run_dir: Path) -> None:
        self.run = RunDir(run_dir)
        self.cfg = self.run.read_config()
        latest = self.run.latest()
        if latest is None:
            raise FileNotFoundError(f"{run_dir} has no committed round to evaluate")
        self.step = latest.completed_rounds() - 1
        self.manifest = run_manifest(self.run)
        data = str(self.run.data_dir)
        self.executor = InProcessExecutor(self.cfg, data, self.manifest.client_ids, self.run)
        self.test = read_test(data, self.manifest)
        self.global_state = latest.global_adapter()

    def evaluate(self, overrides: list[str]) -> dict:
        for text in overrides:
            if not text.startswith(ALLOWED):
                raise ValueError(f"--set {text!r}: eval can only change {', '.join(ALLOWED)}")
        origin = str(self.run.config_file)
        cfg = build_config(apply_overrides(self.cfg.to_dict(), overrides), origin)
        # generation settings live in the loaded model (causal LMs): apply this call's eval.*
        model = self.executor.host.model
        if hasattr(model, "eval_cfg"):
            model.eval_cfg = cfg.eval
        return evaluate(self.executor, cfg, self.manifest, self.test, self.step, self.global_state)


def reevaluate(run_dir: Path, overrides: list[str], out: Path | None) -> str:
    runner = RunEvaluator(run_dir)
    record = runner.evaluate(overrides)
    title = f"{runner.cfg.method} ({record['weighting']})"
    summary = {"final": record, "curve": [[runner.step, record["avg"]["P"], record["avg"]["TTP"]]]}
    table = write_report({title: summary}, out or runner.run.reevaluation_dir, title)
    return f"{title}, overrides {overrides or 'none'} — round {runner.step}\n\n{table}"
