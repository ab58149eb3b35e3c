"""Privacy benchmark (issue 21): the cost of client-level DP per method, and the overhead of secure
aggregation on a round.

    # P / TTP of FedIT, FedDPA-T, FedDPA-F at ε ∈ {1, 3, 8, ∞} (δ = 1e-5), quality.py's settings
    python benchmarks/privacy.py quality --profile full --bench synthetic dataset1 --seeds 0 1 2
    # round wall time: plain vs secure aggregation vs secure aggregation + distributed DP noise
    python benchmarks/privacy.py overhead --clients 8 64 256 --rounds 3
    python benchmarks/privacy.py quality --profile quick --bench synthetic --seeds 0 --epsilons 8 inf --tiny
    python benchmarks/privacy.py overhead --clients 8 --rounds 2 --tiny       # smoke runs

quality: each (benchmark, seed, ε) trains FedDPA-F and FedDPA-T with `privacy.dp.target_epsilon`
ε (the noise multiplier is calibrated by the accountant for the profile's rounds; every client
every round, so no amplification by sampling) and a fixed clip C (`--clip`); FedIT is FedDPA-F's
federated rounds (its global adapter alone), as in quality.py. ε = ∞ is the run without DP.
Writes privacy-quality.{json,md}.

overhead: FedIT over N clients (IID synthetic data, 4 items each), one round timed after a warm-up
round, three ways: plain FedAvg, secure aggregation (pairwise masks, `--neighbors` for SecAgg+),
secure aggregation + DP with client-placed noise. Writes privacy-overhead.{json,md}; the target is
≤ 1.2× the plain round at 64 clients.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import machine_info, write_results  # noqa: E402
from orchestration import fedit_config, timed_run  # noqa: E402
from quality import DATASET1, PROFILES, base_config, fedit_from, run_method  # noqa: E402

from feddpa.core.config import build_config  # noqa: E402
from feddpa.orchestrator.executor import InProcessExecutor  # noqa: E402
from feddpa.orchestrator.report import run_summary  # noqa: E402

log = logging.getLogger("bench.privacy")
DELTA = 1e-5
SHOWN = ("fedit", "feddpa_t", "feddpa_f")


def with_privacy(raw: dict, eps: float, clip: float, noise: str) -> dict:
    if math.isinf(eps):
        return raw
    dp = {"enabled": True, "target_epsilon": eps, "delta": DELTA, "clip": clip, "noise": noise}
    sa = {"enabled": noise == "client"}  # distributed noise is private only under masking
    fed = {**raw["federation"], "min_fit_clients": 2} if sa["enabled"] else raw["federation"]
    return {**raw, "federation": fed, "privacy": {"dp": dp, "secure_aggregation": sa}}


def quality_cell(args, bench: str, seed: int, eps: float) -> dict:
    """{method: {P, TTP}} and the run's privacy record for one (benchmark, seed, ε)."""
    profile = dict(PROFILES[args.profile])
    if args.tiny:
        profile.update(train_per_task=8, test_cap=4, rounds=2)
    out, runs = {}, {}
    for method in ("feddpa_f", "feddpa_t"):
        raw = base_config(bench, profile, seed, method, args.model, "auto", args.dataset1)
        if args.tiny:
            raw["data"]["test_per_task"] = 4
        runs[method] = run_method(args.work, with_privacy(raw, eps, args.clip, args.noise))
        summary = run_summary(runs[method])
        out[method] = summary["final"]["avg"]
        out["privacy"] = summary.get("privacy", {})
    records = [
        json.loads(ln) for ln in (runs["feddpa_f"] / "metrics.jsonl").read_text().split("\n") if ln
    ]
    out["fedit"] = fedit_from({"records": [r for r in records if r.get("eval")]})["final"]["avg"]
    return out


def quality(args) -> int:
    t0 = time.perf_counter()
    cells: list[dict] = []
    for bench in args.bench:
        for eps in args.epsilons:
            for seed in args.seeds:
                log.info("quality: %s ε=%s seed %d", bench, eps, seed)
                cell = quality_cell(args, bench, seed, eps)
                cells.append({"bench": bench, "epsilon": eps, "seed": seed, **cell})
    rows = []
    for bench in args.bench:
        for eps in args.epsilons:
            mine = [c for c in cells if c["bench"] == bench and c["epsilon"] == eps]
            for m in SHOWN:
                for k in ("P", "TTP"):
                    vals = [100 * c[m][k] for c in mine]
                    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    rows.append((bench, eps, m, k, statistics.fmean(vals), sd))
    lines = [
        "# Privacy: P / TTP by ε (client-level DP on the global adapter)\n",
        f"δ = {DELTA:g}; clip C = {args.clip}; noise by the {args.noise}; profile {args.profile}; "
        f"seeds {args.seeds}. Mean ± sd over seeds, in %.\n",
        "| benchmark | ε | method | P | TTP |",
        "|---|---:|---|---:|---:|",
    ]
    table = {(b, e, m, k): (mu, sd) for b, e, m, k, mu, sd in rows}
    for bench in args.bench:
        for eps in args.epsilons:
            for m in SHOWN:
                p, t = table[(bench, eps, m, "P")], table[(bench, eps, m, "TTP")]
                lines.append(
                    f"| {bench} | {eps:g} | {m} | {p[0]:.2f} ± {p[1]:.2f} | {t[0]:.2f} ± {t[1]:.2f} |"
                )
    figures = {f"{b}_eps{e:g}_{m}_{k}": (mu, None, 0.0) for b, e, m, k, mu, _ in rows}
    meta = {"total_s": time.perf_counter() - t0, "argv": sys.argv, **machine_info()}
    write_results(
        args.out, "privacy-quality", figures, {"cells": cells}, meta, "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    return 0


def overhead_configs(n: int, rounds: int, args) -> dict:
    plain = fedit_config(n, 4, rounds, actors=args.actors, split="iid").to_dict()
    plain["federation"]["min_fit_clients"] = 2
    if args.tiny:
        plain["model"]["max_length"] = 16
    secure = {"enabled": True, "neighbors": args.neighbors}
    dp = {"enabled": True, "noise_multiplier": 1.0, "clip": 0.1, "noise": "client"}
    return {
        "plain": plain,
        "secagg": {**plain, "privacy": {"secure_aggregation": secure}},
        "secagg_dp": {**plain, "privacy": {"secure_aggregation": secure, "dp": dp}},
    }


def overhead(args) -> int:
    t0 = time.perf_counter()
    executor: type = InProcessExecutor
    if args.executor == "ray":
        from feddpa.orchestrator.driver import init_ray
        from feddpa.orchestrator.ray_executor import RayExecutor

        init_ray("local")
        executor = RayExecutor
    details, figures = {}, {}
    for n in args.clients:
        runs = {}
        for name, raw in overhead_configs(n, args.rounds, args).items():
            log.info("overhead: %d clients, %s", n, name)
            runs[name] = timed_run(build_config(raw), executor)
        base = runs["plain"]["measured_round_s"]
        for name in ("secagg", "secagg_dp"):
            figures[f"{name}_ratio_{n}"] = (
                runs[name]["measured_round_s"] / base,
                "<=" if n == 64 else None,
                1.2,
            )
        details[str(n)] = runs
    lines = [
        "# Privacy: secure-aggregation overhead on a FedIT round\n",
        f"executor {args.executor}; neighbours {args.neighbors or 'all pairs'}; round wall time after "
        "a warm-up round.\n",
        "| clients | plain (s) | secagg (s) | × | secagg + DP (s) | × | secagg aggregate_s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.clients:
        r = details[str(n)]
        p, s, d = (r[k]["measured_round_s"] for k in ("plain", "secagg", "secagg_dp"))
        lines.append(
            f"| {n} | {p:.2f} | {s:.2f} | {s / p:.2f} | {d:.2f} | {d / p:.2f} | "
            f"{r['secagg']['split_s']['aggregate_s']:.3f} |"
        )
    meta = {"total_s": time.perf_counter() - t0, "argv": sys.argv, **machine_info()}
    write_results(args.out, "privacy-overhead", figures, details, meta, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--bench", nargs="+", choices=["synthetic", "dataset1"], default=["synthetic"])
    q.add_argument("--profile", choices=list(PROFILES), default="quick")
    q.add_argument("--seeds", type=int, nargs="+", default=[0])
    q.add_argument("--epsilons", type=float, nargs="+", default=[1, 3, 8, math.inf])
    q.add_argument("--clip", type=float, default=0.1, help="privacy.dp.clip C")
    q.add_argument("--noise", choices=["server", "client"], default="server")
    q.add_argument("--model", default="minilm")
    q.add_argument("--dataset1", type=Path, default=DATASET1)
    q.add_argument("--work", type=Path, help="where runs go (default: OUT/privacy-PROFILE)")
    q.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    o = sub.add_parser("overhead")
    o.add_argument("--clients", type=int, nargs="+", default=[8, 64, 256])
    o.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is a warm-up")
    o.add_argument("--neighbors", type=int, default=None, help="SecAgg+ ring neighbours")
    o.add_argument("--executor", choices=["in_process", "ray"], default="in_process")
    o.add_argument("--actors", type=int, default=1)
    o.add_argument("--tiny", action="store_true")
    for p in (q, o):
        p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.what == "quality":
        args.work = args.work or args.out / f"privacy-{args.profile}"
        return quality(args)
    return overhead(args)


if __name__ == "__main__":
    sys.exit(main())
