"""Quality on a real pretrained causal LM, powered: SmolLM2-135M-Instruct on all eight tasks of the
paper's dataset 1, every test item generated and scored by ROUGE-1 (the paper's protocol), FedIT,
FedDPA-T, FedDPA-F and Local over several seeds, with paired differences and bootstrap intervals.

    python benchmarks/quality_causal.py --seeds 0 1 2      # each seed ≈ 45 min on the 2-core box
    python benchmarks/quality_causal.py --seeds 0 1 2 --report-only   # tables from finished seeds

The setting is `configs/smollm2_dataset1.yaml` (its header says how it is scaled from the paper),
25 test items per task (TTP over 200 items per client). Seeds are resumable: every run lives in
`--work/s<seed>/<method>` and a killed benchmark continues from its last committed round.

One global trajectory serves three methods: FedIT is FedDPA-T's global adapter alone (read from
the same run, evaluated once for all clients), and FedDPA-F forks FedDPA-T's committed rounds
(its federated rounds are FedIT's, bit for bit: tests/unit/test_runner.py) and runs only its
fine-tuning step. Paired differences use the same test items for every method and seed
(benchmarks/paired.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from causal_profile import profile_seed, zero_shot  # noqa: E402
from causal_report import render  # noqa: E402
from quality import DATASET1  # noqa: E402

from feddpa.core.config import build_config, save_config  # noqa: E402
from feddpa.orchestrator.executor import InProcessExecutor  # noqa: E402
from feddpa.orchestrator.loop import train  # noqa: E402
from feddpa.orchestrator.paired import paired  # noqa: E402
from feddpa.orchestrator.report import run_summary  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_dataset1.yaml"
METHODS = ["fedit", "feddpa_t", "feddpa_f", "local"]
COMPARISONS = [
    ("feddpa_t", "fedit"),
    ("feddpa_f", "fedit"),
    ("feddpa_t", "local"),
    ("feddpa_f", "local"),
]


def config(method: str, seed: int, args: argparse.Namespace) -> dict:
    """configs/smollm2_dataset1.yaml for `method` and `seed`, with the command line's overrides."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(method=method, seed=seed, name="causal")
    raw["data"] = {**raw["data"], "path": str(args.dataset1.resolve()), "seed": seed}
    raw["eval"] = {**raw["eval"], "max_test_per_task": args.test_per_task}
    for item in args.set:
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        raw[section] = {**raw.get(section, {}), key: yaml.safe_load(value)}
    return raw


def done(run_dir: Path) -> bool:
    return (run_dir / "done").is_file()


def run(run_dir: Path, raw: dict) -> Path:
    """Train (or resume) one run in-process; a finished run is reused."""
    if done(run_dir):
        return run_dir
    resume = (run_dir / "checkpoints").is_dir()
    train(build_config(raw), run_dir, InProcessExecutor, resume=resume)
    (run_dir / "done").write_text("ok\n")
    return run_dir


def fork_finetune(source: Path, run_dir: Path, raw: dict) -> Path:
    """FedDPA-F from FedDPA-T's committed rounds: the same global trajectory, then its own
    fine-tuning step (resumed as the next step of the forked run)."""
    if done(run_dir):
        return run_dir
    if not (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("done", "*.lock"))
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # FedDPA-T's own evaluations
        save_config(build_config(raw), run_dir / "config.yaml")
    train(build_config(raw), run_dir, InProcessExecutor, resume=True)
    (run_dir / "done").write_text("ok\n")
    return run_dir


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Path]:
    root = args.work / f"s{seed}"
    t0 = time.perf_counter()
    runs = {"feddpa_t": run(root / "feddpa_t", config("feddpa_t", seed, args))}
    runs["feddpa_f"] = fork_finetune(
        runs["feddpa_t"], root / "feddpa_f", config("feddpa_f", seed, args)
    )
    runs["local"] = run(root / "local", config("local", seed, args))
    wall = root / "wall_s.json"
    if not wall.is_file():  # the first complete pass (a resumed seed's figure is a lower bound)
        wall.write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
    return runs


def clients_of(record: dict) -> dict[str, dict]:
    """client id -> its record, with its (first) task as "task"."""
    return {cid: {**c, "task": c["tasks"][0]} for cid, c in record["clients"].items()}


def seed_records(runs: dict[str, Path]) -> dict[str, dict]:
    final = {m: run_summary(p)["final"] for m, p in runs.items()}
    return {
        "fedit": clients_of(final["feddpa_t"]["global_only"]),
        "feddpa_t": clients_of(final["feddpa_t"]),
        "feddpa_f": clients_of(final["feddpa_f"]),
        "local": clients_of(final["local"]),
    }


def method_table(per_seed: list[dict[str, dict]], tasks: list[str]) -> dict:
    """Per method: P and TTP (mean over seeds and per seed) and each task's P."""
    out = {}
    for m in METHODS:
        p = [statistics.mean(c["P"] for c in s[m].values()) for s in per_seed]
        ttp = [statistics.mean(c["TTP"] for c in s[m].values()) for s in per_seed]
        by_task = {
            t: statistics.mean(c["P"] for s in per_seed for c in s[m].values() if c["task"] == t)
            for t in sorted(set(tasks))
        }
        out[m] = {
            "P": {"mean": statistics.mean(p), "per_seed": p},
            "TTP": {"mean": statistics.mean(ttp), "per_seed": ttp},
            "P_per_task": by_task,
        }
    return out


def test_tasks(run_dir: Path) -> list[str]:
    from feddpa.datasets import read_manifest, read_test

    data = str(run_dir / "data")
    return [ex.task for ex in read_test(data, read_manifest(data))]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dataset1", type=Path, default=DATASET1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, default=Path("runs/quality-causal"))
    ap.add_argument("--test-per-task", type=int, default=25, help="test items per task")
    ap.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE for every run")
    ap.add_argument("--report-only", action="store_true", help="tables from finished seeds only")
    ap.add_argument("--name", default="quality-causal", help="results file stem under --out")
    ap.add_argument(
        "--matmul-gflops",
        type=float,
        help="the fp32 matmul limit to compare training with (GFLOP/s); default: measured now, "
        "which on a busy machine understates it",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    seeds, per_seed, profiles = [], [], {}
    for seed in args.seeds:
        root = args.work / f"s{seed}"
        if args.report_only and not all(done(root / m) for m in ("feddpa_t", "feddpa_f", "local")):
            print(f"seed {seed}: not finished, left out", file=sys.stderr)
            continue
        runs = run_seed(seed, args)
        seeds.append(seed)
        per_seed.append(seed_records(runs))
        profiles[str(seed)] = profile_seed(
            runs, root, args.matmul_gflops
        )  # JSON keys: as written, as read
    if not seeds:
        print("no finished seed", file=sys.stderr)
        return 1
    first = args.work / f"s{seeds[0]}" / "feddpa_t"
    tasks = test_tasks(first)
    result = {
        "command": "python " + " ".join(sys.argv),
        "config": str(CONFIG.relative_to(CONFIG.parents[1])),
        "overrides": args.set,
        "test_per_task": args.test_per_task,
        "seeds": seeds,
        "threads": torch.get_num_threads(),
        "methods": method_table(per_seed, tasks),
        "paired": {
            f"{a}_vs_{b}": paired([s[a] for s in per_seed], [s[b] for s in per_seed], tasks)
            for a, b in COMPARISONS
        },
        "zero_shot": zero_shot(first, args.work / "zero_shot.json", tasks),
        "gate": {
            m: {
                str(seed): {
                    cid: {k: c[k] for k in ("task", "local_weight_own", "local_weight_other")}
                    for cid, c in s[m].items()
                }
                for seed, s in zip(seeds, per_seed, strict=True)
            }
            for m in ("feddpa_t", "feddpa_f")
        },
        "profile": profiles,
        "report_s": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.name}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
