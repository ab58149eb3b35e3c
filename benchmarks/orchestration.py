"""Orchestration benchmark: Ray overhead, clients per actor, streaming FedAvg, memory drift.

    python benchmarks/orchestration.py             # default profile (~20-25 min on 2 cores)
    python benchmarks/orchestration.py --quick     # small sizes, for debugging

Writes `orchestration.json` (a top-level key per figure, plus targets/details/meta) and
`orchestration.md` into `--out`. Each figure runs in a fresh spawned process (own heap, own Ray).
1. overhead_ratio_N: FedIT round wall time, `RayExecutor` with 1 actor ÷ `InProcessExecutor`.
2. clients_registered, rss_per_dormant_client_mb: 2 actors hosting 8 vs 508 FedDPA-F clients.
3. aggregation_gbps, aggregation_peak_rss_mb_*: `RunningAverage` fed flat updates (as off the wire).
4. memory_drift_{driver,actors}_pct: RSS at the start of rounds R/10 and R of a long FedIT run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import product
from multiprocessing import get_context
from pathlib import Path
from statistics import fmean

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import torch  # noqa: E402
from bench_common import fmt, machine_info, write_results  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from feddpa.core.adapters import fresh_adapter_state  # noqa: E402
from feddpa.core.config import EvalConfig, LoraSettings, ModelConfig, build_config  # noqa: E402
from feddpa.core.fedavg import FlatState, RunningAverage  # noqa: E402
from feddpa.core.models import build_task_model  # noqa: E402
from feddpa.orchestrator.driver import init_ray  # noqa: E402
from feddpa.orchestrator.executor import InProcessExecutor  # noqa: E402
from feddpa.orchestrator.loop import train  # noqa: E402
from feddpa.orchestrator.ray_executor import RayExecutor  # noqa: E402

log = logging.getLogger("bench.orchestration")
MIB = 2**20
NUM_TASKS = 8  # tasks of the built-in synthetic federation
SPLIT = ("fit_s", "client_compute_s", "transfer_s", "aggregate_s", "checkpoint_s")
Figure = tuple[float, str, float]  # value, "<=" or ">=", target


@dataclass(frozen=True)
class Profile:
    # (clients, examples/client, rounds), round 1 = warm-up; Dirichlet(1.0) needs >=4 ex/client
    overhead: tuple[tuple[int, int, int], ...] = ((8, 4, 5), (64, 4, 2), (500, 4, 2))
    registration: tuple[int, int] = (8, 508)
    registration_examples: int = 2  # IID split: each client gets exactly 2
    fold_minilm: tuple[int, ...] = (10, 100, 1000)
    fold_llama7b: tuple[int, ...] = (10, 100, 500)
    drift: tuple[int, int, int] = (100, 8, 2)  # rounds, clients, examples per client


QUICK = Profile(((8, 4, 2), (64, 4, 2)), (8, 58), 2, (10, 100), (10, 50), (12, 8, 2))


def fedit_config(n: int, per_client: int, rounds: int, actors: int, split="dirichlet", **top):
    """FedIT on the synthetic tasks over n clients (Dirichlet(1.0) or IID), ~per_client each."""
    data = {"partition": split, "num_clients": n, "alpha": 1.0, "test_per_task": 1}
    data["train_per_task"] = math.ceil(n * per_client / NUM_TASKS)
    return build_config(
        {
            "method": "fedit",
            "model": {"max_length": 32, "threads": 1},
            "data": data,
            "federation": {"rounds": rounds, "fraction_fit": 1.0},
            "train": {"batch_size": 8, "micro_batch_size": 8},
            "eval": {"every": 0, "final": False},
            "ray": {"num_actors": actors, "cpus_per_actor": 0.5, "round_timeout_s": 3600},
            **top,
        }
    )


def run_training(cfg, executor_cls) -> list[dict]:
    """Train in a throw-away run directory; returns the per-round records of metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="feddpa-bench-") as tmp:
        train(cfg, Path(tmp) / "run", executor_cls)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def rss() -> int:
    return psutil.Process().memory_info().rss


def timed_run(cfg, executor_cls) -> dict:
    load, t0 = os.getloadavg()[0], time.perf_counter()
    records = run_training(cfg, executor_cls)
    later = records[1:] or records
    return {
        "run_s": time.perf_counter() - t0,
        "loadavg_1min_before_after": [load, os.getloadavg()[0]],
        "round_wall_s": [r["timing"]["wall_s"] for r in records],
        "measured_round_s": fmean([r["timing"]["wall_s"] for r in later]),
        "min_round_s": min(r["timing"]["wall_s"] for r in later),
        "split_s": {k: fmean([r["timing"][k] for r in later]) for k in SPLIT},
    }


def overhead(profile: Profile) -> tuple[dict[str, Figure], dict]:
    init_ray("local")
    figures, details = {}, {}
    for n, per_client, rounds in profile.overhead:
        cfg = fedit_config(n, per_client, rounds, actors=1)
        runs = {}
        for name, cls in (("in_process", InProcessExecutor), ("ray", RayExecutor)):
            log.info("overhead: %d clients, %d rounds, %s", n, rounds, name)
            runs[name] = timed_run(cfg, cls)
        local, ray_ = runs["in_process"], runs["ray"]
        ratio = ray_["measured_round_s"] / local["measured_round_s"]
        rs, ls = ray_["split_s"], local["split_s"]
        # Ray's round with the in-process clients' compute: orchestration cost without CPU noise
        matched = ray_["measured_round_s"] - rs["client_compute_s"] + ls["client_compute_s"]
        matched /= local["measured_round_s"]
        figures[f"overhead_ratio_{n}"] = (ratio, "<=", 1.05)
        figures[f"overhead_ratio_{n}_compute_matched"] = (matched, "<=", 1.05)
        details[f"overhead_{n}"] = {
            "clients": n,
            "examples_per_client_mean": cfg.data.train_per_task * NUM_TASKS / n,
            "ratio_of_min_rounds": ray_["min_round_s"] / local["min_round_s"],
            "ratio_compute_matched": matched,
            "ray_gap_per_client_ms": (rs["fit_s"] - rs["client_compute_s"]) / n * 1e3,
            **runs,
        }
        log.info("overhead_ratio_%d = %.3f", n, ratio)
    return figures, details


class ProbedExecutor(RayExecutor):
    """Records driver and actor RSS at the start of every fit, and the actors' stats at close."""

    samples: list[dict] = []
    at_close: list[dict] = []

    def fit(self, step, client_ids, global_state, stage):
        actors = [s["rss_bytes"] for s in self.stats()]
        ProbedExecutor.samples.append({"round": step + 1, "driver": rss(), "actors": actors})
        yield from super().fit(step, client_ids, global_state, stage)

    def close(self) -> None:
        ProbedExecutor.at_close = self.stats()
        super().close()


def registration(profile: Profile) -> tuple[dict[str, Figure], dict]:
    init_ray("local")
    runs = {}
    for n in profile.registration:
        per = profile.registration_examples
        cfg = fedit_config(n, per, 1, actors=2, split="iid", method="feddpa_f")
        log.info("registration: %d clients on 2 actors (feddpa_f: 1 round + fine-tune)", n)
        t0 = time.perf_counter()
        records = run_training(cfg, ProbedExecutor)  # at close every client is complete
        runs[n] = {
            "run_s": time.perf_counter() - t0,
            "round_wall_s": [r["timing"]["wall_s"] for r in records],
            "actor_rss_mb": [s["rss_bytes"] / MIB for s in ProbedExecutor.at_close],
            "clients_per_actor": [len(s["clients"]) for s in ProbedExecutor.at_close],
        }
    small, large = profile.registration
    growth = sum(runs[large]["actor_rss_mb"]) - sum(runs[small]["actor_rss_mb"])
    figures = {
        "clients_registered": (sum(runs[large]["clients_per_actor"]), ">=", 500),
        "rss_per_dormant_client_mb": (growth / (large - small), "<=", 2.0),
    }
    details = {"method": "feddpa_f, rounds=1: a FedIT round, then local fine-tuning + bank"}
    details["dormant_client_state"] = f"{per} examples, local adapter (float32), bank ({per} x 384)"
    return figures, {"registration": details | {"runs": {str(n): v for n, v in runs.items()}}}


def minilm_shapes() -> dict[str, tuple[int, ...]]:
    """Adapter tensor shapes of the real MiniLM dual-adapter model (`fresh_adapter_state`)."""
    model = build_task_model(ModelConfig(), LoraSettings(), EvalConfig())
    return {k: tuple(v.shape) for k, v in fresh_adapter_state(model.peft, 0).items()}


def llama7b_shapes(r: int = 8, hidden: int = 4096, layers: int = 32) -> dict[str, tuple[int, ...]]:
    prefix = "base_model.model.model.layers"
    return {
        f"{prefix}.{i}.self_attn.{m}.lora_{ab}.weight": (r, hidden) if ab == "A" else (hidden, r)
        for i, m, ab in product(range(layers), ("q_proj", "v_proj"), "AB")
    }


def updates(base: FlatState, n: int) -> Iterator[tuple[FlatState, float]]:
    """n fresh float32 updates as the driver gets them off the wire (one flat buffer each), one
    at a time: update i is base * (i + 1), weight i % 7 + 1."""
    for i in range(n):
        yield FlatState(base.layout, base.data * float(i + 1)), float(i % 7 + 1)


def fold(base: dict[str, torch.Tensor], n: int) -> dict:
    flat = FlatState.of(base)
    avg, seconds, folded = RunningAverage(), 0.0, 0
    samples, rss0 = [], rss()
    for state, weight in updates(flat, n):
        t0 = time.perf_counter()
        avg.add(state, weight)
        seconds += time.perf_counter() - t0
        folded += state.nbytes
        del state
        samples.append(rss())
    result = avg.result()
    weights = [float(i % 7 + 1) for i in range(n)]
    scale = sum(w * (i + 1) for i, w in enumerate(weights)) / sum(weights)
    return {
        "updates": n,
        "update_mb": folded / n / MIB,
        "fold_s": seconds,
        "gbps": folded / seconds / 1e9,
        "gbps_dict_input": dict_fold_gbps(base, min(n, 100)),
        "peak_rss_growth_mb": (max(samples) - rss0) / MIB,
        "rss_growth_after_first_update_mb": (max(samples) - samples[0]) / MIB,
        "result_correct": all(torch.allclose(result[k], base[k] * scale) for k in base),
    }


def dict_fold_gbps(base: dict[str, torch.Tensor], n: int) -> float:
    """The same fold fed tensor dicts (the in-process executor's path: flattened in `add`)."""
    avg, seconds = RunningAverage(), 0.0
    for i in range(n):
        state = {k: v * float(i + 1) for k, v in base.items()}
        t0 = time.perf_counter()
        avg.add(state, 1.0)
        seconds += time.perf_counter() - t0
    return n * FlatState.of(base).nbytes / seconds / 1e9


def aggregation(profile: Profile) -> tuple[dict[str, Figure], dict]:
    shapes = {"minilm": minilm_shapes(), "llama7b": llama7b_shapes()}
    gen = torch.Generator().manual_seed(0)
    figures, runs = {}, {}
    for size, counts in (("minilm", profile.fold_minilm), ("llama7b", profile.fold_llama7b)):
        base = {k: torch.randn(s, generator=gen) for k, s in shapes[size].items()}
        fold(base, 3)  # warm-up: allocator, first-touch pages
        for n in tqdm(counts, desc=f"fold {size}", unit="run"):
            out = runs[f"{size}_{n}"] = fold(base, n)
            # O(1) working set: float64 sum (2x) + the incoming update (1x) + a float64 term (2x)
            peak = out["peak_rss_growth_mb"]
            figures[f"aggregation_peak_rss_mb_{size}_{n}"] = (peak, "<=", 5 * out["update_mb"])
            log.info("fold %s x%d: %.2f GB/s, +%.1f MiB", size, n, out["gbps"], peak)
    for size in ("minilm", "llama7b"):
        rate = min(r["gbps"] for k, r in runs.items() if k.startswith(size))
        figures[f"aggregation_gbps_{size}"] = (rate, ">=", 1.0)
    figures["aggregation_gbps"] = (min(r["gbps"] for r in runs.values()), ">=", 1.0)  # slowest
    return figures, {"aggregation": {"torch_threads": torch.get_num_threads(), **runs}}


def drift(profile: Profile) -> tuple[dict[str, Figure], dict]:
    init_ray("local")
    rounds, clients, per_client = profile.drift
    cfg = fedit_config(clients, per_client, rounds, actors=2, keep_checkpoints=2)
    log.info("drift: %d rounds, %d clients on 2 actors", rounds, clients)
    t0 = time.perf_counter()
    records = run_training(cfg, ProbedExecutor)
    at = {s["round"]: s for s in ProbedExecutor.samples}
    first = max(1, rounds // 10)

    def pct(a: int, b: int) -> float:
        return (b - a) / a * 100

    actor_pct = [pct(a, b) for a, b in zip(at[first]["actors"], at[rounds]["actors"], strict=True)]
    figures = {
        "memory_drift_driver_pct": (pct(at[first]["driver"], at[rounds]["driver"]), "<=", 2.0),
        "memory_drift_actors_pct": (max(actor_pct), "<=", 2.0),
    }
    series = [
        {"round": s["round"], "driver_mb": s["driver"] / MIB}
        | {f"actor{i}_mb": a / MIB for i, a in enumerate(s["actors"])}
        for s in ProbedExecutor.samples
    ]
    return figures, {
        "drift": {
            "rounds": rounds,
            "rss_mb_at": {first: series[first - 1], rounds: series[-1]},
            "run_s": time.perf_counter() - t0,
            "round_wall_s_mean": fmean([r["timing"]["wall_s"] for r in records[1:]]),
            "actor_drift_pct": actor_pct,
            "rss_per_round": series,
        }
    }


FIGURES = dict(aggregation=aggregation, overhead=overhead, registration=registration, drift=drift)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("feddpa").setLevel(logging.WARNING)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]


def passes(value: float, op: str, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound


def overhead_row(d: dict) -> list:
    local, ray_ = d["in_process"], d["ray"]
    row = [d["clients"], d["examples_per_client_mean"], local["measured_round_s"]]
    row += [ray_["measured_round_s"], d["ratio_of_min_rounds"], d["ratio_compute_matched"]]
    return row + [d["ray_gap_per_client_ms"], *(ray_["split_s"][k] for k in SPLIT)]


def render_markdown(figures: dict[str, Figure], det: dict, meta: dict) -> str:
    out = ["# Orchestration benchmark", "", f"Command: `{meta['command']}` ({meta['profile']})", ""]
    out += [
        f"Machine: {meta['cpu_count']} CPUs ({meta['cpu_model']}), {meta['ram_gib']:.1f} GiB RAM, "
        f"Python {meta['python']}, torch {meta['torch']}, ray {meta['ray']}; {meta['date']}; "
        f"total {meta['total_s']:.0f} s; 1-min load average at start/end "
        f"{meta['loadavg_start_end']} (other work shared the machine).",
        "",
    ]
    rows = [[f"`{k}`", v, f"{op} {fmt(b)}", "pass" if passes(v, op, b) else "FAIL"]
            for k, (v, op, b) in figures.items()]  # fmt: skip
    out += table(["figure", "value", "target", ""], rows)
    if rows := [overhead_row(d) for k, d in det.items() if k.startswith("overhead_")]:
        head = ["clients", "ex/client", "in-process", "Ray", "ratio of min rounds"]
        head += ["compute-matched ratio", "Ray gap/client (ms)", *[f"Ray {k}" for k in SPLIT]]
        out += [
            "",
            "## Round wall time (s), mean of rounds after the first",
            "",
            *table(head, rows),
        ]
    if "aggregation" in det:
        head = ["adapter", "updates", "MiB/update", "GB/s", "peak RSS growth (MiB)"]
        keys = ("updates", "update_mb", "gbps", "peak_rss_growth_mb")
        rows = [[k.rsplit("_", 1)[0], *(d[x] for x in keys)]
                for k, d in det["aggregation"].items() if isinstance(d, dict)]  # fmt: skip
        out += ["", "## Streaming FedAvg (`RunningAverage.add`, one update at a time)", ""]
        out += table(head, rows)
    for key in ("registration", "drift"):
        if key in det:
            brief = {k: v for k, v in det[key].items() if k != "rss_per_round"}
            out += ["", f"## {key}", "", "```json", json.dumps(brief, indent=1), "```"]
    return "\n".join([*out, "", "Per-round data: `orchestration.json`.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for debugging")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output dir")
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    args = parser.parse_args(argv)
    setup_logging()
    profile = QUICK if args.quick else Profile()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    figures, details = {}, {}
    for name in tqdm(args.only, desc="figures", unit="figure"):
        # a fresh spawned process per figure: its own heap and its own Ray session
        spawn = get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn, initializer=setup_logging) as pool:
            f, d = pool.submit(FIGURES[name], profile).result()
        figures.update(f)
        details.update(d)
    meta = machine_info() | {
        "command": shlex.join(["python", "benchmarks/orchestration.py", *sys.argv[1:]]),
        "profile": "quick" if args.quick else "default",
        "profile_settings": {k: str(v) for k, v in asdict(profile).items()},
        "total_s": time.perf_counter() - t0,
        "loadavg_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    write_results(
        args.out, "orchestration", figures, details, meta, render_markdown(figures, details, meta)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
