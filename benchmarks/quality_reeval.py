"""Re-evaluate the quality benchmark's finished FedDPA runs under another weighting, without
retraining: the weighting only decides how the two trained adapters are mixed at inference (the
training phases never read it), so the final round's P/TTP under `--set` is what a full rerun with
that weighting would report for the final round.

    python benchmarks/quality_reeval.py --work runs/quality-full --name embedding \\
        --set weighting.representation=embedding

Writes results/quality-reeval-NAME.{json,md}: mean ± std over seeds per benchmark and method,
beside the run's own final evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from quality import pct  # noqa: E402

from feddpa.orchestrator.reevaluate import RunEvaluator  # noqa: E402
from feddpa.orchestrator.report import run_summary  # noqa: E402

METHODS = ("feddpa_t", "feddpa_f")


def finished_runs(work: Path, holdout: bool) -> dict[tuple[str, str], list[Path]]:
    """(benchmark, method) -> finished run directories, one per seed; with `holdout`, the
    held-out weighting-selection run only (the split choices are made on)."""
    out: dict[tuple[str, str], list[Path]] = {}
    for run in sorted((work / "runs").iterdir()):
        bench, method, *_ = run.name.split("-")
        wanted = method == "holdout" if holdout else method in METHODS
        if wanted and (run / "results" / "done").is_file():
            # held-out runs differ by more than the seed (benchmarks/mix_a.py trains others):
            # each is its own row
            out.setdefault((bench, run.name if holdout else method), []).append(run)
    return out


def mean_std(values: list[float]) -> str:
    return f"{pct(statistics.mean(values))} ± {pct(statistics.pstdev(values))}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, required=True, help="quality.py's --work directory")
    ap.add_argument("--name", required=True, help="names the results file")
    ap.add_argument("--set", dest="sets", action="append", required=True, help="weighting.KEY=V")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--holdout", action="store_true", help="the held-out selection run only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for (bench, method), runs in finished_runs(args.work, args.holdout).items():
        trained = [run_summary(r)["final"]["avg"] for r in runs]
        again = [RunEvaluator(r).evaluate(args.sets)["avg"] for r in runs]
        rows.append({"bench": bench, "method": method, "runs": [r.name for r in runs],
                     "as_trained": trained, "reevaluated": again})  # fmt: skip
    lines = [
        f"# Quality re-evaluated: `{' '.join(args.sets)}`",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({time.perf_counter() - t0:.0f} s). The same "
        "final checkpoints, evaluated as trained and with the override; mean ± std over seeds, %.",
        "",
        "| benchmark | method | seeds | P as trained | TTP as trained | P re-evaluated | TTP re-evaluated |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            mean_std([a[k] for a in r[which]])
            for which in ("as_trained", "reevaluated")
            for k in ("P", "TTP")
        ]
        lines.append(
            f"| {r['bench']} | {r['method']} | {len(r['runs'])} | " + " | ".join(cells) + " |"
        )
    result = {"command": "python " + " ".join(sys.argv), "sets": args.sets, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quality-reeval-{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"quality-reeval-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
