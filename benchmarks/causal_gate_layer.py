"""Which layer should the gate read on a causal LM? Re-evaluates the causal benchmark's finished
FedDPA-F runs with the gate's representation taken at another depth (`weighting.layer`), no
retraining: the trained adapters and each client's trust stay, only the banks are rebuilt at the
new layer. Paired against FedIT (the same run's global adapter alone) and against the default
(final-layer) gate, on the same items and seeds.

    python benchmarks/causal_gate_layer.py --layer 0.5          # after quality_causal.py
    python benchmarks/causal_gate_layer.py --layer 0.5 --report-only

The layer was chosen on held-out data (benchmarks/gate_signal_causal.py: own-vs-other AUC on the
clients' validation slices, 0.996 at the middle layer vs 0.896 at the last); this measures what
that choice does to P and TTP on the test split. Each seed's evaluation is cached in
`--work/s<seed>/feddpa_f-layer<L>.json` (resumable).
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

from quality_causal import clients_of, test_tasks  # noqa: E402

from feddpa.orchestrator.paired import paired  # noqa: E402
from feddpa.orchestrator.reevaluate import RunEvaluator  # noqa: E402
from feddpa.orchestrator.report import run_summary  # noqa: E402


def evaluated(run_dir: Path, layer: float, cache: Path) -> dict:
    """FedDPA-F's final evaluation with the gate at `layer` (cached)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    record = RunEvaluator(run_dir).evaluate([f"weighting.layer={layer}"])
    record["eval_s"] = time.perf_counter() - t0
    cache.write_text(json.dumps(record))
    return record


def fmt(d: dict) -> str:
    """A paired difference in points of ROUGE-1 (the records hold fractions)."""
    return f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layer", type=float, default=0.5, help="fraction of the model's depth")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/quality-causal"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--report-only", action="store_true", help="only seeds already evaluated")
    args = ap.parse_args()
    name = f"layer{args.layer:g}"
    per_seed, seeds = [], []
    for seed in args.seeds:
        run_dir = args.work / f"s{seed}" / "feddpa_f"
        cache = args.work / f"s{seed}" / f"feddpa_f-{name}.json"
        if not (run_dir / "metrics.jsonl").is_file():
            print(f"seed {seed}: no finished FedDPA-F run at {run_dir}; skipped", file=sys.stderr)
            continue
        if args.report_only and not cache.is_file():
            print(
                f"seed {seed}: not evaluated at layer {args.layer:g} yet; skipped", file=sys.stderr
            )
            continue
        final = run_summary(run_dir)["final"]
        layered = evaluated(run_dir, args.layer, cache)
        per_seed.append(
            {
                "fedit": clients_of(final["global_only"]),
                "final_layer": clients_of(final),
                name: clients_of(layered),
                "eval_s": layered.get("eval_s"),
            }
        )
        seeds.append(seed)
    if not per_seed:
        print("nothing evaluated yet", file=sys.stderr)
        return 1
    tasks = test_tasks(args.work / f"s{seeds[0]}" / "feddpa_f")
    methods = ("fedit", "final_layer", name)
    means = {
        m: {
            k: statistics.mean(statistics.mean(c[k] for c in s[m].values()) for s in per_seed)
            for k in ("P", "TTP")
        }
        for m in methods
    }
    other = {  # mean local weight on other tasks' items, the gate's leak
        m: statistics.mean(
            statistics.mean(c.get("local_weight_other", float("nan")) for c in s[m].values())
            for s in per_seed
        )
        for m in ("final_layer", name)
    }
    comparisons = {
        f"{name}_vs_fedit": paired(
            [s[name] for s in per_seed], [s["fedit"] for s in per_seed], tasks
        ),
        f"{name}_vs_final_layer": paired(
            [s[name] for s in per_seed], [s["final_layer"] for s in per_seed], tasks
        ),
        "final_layer_vs_fedit": paired(
            [s["final_layer"] for s in per_seed], [s["fedit"] for s in per_seed], tasks
        ),
    }
    out = {
        "layer": args.layer,
        "seeds": seeds,
        "methods": means,
        "local_weight_other": other,
        "paired": {k: {m: v[m] for m in ("P", "TTP")} for k, v in comparisons.items()},
        "eval_s": [s["eval_s"] for s in per_seed],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-causal-{name}"  # "layer0.5": no with_suffix (it would eat ".5")
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# FedDPA-F's gate at layer {args.layer:g} of SmolLM2 (vs the final layer)",
        "",
        f"Command: `python benchmarks/causal_gate_layer.py --layer {args.layer:g} "
        f"--seeds {' '.join(map(str, seeds))}` after `benchmarks/quality_causal.py`. The same "
        "trained runs re-evaluated (adapters and trust unchanged, banks rebuilt at the layer); "
        "seeds " + ", ".join(map(str, seeds)) + ", 25 test items per task.",
        "",
        "| gate (ROUGE-1, %) | P | TTP |",
        "|---|---:|---:|",
        *(f"| {m} | {100 * means[m]['P']:.2f} | {100 * means[m]['TTP']:.2f} |" for m in methods),
        "",
        "Mean local weight the gate puts on other tasks' items (its leak): final layer "
        f"{other['final_layer']:.2f}, layer {args.layer:g} {other[name]:.2f}.",
        "",
        "Paired differences (95 % bootstrap interval over test items, stratified by task):",
        "",
        "| comparison | P | TTP |",
        "|---|---|---|",
        *(f"| {k} | {fmt(v['P'])} | {fmt(v['TTP'])} |" for k, v in comparisons.items()),
        "",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
