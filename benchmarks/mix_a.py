"""What holds FedDPA-T's P below Local's? The local phase trains the local adapter under the mix
a·ΔL + (1−a)·stopgrad(ΔG) (a = 0.5), while the gate then uses it at a local weight near 1 on the
client's own inputs. This trains FedDPA-T with other values of a on the held-out split of the
quality benchmark's full profile (synthetic, seed 0: 80 % of each client's training data, scored
on the other 20 %, never the test split) and scores each run with the gate and with either
adapter alone.

    python benchmarks/mix_a.py --jobs 2 --work runs/quality-full     # ≈ 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from quality import (
    DATASET1,
    PROFILES,
    base_config,
    holdout_config,
    init_worker,
    pct,
    run_method,
    set_threads,
)

from feddpa.orchestrator.reevaluate import RunEvaluator

# the held-out run's weighting when the ablation trained it (keeps its cache key; the weighting
# is not used in training, and every score below sets its own)
TRAINED_WITH = {"mode": "gate", "gate_quantile": 0.05, "gate_width": 0.25}
SCORES = {
    "gate (default)": ["weighting.mode=gate", "weighting.gate_width=1.0"],
    "global adapter alone": ["weighting.mode=global_only"],
    "local adapter alone": ["weighting.mode=local_only"],
}


def config(mix_a: float) -> dict:
    raw = base_config("synthetic", PROFILES["full"], 0, "feddpa_t", "minilm", "auto", DATASET1)
    raw["weighting"] = dict(TRAINED_WITH)
    if mix_a != 0.5:  # 0.5 is the default: the ablation's own held-out run
        raw["train"] = {**raw["train"], "mix_a": mix_a}
    return holdout_config(raw)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mix-a", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/quality-full"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, get_context("spawn"), init_worker, (args.jobs,)) as pool:
        futures = {a: pool.submit(run_method, args.work, config(a)) for a in args.mix_a}
        runs = {a: f.result() for a, f in futures.items()}
    set_threads(1)
    rows = []
    for a, run in runs.items():
        evaluator = RunEvaluator(run)
        for name, sets in SCORES.items():
            avg = evaluator.evaluate(sets)["avg"]
            rows.append({"mix_a": a, "scored_with": name, "run": run.name, **avg})
    lines = [
        "# FedDPA-T's local-phase mix a, on held-out data",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({time.perf_counter() - t0:.0f} s). Synthetic, full "
        "profile, seed 0, trained on 80 % of each client's training data, scored on the other 20 %.",
        "",
        "| a | scored with | held-out P | held-out TTP | P + TTP |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        total = pct(r["P"] + r["TTP"])
        lines.append(
            f"| {r['mix_a']} | {r['scored_with']} | {pct(r['P'])} | {pct(r['TTP'])} | {total} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mix-a.json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
    (args.out / "mix-a.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
