"""Orchestration benchmark: Ray overhead, clients per actor, streaming FedAvg, memory drift.

    python benchmarks/orchestration.py               # default profile (~15-25 min on 2 cores)
    python benchmarks/orchestration.py --quick       # small sizes, for debugging

Writes `orchestration.json` (one key per figure, plus targets/details/meta) and `orchestration.md`
into `--out` (default benchmarks/results). Each figure runs in a fresh process so one figure's
memory and Ray session cannot colour the next.

1. overhead_ratio_N: FedIT round wall time through `RayExecutor` (1 actor) ÷ `InProcessExecutor`
   (both run the N clients one after the other), mean of the rounds after the first.
2. clients_registered / rss_per_dormant_client_mb: 2 client actors hosting 8 vs 508 clients
   after FedDPA-F (1 round + fine-tuning), so every client holds its shard, local adapter and bank.
3. aggregation_gbps / aggregation_peak_rss_mb_*: `RunningAverage` fed by a generator of updates.
4. memory_drift_*_pct: driver and actor RSS over a long FedIT run (2 actors).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

log = logging.getLogger("bench.orchestration")
MIB = 2**20
NUM_TASKS = 8  # tasks of the built-in synthetic federation
TARGETS = {
    "overhead_ratio": ("<=", 1.05),
    "clients_registered": (">=", 500),
    "rss_per_dormant_client_mb": ("<=", 2.0),
    "aggregation_gbps": (">=", 1.0),
    "memory_drift_driver_pct": ("<=", 2.0),
    "memory_drift_actors_pct": ("<=", 2.0),
}


@dataclass(frozen=True)
class Profile:
    # N -> (examples per client, rounds); the first round is warm-up and not averaged
    overhead: dict[int, tuple[int, int]] = field(
        default_factory=lambda: {8: (4, 5), 64: (4, 3), 500: (4, 2)}
    )
    registration: tuple[int, int] = (8, 508)
    registration_examples: int = 2
    fold_counts: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"minilm": (10, 100, 1000), "llama7b": (10, 100, 500)}
    )
    drift_rounds: int = 100
    drift_clients: int = 8
    drift_examples: int = 4


QUICK = Profile(
    overhead={8: (4, 2), 64: (4, 2)},
    registration=(8, 58),
    fold_counts={"minilm": (10, 100), "llama7b": (10, 50)},
    drift_rounds=12,
)


# ----------------------------------------------------------------------------- shared helpers


def fedit_config(
    n: int, per_client: int, rounds: int, num_actors: int, partition: str = "dirichlet", **top
):
    """FedIT on the synthetic tasks split over n clients (Dirichlet(1.0) or IID), ~per_client items
    each; Dirichlet(1.0) needs ~4 items per client on average to give every client one."""
    from feddpa.core.config import build_config

    return build_config(
        {
            "method": "fedit",
            "model": {"max_length": 32, "threads": 1},
            "data": {
                "partition": partition,
                "num_clients": n,
                "alpha": 1.0,
                "train_per_task": max(1, -(-n * per_client // NUM_TASKS)),
                "test_per_task": 1,
            },
            "federation": {"rounds": rounds, "fraction_fit": 1.0},
            "train": {"batch_size": 8, "micro_batch_size": 8},
            "eval": {"every": 0, "final": False},
            "ray": {"num_actors": num_actors, "cpus_per_actor": 0.5, "round_timeout_s": 3600},
            **top,
        }
    )


def run_training(cfg, executor_cls) -> list[dict]:
    """Train in a throw-away run directory; the per-round records of metrics.jsonl."""
    from feddpa.orchestrator.loop import train

    with tempfile.TemporaryDirectory(prefix="feddpa-bench-") as tmp:
        train(cfg, Path(tmp) / "run", executor_cls)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def start_ray() -> None:
    from feddpa.orchestrator.driver import init_ray

    init_ray("local")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def rss() -> int:
    return psutil.Process().memory_info().rss


# ----------------------------------------------------------------------------- 1. overhead


def overhead(profile: Profile) -> tuple[dict, dict]:
    from feddpa.orchestrator.executor import InProcessExecutor
    from feddpa.orchestrator.ray_executor import RayExecutor

    start_ray()
    figures, details = {}, {}
    for n, (per_client, rounds) in profile.overhead.items():
        cfg = fedit_config(n, per_client, rounds, num_actors=1)
        runs = {}
        for name, cls in (("in_process", InProcessExecutor), ("ray", RayExecutor)):
            log.info("overhead: %d clients, %d rounds, %s", n, rounds, name)
            t0 = time.perf_counter()
            records = run_training(cfg, cls)
            runs[name] = {
                "run_s": time.perf_counter() - t0,
                "round_wall_s": [r["timing"]["wall_s"] for r in records],
                "measured_round_s": mean([r["timing"]["wall_s"] for r in records[1:]]),
                "split_s": {
                    k: mean([r["timing"][k] for r in records[1:]])
                    for k in ("fit_s", "client_compute_s", "transfer_s", "aggregate_s")
                    + ("checkpoint_s",)
                },
            }
        ratio = runs["ray"]["measured_round_s"] / runs["in_process"]["measured_round_s"]
        figures[f"overhead_ratio_{n}"] = ratio
        details[f"overhead_{n}"] = {
            "clients": n,
            "train_per_task": cfg.data.train_per_task,
            "examples_per_client_mean": cfg.data.train_per_task * NUM_TASKS / n,
            "rounds": rounds,
            **runs,
        }
        log.info("overhead_ratio_%d = %.3f", n, ratio)
    return figures, details


# ----------------------------------------------------------------------------- 2. registration


def registration(profile: Profile) -> tuple[dict, dict]:
    """Actor RSS after FedDPA-F: each client then holds shard + local adapter + bank."""
    from feddpa.orchestrator.ray_executor import RayExecutor

    class StatsAtClose(RayExecutor):
        last: list[dict] = []

        def close(self) -> None:
            StatsAtClose.last = self.stats()
            super().close()

    start_ray()
    per_n = {}
    for n in profile.registration:
        per = profile.registration_examples
        cfg = fedit_config(n, per, 1, num_actors=2, partition="iid", method="feddpa_f")
        log.info("registration: %d clients on 2 actors (feddpa_f, 1 round + fine-tune)", n)
        t0 = time.perf_counter()
        records = run_training(cfg, StatsAtClose)
        stats = StatsAtClose.last
        per_n[n] = {
            "run_s": time.perf_counter() - t0,
            "round_wall_s": [r["timing"]["wall_s"] for r in records],
            "actor_rss_mb": [s["rss_bytes"] / MIB for s in stats],
            "clients_per_actor": [len(s["clients"]) for s in stats],
            "total_rss_mb": sum(s["rss_bytes"] for s in stats) / MIB,
        }
    small, large = profile.registration
    per_client = (per_n[large]["total_rss_mb"] - per_n[small]["total_rss_mb"]) / (large - small)
    adapter_mb = sum(math.prod(s) for s in minilm_shapes().values()) * 4 / MIB
    figures = {
        "clients_registered": sum(per_n[large]["clients_per_actor"]),
        "rss_per_dormant_client_mb": per_client,
    }
    details = {
        "registration": {
            "method": "feddpa_f, rounds=1 (FedIT round, then local fine-tune + bank)",
            "dormant_client_state": "shard examples + local adapter (float32) + bank",
            "local_adapter_mb": adapter_mb,
            "examples_per_client_mean": profile.registration_examples,
            "runs": {str(n): v for n, v in per_n.items()},
        }
    }
    return figures, details


# ----------------------------------------------------------------------------- 3. aggregation


def minilm_shapes() -> dict[str, tuple[int, ...]]:
    """Adapter tensor shapes of the real MiniLM dual-adapter model (fresh_adapter_state)."""
    from feddpa.core.adapters import fresh_adapter_state
    from feddpa.core.config import EvalConfig, LoraSettings, ModelConfig
    from feddpa.core.models import build_task_model

    model = build_task_model(ModelConfig(), LoraSettings(), EvalConfig())
    return {k: tuple(v.shape) for k, v in fresh_adapter_state(model.peft, 0).items()}


def llama7b_shapes(r: int = 8, hidden: int = 4096, layers: int = 32) -> dict[str, tuple[int, ...]]:
    prefix = "base_model.model.model.layers"
    return {
        f"{prefix}.{i}.self_attn.{m}.lora_{ab}.weight": (r, hidden) if ab == "A" else (hidden, r)
        for i in range(layers)
        for m in ("q_proj", "v_proj")
        for ab in ("A", "B")
    }


def updates(base: dict[str, torch.Tensor], n: int) -> Iterator[tuple[dict, float]]:
    """n fresh float32 updates, one at a time: update i is base * (i + 1), weight i % 7 + 1."""
    for i in range(n):
        yield {k: v * float(i + 1) for k, v in base.items()}, float(i % 7 + 1)


def fold(base: dict[str, torch.Tensor], n: int) -> dict:
    from feddpa.core.fedavg import RunningAverage

    avg, seconds, folded = RunningAverage(), 0.0, 0
    rss0 = peak = rss()
    for state, weight in updates(base, n):
        t0 = time.perf_counter()
        avg.add(state, weight)
        seconds += time.perf_counter() - t0
        folded += sum(v.numel() * v.element_size() for v in state.values())
        del state
        peak = max(peak, rss())
    t0 = time.perf_counter()
    result = avg.result()
    result_s = time.perf_counter() - t0
    weights = [float(i % 7 + 1) for i in range(n)]
    scale = sum(w * (i + 1) for i, w in enumerate(weights)) / sum(weights)
    exact = all(torch.allclose(result[k], base[k] * scale, rtol=1e-5) for k in base)
    return {
        "updates": n,
        "bytes_folded": folded,
        "fold_s": seconds,
        "result_s": result_s,
        "gbps": folded / seconds / 1e9,
        "peak_rss_growth_mb": (peak - rss0) / MIB,
        "update_mb": folded / n / MIB,
        "result_correct": exact,
    }


def aggregation(profile: Profile) -> tuple[dict, dict]:
    shapes = {"minilm": minilm_shapes(), "llama7b": llama7b_shapes()}
    gen = torch.Generator().manual_seed(0)
    figures, details = {}, {"aggregation": {"torch_threads": torch.get_num_threads()}}
    rates = []
    for size, counts in profile.fold_counts.items():
        base = {k: torch.randn(s, generator=gen) for k, s in shapes[size].items()}
        fold(base, 3)  # warm-up: allocator, first-touch pages
        for n in tqdm(counts, desc=f"fold {size}", unit="run"):
            out = fold(base, n)
            details["aggregation"][f"{size}_{n}"] = out
            figures[f"aggregation_peak_rss_mb_{size}_{n}"] = out["peak_rss_growth_mb"]
            rates.append(out["gbps"])
            log.info(
                "fold %s x%d: %.2f GB/s, peak +%.1f MiB",
                size,
                n,
                out["gbps"],
                out["peak_rss_growth_mb"],
            )
    figures["aggregation_gbps"] = min(rates)  # the slowest configuration
    return figures, details


# ----------------------------------------------------------------------------- 4. memory drift


def drift(profile: Profile) -> tuple[dict, dict]:
    from feddpa.orchestrator.ray_executor import RayExecutor

    class SamplingExecutor(RayExecutor):
        samples: list[dict] = []

        def fit(self, step, client_ids, global_state, stage):
            actors = [s["rss_bytes"] for s in self.stats()]
            SamplingExecutor.samples.append({"round": step + 1, "driver": rss(), "actors": actors})
            yield from super().fit(step, client_ids, global_state, stage)

    start_ray()
    rounds = profile.drift_rounds
    cfg = fedit_config(
        profile.drift_clients, profile.drift_examples, rounds, num_actors=2, keep_checkpoints=2
    )
    log.info("drift: %d rounds, %d clients on 2 actors", rounds, profile.drift_clients)
    t0 = time.perf_counter()
    records = run_training(cfg, SamplingExecutor)
    samples = SamplingExecutor.samples
    first = max(1, rounds // 10)  # RSS@10 of RSS@100
    at = {s["round"]: s for s in samples}

    def pct(a: int, b: int) -> float:
        return (b - a) / a * 100

    actor_pct = [pct(x, y) for x, y in zip(at[first]["actors"], at[rounds]["actors"], strict=True)]
    figures = {
        "memory_drift_driver_pct": pct(at[first]["driver"], at[rounds]["driver"]),
        "memory_drift_actors_pct": max(actor_pct),
    }
    details = {
        "drift": {
            "rounds": rounds,
            "from_round": first,
            "run_s": time.perf_counter() - t0,
            "round_wall_s_mean": mean([r["timing"]["wall_s"] for r in records[1:]]),
            "actor_drift_pct": actor_pct,
            "rss_mb": [
                {"round": s["round"], "driver": s["driver"] / MIB}
                | {f"actor{i}": a / MIB for i, a in enumerate(s["actors"])}
                for s in samples
            ],
        }
    }
    return figures, details


# ----------------------------------------------------------------------------- driver + report

FIGURES = {
    "aggregation": aggregation,
    "overhead": overhead,
    "registration": registration,
    "drift": drift,
}


def run_isolated(name: str, profile: Profile) -> tuple[dict, dict]:
    """Run one figure in a fresh spawned process (own heap, own Ray session)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(child, name, profile).result()


def child(name: str, profile: Profile) -> tuple[dict, dict]:
    setup_logging()
    return FIGURES[name](profile)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("feddpa").setLevel(logging.WARNING)


def machine_info() -> dict:
    import ray

    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def target_of(key: str) -> tuple[str, float] | None:
    for prefix, target in TARGETS.items():
        if key.startswith(prefix):
            return target
    return None


def verdict(key: str, value: float) -> str:
    target = target_of(key)
    if target is None:
        return "flat?" if key.startswith("aggregation_peak") else ""
    op, bound = target
    return "pass" if (value <= bound if op == "<=" else value >= bound) else "FAIL"


def render_markdown(figures: dict, det: dict, meta: dict) -> str:
    out = ["# Orchestration benchmark", "", f"Command: `{meta['command']}`", ""]
    out += [f"Machine: {meta['cpu_count']} CPUs ({meta['cpu_model']}), {meta['ram_gib']:.1f} GiB "
            f"RAM, Python {meta['python']}, torch {meta['torch']}, ray {meta['ray']}, "
            f"{meta['date']}; total {meta['total_s']:.0f} s, profile {meta['profile']}.", ""]  # fmt: skip
    out += ["| figure | value | target | |", "|---|---|---|---|"]
    for key, value in figures.items():
        target = target_of(key)
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        out.append(f"| `{key}` | {shown} | {' '.join(map(str, target)) if target else 'flat in N'} "
                   f"| {verdict(key, value)} |")  # fmt: skip
    over = [v for k, v in det.items() if k.startswith("overhead_")]
    if over:
        out += ["", "## Round times (mean of rounds after the first, s)", "",
                "| clients | ex/client | in-process | Ray | Ray fit | Ray client compute | "
                "Ray transfer | Ray aggregate | Ray checkpoint |", "|" + "---|" * 9]  # fmt: skip
        for d in over:
            s = d["ray"]["split_s"]
            out.append(
                f"| {d['clients']} | {d['examples_per_client_mean']:.1f} | "
                f"{d['in_process']['measured_round_s']:.2f} | {d['ray']['measured_round_s']:.2f} | "
                + " | ".join(f"{s[k]:.2f}" for k in
                             ("fit_s", "client_compute_s", "transfer_s", "aggregate_s", "checkpoint_s"))
                + " |"
            )  # fmt: skip
    if "aggregation" in det:
        out += ["", "## Streaming FedAvg", "", "| adapter | updates | MiB/update | GB/s | "
                "peak RSS growth (MiB) |", "|---|---|---|---|---|"]  # fmt: skip
        for key, d in det["aggregation"].items():
            if isinstance(d, dict):
                size = key.rsplit("_", 1)[0]
                out.append(f"| {size} | {d['updates']} | {d['update_mb']:.2f} | {d['gbps']:.2f} | "
                           f"{d['peak_rss_growth_mb']:.1f} |")  # fmt: skip
    for key in ("registration", "drift"):
        if key in det:
            brief = {k: v for k, v in det[key].items() if k != "rss_mb"}
            out += ["", f"## {key}", "", "```json", json.dumps(brief, indent=1), "```"]
    out += ["", "Full per-round data: `orchestration.json`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for debugging")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    args = parser.parse_args(argv)
    setup_logging()
    profile = QUICK if args.quick else Profile()
    t0 = time.perf_counter()
    figures, details = {}, {}
    for name in tqdm(args.only, desc="figures", unit="figure"):
        log.info("figure %s", name)
        f, d = run_isolated(name, profile)
        figures.update(f)
        details.update(d)
    meta = machine_info() | {
        "command": shlex.join(["python", "benchmarks/orchestration.py", *sys.argv[1:]]),
        "profile": "quick" if args.quick else "default",
        "profile_settings": {k: str(v) for k, v in asdict(profile).items()},
        "total_s": time.perf_counter() - t0,
    }
    targets = {k: list(v) for k, v in TARGETS.items()}
    result = figures | {"targets": targets, "details": details, "meta": meta}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "orchestration.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "orchestration.md").write_text(render_markdown(figures, details, meta))
    log.info("wrote %s in %.0f s", args.out / "orchestration.json", meta["total_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
