"""Choose the learning rate and local epochs on held-out training data (never on test).

    python benchmarks/select_hparams.py --bench synthetic --lrs 3e-4 1e-3 3e-3 --epochs 1 2

Trains Local and FedIT on 80 % of each client's training data and scores the held-out 20 %,
for every (lr, epochs) pair; writes `benchmarks/results/hparams-BENCH.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DATASET1, PROFILES, base_config, run_method  # noqa: E402

from feddpa.orchestrator.report import run_summary  # noqa: E402


def job(work: Path, raw: dict) -> dict:
    summary = run_summary(run_method(work, raw))
    avg = summary["final"]["avg"]
    return {
        "method": raw["method"],
        "lr": raw["train"]["lr"],
        "epochs": raw["train"]["epochs"],
        "P": avg["P"],
        "TTP": avg["TTP"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bench", choices=["synthetic", "dataset1"], default="synthetic")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataset1", type=Path, default=DATASET1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/feddpa-hparams"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    profile = {**PROFILES["full"], "rounds": args.rounds}
    raws = []
    for method, lr, epochs in itertools.product(["local", "fedit"], args.lrs, args.epochs):
        raw = base_config(
            args.bench, profile, 0, method, args.model, args.device, args.dataset1.resolve()
        )
        raw["name"] = f"{args.bench}-hp-lr{lr}-e{epochs}"
        raw["data"]["holdout_fraction"] = 0.2
        raw["train"].update(lr=lr, epochs=epochs, local_epochs=epochs)
        raw["eval"].update(every=0)
        raws.append(raw)
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        rows = list(pool.map(job, [args.work] * len(raws), raws))
    for r in rows:
        print(json.dumps(r))
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(sys.argv)
    (args.out / f"hparams-{args.bench}.json").write_text(
        json.dumps({"command": cmd, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
