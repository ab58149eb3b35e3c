"""Quality benchmark: FedDPA-T / FedDPA-F against FedIT, Local and Centralized (P and TTP).

    python benchmarks/quality.py --profile full --seeds 0 1 2 --jobs 2   # both benchmarks, ≈ 75 min CPU
    python benchmarks/quality.py --profile quick --bench synthetic --seeds 0
    python benchmarks/quality.py --profile quick --bench shared_input --seeds 0
    python benchmarks/quality.py --profile device --seeds 0 1 2 --jobs 12  # the larger GPU setting

Benchmarks: `synthetic` (the built-in federation: conflict pairs + shared-knowledge tasks),
`shared_input` (the second built-in federation: every task reads the same kind of input and differs
only in its question, plus one conflict pair) and `dataset1` (the paper's dataset 1, its six
multiple-choice tasks, with MiniLM; the free-text tasks web_nlg_en and fix_punct need a generative
model and are not evaluated here). `--bench both` runs synthetic and dataset1, `--bench all` the
three. FedIT is read off FedDPA-F's federated rounds: FedDPA-F *is* FedIT followed by local
fine-tuning, so its rounds are FedIT's run, evaluated with the global adapter alone. The learning
rate and epochs were chosen on held-out training data (benchmarks/select_hparams.py →
results/hparams-*.json). FedDPA's weighting is chosen the same way before its runs train: a FedDPA-T
run on 80 % of each synthetic client's training data, every weighting variant scored on the other
20 % (never the test split), the best P + TTP wins. Runs are cached by config hash under --work, so
an interrupted benchmark resumes.
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
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from feddpa.core.config import build_config  # noqa: E402
from feddpa.core.storage import RunDir  # noqa: E402
from feddpa.orchestrator.executor import InProcessExecutor  # noqa: E402
from feddpa.orchestrator.loop import run_manifest, train  # noqa: E402
from feddpa.orchestrator.reevaluate import RunEvaluator  # noqa: E402
from feddpa.orchestrator.report import markdown_table, run_summary, write_report  # noqa: E402

DATASET1 = Path(__file__).resolve().parents[2] / "shared/data/feddpa/dataset1"  # read by path
# our default: the calibrated gate on the frozen model's representation of the whole prompt,
# scaled per client by its trust in its local adapter (chosen on its validation slice)
GATE = {
    "mode": "gate",
    "gate_quantile": 0.05,
    "gate_width": 1.0,
    "representation": "base",
    "trust": "validation",
}
VALIDATION_FRACTION = 0.2  # each client's validation slice (kept out of training for every method)
DEFAULT_WEIGHTING = GATE  # without the ablation (--no-ablation), and for Local/Centralized
TRAIN_CAP = 100  # the full profile's training items per client (dataset 1 has 300 per client)
MC_TASKS = ["definite_pronoun_resolution", "snli", "cola", "glue_qqp", "trec", "wic"]
METHODS = ["fedit", "feddpa_t", "feddpa_f", "local", "centralized"]
RUNS = ["feddpa_f", "feddpa_t", "local", "centralized"]  # fedit comes from feddpa_f's rounds
BUILT_IN = ["synthetic", "shared_input"]  # benchmarks that are a built-in data.source
GROUPS = {"both": ["synthetic", "dataset1"], "all": [*BUILT_IN, "dataset1"]}

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
    # The closest to the paper that fits one session on the 2-core CPU box (3 seeds, both
    # benchmarks, ≈ 70 min with --jobs 2): one task per client and every client every round as
    # in the paper, but 5 rounds (not 20), 1 epoch per phase (not 10), TRAIN_CAP training items
    # per client (not all 300) and 25 test items per task.
    "full": {
        "rounds": 5,
        "epochs": 1,
        "local_epochs": 1,
        "finetune_epochs": 1,
        "train_per_task": TRAIN_CAP,
        "test_cap": 25,
        "lr": 3e-3,  # the best lr at 1 epoch per phase for Local and FedIT on held-out data
    },
    # What ran on an H100 in an earlier session (results/raw/quality-full-*-device.json).
    "device": {
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
    weighting: dict | None = None,
) -> dict:
    data: dict = {
        "source": bench if bench in BUILT_IN else "synthetic",
        "train_per_task": profile["train_per_task"],
        "test_per_task": 50,
        "validation_fraction": VALIDATION_FRACTION,
        "seed": seed,
    }
    if bench == "dataset1":
        data = {
            "source": "feddpa",
            "path": str(dataset1),
            "tasks": MC_TASKS,
            "max_train_per_client": profile["train_per_task"],
            "validation_fraction": VALIDATION_FRACTION,
            "seed": seed,
        }
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
        # Local and Centralized never mix adapters: they keep the default, so the choice made on
        # held-out data does not change (and retrain) them.
        "weighting": dict(
            weighting if weighting and method.startswith("feddpa") else DEFAULT_WEIGHTING
        ),
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


def constant_answer(train: list) -> Callable:
    """The best constant prediction learned from `train`: the most common label when every item
    offers the same options, else the most common answer position (options differ per item)."""
    if len({frozenset(ex.options) for ex in train}) == 1:
        label = Counter(ex.output for ex in train).most_common(1)[0][0]
        return lambda ex: ex.output == label
    position = Counter(ex.options.index(ex.output) for ex in train).most_common(1)[0][0]
    return lambda ex: ex.options.index(ex.output) == position


def learnability_seed(local_run: Path, local_summary: dict) -> list[dict]:
    """Per task, one seed: zero-shot (base model), Local (own data), the constant answer."""
    evaluator = RunEvaluator(local_run)
    host = evaluator.executor.host
    zero = host.evaluate_global(host.initial_global())  # fresh adapters: B = 0, the base model
    test = evaluator.test
    rows = []
    for cid, info in enumerate(run_manifest(RunDir(local_run)).clients):
        task = sorted(info.tasks)[0]
        items = [i for i, ex in enumerate(test) if ex.task == task]
        correct = constant_answer(list(host.clients[cid].data))
        rows.append(
            {
                "task": task,
                "options": len(test[items[0]].options),
                "zero_shot": statistics.mean(zero.scores[i] for i in items),
                "local": local_summary["final"]["clients"][str(cid)]["P"],
                "majority": statistics.mean(float(correct(test[i])) for i in items),
            }
        )
    return rows


def learnability(local_runs: list[Path], local_summaries: list[dict]) -> list[dict]:
    """`learnability_seed` averaged over seeds."""
    per_seed = [learnability_seed(r, s) for r, s in zip(local_runs, local_summaries, strict=True)]
    return [
        {
            **rows[0],
            **{k: statistics.mean(r[k] for r in rows) for k in ("zero_shot", "local", "majority")},
        }
        for rows in zip(*per_seed, strict=True)
    ]


def learnable_tasks(rows: list[dict], margin: float = 0.05) -> list[str]:
    """Tasks where Local beats both zero-shot and the constant answer by `margin`."""
    return [r["task"] for r in rows if r["local"] >= max(r["zero_shot"], r["majority"]) + margin]


def over_tasks(per_seed: list[dict], tasks: list[str]) -> dict:
    """P and TTP restricted to `tasks`: clients of those tasks, scored on those tasks' items."""
    out = {}
    for method in METHODS:
        p_vals, ttp_vals = [], []
        for summary in per_seed:
            clients = [
                c
                for c in summary[method]["final"]["clients"].values()
                if set(c["tasks"]) <= set(tasks)
            ]
            p_vals.append(statistics.mean(c["P"] for c in clients))
            ttp_vals.append(
                statistics.mean(statistics.mean(c["per_task"][t] for t in tasks) for c in clients)
            )
        out[method] = {"P": statistics.mean(p_vals), "TTP": statistics.mean(ttp_vals)}
    return out


def holdout_config(raw: dict) -> dict:
    """The same run trained on 80 % of each client's data, evaluated on the other 20 %."""
    raw = json.loads(json.dumps(raw))
    raw["name"] = f"{raw['name']}-holdout"
    raw["data"]["holdout_fraction"] = 0.2
    raw["eval"]["every"] = 0
    return raw


def weighting_variants() -> list[tuple[str, dict]]:
    """(name, weighting keys) of every variant the held-out ablation scores: the reference
    modes in both directions and λ, the calibrated gate over its threshold quantile, width and
    floor/ceiling, and the two single adapters as references (never chosen)."""
    ref = [("global", m, 0.5) for m in ("sample", "bank", "bank_top5", "fixed")]
    ref += [("local", m, 0.5) for m in ("sample", "bank", "bank_top5")]  # fixed 0.5: same mix
    ref += [(d, "bank", lam) for d in ("global", "local") for lam in (0.25, 1.0)]
    out = []
    for direction, mode, lam in ref:
        w: dict = {"mode": "bank", "topk": 5} if mode == "bank_top5" else {"mode": mode}
        out.append((f"{mode} λ={lam} on {direction}", {**w, "weight_on": direction, "lam": lam}))
    for q in (0.05, 0.2):
        for width in (0.25, 1.0):
            gate = {"mode": "gate", "gate_quantile": q, "gate_width": width}
            out.append((f"gate q={q} width={width}", gate))
    out.append(
        (
            "gate q=0.05 width=0.25 in [0.1, 0.9]",
            {**GATE, "gate_width": 0.25, "gate_floor": 0.1, "gate_ceiling": 0.9},
        )
    )
    out.append(("gate q=0.05 width=1.0 token embeddings", {**GATE, "representation": "embedding"}))
    out += [("global adapter alone", {"mode": "global_only"})]
    out += [("local adapter alone", {"mode": "local_only"})]
    return out


def ablation(out: Path, raw: dict) -> list[dict]:
    """Weighting variants of one FedDPA-T run, scored on held-out training data (not test)."""
    run_dir = run_method(out, holdout_config(raw))
    cache = run_dir / "results" / "ablation.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    evaluator = RunEvaluator(run_dir)
    rows = []
    for name, weighting in weighting_variants():
        rec = evaluator.evaluate([f"weighting.{k}={v}" for k, v in weighting.items()])
        rows.append({"name": name, "weighting": weighting, **rec["avg"]})
    cache.write_text(json.dumps(rows, indent=1))
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
        "P_10pt_above_fedit": p >= agg["fedit"]["P"]["mean"] + 0.10,
        "best_of_both": p >= agg["fedit"]["P"]["mean"] + 0.10
        and ttp >= agg["fedit"]["TTP"]["mean"] - 0.01,
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
        "FedDPA's weighting (chosen on held-out training data, below): "
        f"`{json.dumps(result['weighting'])}`. Plots and per-client CSV: "
        "`quality-<profile>-<benchmark>/` beside this file.",
        "",
    ]
    if result["ablation_holdout"]:
        lines += [
            "## Weighting ablation",
            "",
            "FedDPA-T on the synthetic benchmark, seed 0, trained on 80 % of each client's training "
            "data and scored on the other 20 % (never the test split). P: a client's own held-out "
            "items; TTP: all clients' held-out items. The mixing variant with the best P + TTP is "
            "the one every FedDPA run below uses.",
            "",
            "| weighting | P | TTP | P + TTP |",
            "|---|---:|---:|---:|",
        ]
        for r in result["ablation_holdout"]:
            total = pct(r["P"] + r["TTP"])
            lines.append(f"| {r['name']} | {pct(r['P'])} | {pct(r['TTP'])} | {total} |")
        lines.append("")
    for bench, entry in result["benchmarks"].items():
        lines += [
            f"## {bench}",
            "",
            f"Seeds {entry['seeds']}. This invocation spent {result.get('train_wall_s', 0):.0f} s "
            f"wall time training and evaluating the runs not yet finished ({result['jobs']} parallel "
            f"processes; finished runs are reused), and {entry['wall_s']:.0f} s on this table. "
            f"Training items per client: {entry['train_items_per_client']}.",
            "",
        ]
        lines += [
            "| method | P (mean ± std) | TTP (mean ± std) | P per seed | TTP per seed |",
            "|---|---:|---:|---|---|",
        ]
        for m, a in entry["methods"].items():
            per = [", ".join(pct(v) for v in a[k]["per_seed"]) for k in ("P", "TTP")]
            lines.append(
                f"| {m} | {pct(a['P']['mean'])} ± {pct(a['P']['std'])} | "
                f"{pct(a['TTP']['mean'])} ± {pct(a['TTP']['std'])} | {per[0]} | {per[1]} |"
            )
        lines += [
            "",
            "Targets (FedDPA variant with the higher P): " + json.dumps(entry["targets"]),
            "",
        ]
        lines += ["Per client, seed " + str(entry["seeds"][0]) + ":", "", entry["table_seed0"]]
        if "learnability" in entry:
            lines += [
                "Learnability per task (test accuracy, %, mean over seeds; the constant answer is "
                "the most common training label, or answer position where options differ per item):",
                "",
                "| task | options | zero-shot | Local | constant answer |",
                "|---|---:|---:|---:|---:|",
            ]
            for r in entry["learnability"]:
                lines.append(
                    f"| {r['task']} | {r['options']} | {pct(r['zero_shot'])} | {pct(r['local'])} | {pct(r['majority'])} |"
                )
            lines.append("")
        if "learnable" in entry:
            lines += [
                f"Over the learnable tasks only ({', '.join(entry['learnable_tasks'])}: Local "
                "≥ 5 points above zero-shot and the constant answer), mean over seeds:",
                "",
                "| method | P | TTP |",
                "|---|---:|---:|",
            ]
            for m, a in entry["learnable"].items():
                lines.append(f"| {m} | {pct(a['P'])} | {pct(a['TTP'])} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def choose_weighting(rows: list[dict]) -> dict:
    """The mixing variant (not global/local alone) with the best sum of held-out P and TTP."""
    mixed = [r for r in rows if r["weighting"]["mode"] not in ("global_only", "local_only")]
    best = max(mixed, key=lambda r: r["P"] + r["TTP"])  # first of equals: the earlier variant
    return dict(best["weighting"])


def set_threads(jobs: int) -> None:
    """Parallel runs share the cores instead of oversubscribing them."""
    import torch

    threads = int(os.environ.get("FEDDPA_BENCH_THREADS", 0))  # e.g. 1 beside another benchmark
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // jobs))


def init_worker(jobs: int) -> None:
    """A pool worker: its share of the cores, and (Linux) it dies with the benchmark process, so
    stopping the benchmark never leaves orphaned training runs behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    set_threads(jobs)


def train_all(args: argparse.Namespace, cfg, benches: list[str], seeds_of) -> tuple[dict, list]:
    """Train every run; returns FedDPA's weighting (chosen on held-out data) and the ablation rows.

    Local and Centralized do not depend on the weighting, so they train while the held-out
    FedDPA-T run is trained and ablated; the FedDPA runs start once the weighting is chosen.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    work = args.work
    fixed = [cfg(b, s, m) for b in benches for s in seeds_of(b) for m in ("local", "centralized")]
    with ProcessPoolExecutor(args.jobs, get_context("spawn"), init_worker, (args.jobs,)) as pool:
        reference = cfg("synthetic", 0, "feddpa_t")
        holdout = (
            None if args.no_ablation else pool.submit(run_method, work, holdout_config(reference))
        )
        pending = [pool.submit(run_method, work, raw) for raw in fixed]
        rows: list[dict] = []
        weighting = dict(DEFAULT_WEIGHTING)
        if holdout is not None:
            holdout.result()
            set_threads(args.jobs + 1)  # this process now shares the cores with the pool
            rows = ablation(work, reference)
            weighting = choose_weighting(rows)
            print("weighting chosen on held-out data:", json.dumps(weighting), flush=True)
        pending += [
            pool.submit(run_method, work, cfg(b, s, m, weighting))
            for b in benches
            for s in seeds_of(b)
            for m in ("feddpa_f", "feddpa_t")
        ]
        for f in pending:
            f.result()  # waits; re-raises a failed run
    return weighting, rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bench", choices=[*BUILT_IN, "dataset1", *GROUPS], default="both")
    ap.add_argument("--profile", choices=list(PROFILES), default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--dataset1-seeds", type=int, nargs="+", help="seeds for dataset1 (default: --seeds)"
    )
    ap.add_argument("--model", default="minilm", help="model.path (default: the embedded MiniLM)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the held-out weighting ablation; FedDPA uses the reference weighting",
    )
    ap.add_argument(
        "--dataset1", type=Path, default=DATASET1, help="dataset 1 directory (read in place)"
    )
    ap.add_argument("--work", type=Path, help="where runs go (default: OUT/quality-PROFILE)")
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    profile = PROFILES[args.profile]
    args.work = args.work or args.out / f"quality-{args.profile}"
    benches = GROUPS.get(args.bench, [args.bench])
    dataset1 = args.dataset1.resolve()

    def cfg(bench: str, seed: int, method: str, weighting: dict | None = None) -> dict:
        return base_config(
            bench, profile, seed, method, args.model, args.device, dataset1, weighting
        )

    def seeds_of(bench: str) -> list[int]:
        return (args.dataset1_seeds or args.seeds) if bench == "dataset1" else args.seeds

    t0 = time.perf_counter()
    weighting, rows = train_all(args, cfg, benches, seeds_of)
    set_threads(1)
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "profile": {args.profile: profile},
        "train_wall_s": time.perf_counter() - t0,  # all training runs, in parallel with --jobs
        "jobs": args.jobs,
        "weighting": weighting,
        "ablation_holdout": rows,
        "benchmarks": {},
    }
    for bench in benches:
        start = time.perf_counter()
        per_seed, all_runs = [], []
        for seed in seeds_of(bench):
            runs = {m: run_method(args.work, cfg(bench, seed, m, weighting)) for m in RUNS}
            per_seed.append(summaries_for(runs))
            all_runs.append(runs)
        agg = aggregate(per_seed)
        entry = {
            "methods": agg,
            "targets": targets(agg),
            "seeds": seeds_of(bench),
            "table_seed0": markdown_table(per_seed[0]),
            "train_items_per_client": [
                c.num_examples for c in run_manifest(RunDir(all_runs[0]["local"])).clients
            ],
        }
        title = f"{bench} ({args.profile}, seed {seeds_of(bench)[0]})"
        write_report(per_seed[0], args.out / f"quality-{args.profile}-{bench}", title)
        if bench == "dataset1":
            entry["learnability"] = learnability(
                [r["local"] for r in all_runs], [s["local"] for s in per_seed]
            )
            entry["learnable_tasks"] = learnable_tasks(entry["learnability"])
            if entry["learnable_tasks"]:
                entry["learnable"] = over_tasks(per_seed, entry["learnable_tasks"])
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
