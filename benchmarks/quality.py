"""Quality benchmark: FedDPA-T / FedDPA-F against FedIT, Local and Centralized (P and TTP).

    python benchmarks/quality.py --profile full --seeds 0 1 2            # both benchmarks
    python benchmarks/quality.py --profile quick --bench synthetic --seeds 0

Benchmarks: `synthetic` (the built-in federation: conflict pairs + shared-knowledge tasks) and
`dataset1` (the paper's dataset 1, its six multiple-choice tasks, with MiniLM; the free-text tasks
web_nlg_en and fix_punct need a generative model and are not evaluated here). FedIT is read off
FedDPA-F's federated rounds: FedDPA-F *is* FedIT followed by local fine-tuning, so its rounds are
FedIT's run, evaluated with the global adapter alone. The learning rate and epochs were chosen on
held-out training data (benchmarks/select_hparams.py → results/hparams-*.json), and the weighting
ablation runs on a held-out 20 % of each client's training data, never on the test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from feddpa.core.config import build_config  # noqa: E402
from feddpa.orchestrator.executor import InProcessExecutor  # noqa: E402
from feddpa.orchestrator.loop import run_manifest, train  # noqa: E402
from feddpa.orchestrator.reevaluate import RunEvaluator  # noqa: E402
from feddpa.orchestrator.report import markdown_table, run_summary, write_report  # noqa: E402

DATASET1 = Path(__file__).resolve().parents[2] / "shared/data/feddpa/dataset1"  # read by path
MC_TASKS = ["definite_pronoun_resolution", "snli", "cola", "glue_qqp", "trec", "wic"]
METHODS = ["fedit", "feddpa_t", "feddpa_f", "local", "centralized"]
RUNS = ["feddpa_f", "feddpa_t", "local", "centralized"]  # fedit comes from feddpa_f's rounds

PROFILES = {
    "quick": {
        "rounds": 2,
        "epochs": 1,
        "local_epochs": 1,
        "finetune_epochs": 1,
        "train_per_task": 60,
        "test_cap": 20,
        "lr": 1e-3,
    },
    "full": {
        "rounds": 5,
        "epochs": 2,
        "local_epochs": 2,
        "finetune_epochs": 2,
        "train_per_task": 300,
        "test_cap": None,
        "lr": 1e-3,
    },
}


def base_config(
    bench: str,
    profile: dict,
    seed: int,
    method: str,
    model_path: str,
    device: str,
    dataset1: Path = DATASET1,
) -> dict:
    data: dict = {
        "source": "synthetic",
        "train_per_task": profile["train_per_task"],
        "test_per_task": 50,
        "seed": seed,
    }
    if bench == "dataset1":
        data = {"source": "feddpa", "path": str(dataset1), "tasks": MC_TASKS, "seed": seed}
    return {
        "name": bench,
        "seed": seed,
        "method": method,
        "model": {
            "path": model_path,
            "max_length": 128 if bench == "dataset1" else 64,
            "device": device,
        },
        "data": data,
        "federation": {"rounds": profile["rounds"]},
        "train": {
            "epochs": profile["epochs"],
            "local_epochs": profile["local_epochs"],
            "finetune_epochs": profile["finetune_epochs"],
            "batch_size": 16,
            "micro_batch_size": 16,
            "lr": profile["lr"],
        },
        "weighting": {"mode": "bank", "weight_on": "global", "lam": 0.5},
        "eval": {"every": 1, "batch_size": 128, "max_test_per_task": profile["test_cap"]},
    }


def run_method(out: Path, raw: dict) -> Path:
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = out / "runs" / f"{raw['name']}-{raw['method']}-s{raw['seed']}-{digest}"
    if (run_dir / "results" / "done").is_file():
        return run_dir  # reuse a finished run (the benchmark can be resumed)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    train(build_config(raw), run_dir, InProcessExecutor)
    (run_dir / "results").mkdir(exist_ok=True)
    (run_dir / "results" / "done").write_text("ok")
    return run_dir


def fedit_from(feddpa_f: dict) -> dict:
    """FedIT = FedDPA-F's federated rounds (global adapter alone), before its fine-tuning step."""
    rounds = [c for c in feddpa_f["records"] if c["eval"]["weighting"] == "global_only"]
    last = rounds[-1]["eval"]
    return {
        "final": last,
        "curve": [[r["round"], r["eval"]["avg"]["P"], r["eval"]["avg"]["TTP"]] for r in rounds],
    }


def summaries_for(runs: dict[str, Path]) -> dict:
    out = {m: run_summary(p) for m, p in runs.items()}
    records = [
        json.loads(ln) for ln in (runs["feddpa_f"] / "metrics.jsonl").read_text().splitlines()
    ]
    out["fedit"] = fedit_from({"records": [r for r in records if r.get("eval")]})
    return {m: out[m] for m in METHODS}


def learnability(run_dirs: dict[str, Path], local_summary: dict) -> list[dict]:
    """Per task: zero-shot (base model), Local (own data), and the majority-class baseline."""
    evaluator = RunEvaluator(run_dirs["local"])
    host = evaluator.executor.host
    zero = host.evaluate_global(host.initial_global())  # fresh adapters: B = 0, the base model
    test = evaluator.test
    rows = []
    for cid, info in enumerate(run_manifest(run_dirs["local"]).clients):
        task = sorted(info.tasks)[0]
        items = [i for i, ex in enumerate(test) if ex.task == task]
        train_labels = (
            Counter(ex.output for ex in host.clients.get(cid, None).data)
            if cid in host.clients
            else Counter()
        )
        majority = train_labels.most_common(1)[0][0] if train_labels else ""
        rows.append(
            {
                "task": task,
                "options": len(test[items[0]].options),
                "zero_shot": statistics.mean(zero.scores[i] for i in items),
                "local": local_summary["final"]["clients"][str(cid)]["P"],
                "majority": statistics.mean(float(test[i].output == majority) for i in items),
            }
        )
    return rows


def holdout_config(raw: dict) -> dict:
    """The same run trained on 80 % of each client's data, evaluated on the other 20 %."""
    raw = json.loads(json.dumps(raw))
    raw["name"] = f"{raw['name']}-holdout"
    raw["data"]["holdout_fraction"] = 0.2
    raw["eval"]["every"] = 0
    return raw


def ablation(out: Path, raw: dict) -> list[dict]:
    """Weighting variants of one FedDPA-T run, scored on held-out training data (not test)."""
    evaluator = RunEvaluator(run_method(out, holdout_config(raw)))
    variants = [
        ("global", m, lam) for m in ("sample", "bank", "bank_top5", "fixed") for lam in (0.5,)
    ]
    variants += [("local", m, 0.5) for m in ("sample", "bank", "bank_top5", "fixed")]
    variants += [("global", "bank", lam) for lam in (0.25, 1.0)] + [
        ("local", "bank", lam) for lam in (0.25, 1.0)
    ]
    variants += [("global", "global_only", 0.5), ("global", "local_only", 0.5)]
    rows = []
    for direction, mode, lam in variants:
        sets = [f"weighting.weight_on={direction}", f"weighting.lam={lam}"]
        sets += (
            ["weighting.mode=bank", "weighting.topk=5"]
            if mode == "bank_top5"
            else [f"weighting.mode={mode}"]
        )
        rec = evaluator.evaluate(sets)
        rows.append(
            {
                "weight_on": direction,
                "mode": mode,
                "lam": lam,
                "P": rec["avg"]["P"],
                "TTP": rec["avg"]["TTP"],
            }
        )
    return rows


def aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        entry = {}
        for key in ("P", "TTP"):
            vals = [s[method]["final"]["avg"][key] for s in per_seed]
            entry[key] = {
                "mean": statistics.mean(vals),
                "std": statistics.pstdev(vals),
                "per_seed": vals,
            }
        entry["per_client"] = {
            cid: {
                k: statistics.mean(s[method]["final"]["clients"][cid][k] for s in per_seed)
                for k in ("P", "TTP")
            }
            for cid in per_seed[0][method]["final"]["clients"]
        }
        out[method] = entry
    return out


def targets(agg: dict) -> dict:
    best = max(("feddpa_t", "feddpa_f"), key=lambda m: agg[m]["P"]["mean"])
    p, ttp = agg[best]["P"]["mean"], agg[best]["TTP"]["mean"]
    return {
        "feddpa_variant": best,
        "P_above_fedit": p > agg["fedit"]["P"]["mean"],
        "P_within_1pt_of_local": p >= agg["local"]["P"]["mean"] - 0.01,
        "TTP_above_local": ttp > agg["local"]["TTP"]["mean"],
        "TTP_within_1pt_of_fedit": ttp >= agg["fedit"]["TTP"]["mean"] - 0.01,
    }


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def render_markdown(result: dict) -> str:
    lines = [
        "# Quality benchmark",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Profile: `{json.dumps(result['profile'])}`",
        "",
    ]
    for bench, entry in result["benchmarks"].items():
        lines += [
            f"## {bench}",
            "",
            f"Seeds {entry['seeds']}; all training runs took {result.get('train_wall_s', 0):.0f} s "
            f"wall time (in parallel processes), this benchmark's evaluation {entry['wall_s']:.0f} s.",
            "",
        ]
        lines += ["| method | P (mean ± std) | TTP (mean ± std) |", "|---|---:|---:|"]
        for m, a in entry["methods"].items():
            lines.append(
                f"| {m} | {pct(a['P']['mean'])} ± {pct(a['P']['std'])} | {pct(a['TTP']['mean'])} ± {pct(a['TTP']['std'])} |"
            )
        lines += [
            "",
            "Targets (FedDPA variant with the higher P): " + json.dumps(entry["targets"]),
            "",
        ]
        lines += ["Per client, seed " + str(entry["seeds"][0]) + ":", "", entry["table_seed0"]]
        if "learnability" in entry:
            lines += [
                "Learnability per task (test accuracy, %):",
                "",
                "| task | options | zero-shot | Local | majority class |",
                "|---|---:|---:|---:|---:|",
            ]
            for r in entry["learnability"]:
                lines.append(
                    f"| {r['task']} | {r['options']} | {pct(r['zero_shot'])} | {pct(r['local'])} | {pct(r['majority'])} |"
                )
            lines.append("")
        if "ablation_holdout" in entry:
            lines += [
                "Weighting ablation (FedDPA-T, seed 0, scored on 20 % held-out training data):",
                "",
                "| weight on | mode | λ | P | TTP |",
                "|---|---|---:|---:|---:|",
            ]
            for r in entry["ablation_holdout"]:
                lines.append(
                    f"| {r['weight_on']} | {r['mode']} | {r['lam']} | {pct(r['P'])} | {pct(r['TTP'])} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bench", choices=["synthetic", "dataset1", "both"], default="both")
    ap.add_argument("--profile", choices=list(PROFILES), default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--dataset1-seeds", type=int, nargs="+", help="seeds for dataset1 (default: --seeds)"
    )
    ap.add_argument("--model", default="minilm", help="model.path (default: the embedded MiniLM)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument(
        "--dataset1", type=Path, default=DATASET1, help="dataset 1 directory (read in place)"
    )
    ap.add_argument("--work", type=Path, help="where runs go (default: OUT/quality-PROFILE)")
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    profile = PROFILES[args.profile]
    work = args.work or args.out / f"quality-{args.profile}"
    benches = ["synthetic", "dataset1"] if args.bench == "both" else [args.bench]

    def cfg(bench: str, seed: int, method: str) -> dict:
        return base_config(
            bench, profile, seed, method, args.model, args.device, args.dataset1.resolve()
        )

    def seeds_of(bench: str) -> list[int]:
        return (args.dataset1_seeds or args.seeds) if bench == "dataset1" else args.seeds

    jobs = [cfg(b, seed, m) for b in benches for seed in seeds_of(b) for m in RUNS]
    if "synthetic" in benches and not args.no_ablation:
        jobs.insert(len(args.seeds) * len(RUNS), holdout_config(cfg("synthetic", 0, "feddpa_t")))
    t0 = time.perf_counter()
    if args.jobs > 1:  # train everything first, in parallel processes; the loop below reuses runs
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(run_method, [work] * len(jobs), jobs))
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "profile": {args.profile: profile},
        "train_wall_s": time.perf_counter() - t0,  # all training runs, in parallel with --jobs
        "benchmarks": {},
    }
    for bench in benches:
        start = time.perf_counter()
        per_seed, first_runs = [], {}
        for seed in seeds_of(bench):
            runs = {
                m: run_method(work, base_config(bench, profile, seed, m, args.model, args.device))
                for m in RUNS
            }
            per_seed.append(summaries_for(runs))
            first_runs = first_runs or runs
        agg = aggregate(per_seed)
        entry = {
            "methods": agg,
            "targets": targets(agg),
            "seeds": args.seeds,
            "wall_s": time.perf_counter() - start,
        }
        entry["table_seed0"] = markdown_table(per_seed[0])
        write_report(per_seed[0], work / bench, f"{bench} ({args.profile}, seed {args.seeds[0]})")
        if bench == "dataset1":
            entry["learnability"] = learnability(first_runs, per_seed[0]["local"])
        if bench == "synthetic" and not args.no_ablation:
            entry["ablation_holdout"] = ablation(work, cfg(bench, 0, "feddpa_t"))
        entry["wall_s"] = time.perf_counter() - start
        result["benchmarks"][bench] = entry
        write_results(args.out, args.profile, result)  # after each benchmark: partial runs keep it
        print(
            json.dumps(
                {
                    bench: {
                        m: (round(a["P"]["mean"], 4), round(a["TTP"]["mean"], 4))
                        for m, a in agg.items()
                    }
                }
            )
        )
    return 0


def write_results(out: Path, profile: str, result: dict) -> None:
    name = "quality" if profile == "full" else f"quality-{profile}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(render_markdown(result))


if __name__ == "__main__":
    sys.exit(main())
