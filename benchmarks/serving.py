"""Serving benchmark: dual-adapter cost, weighting latency, resident clients, Ray Serve HTTP load.

    .venv/bin/python benchmarks/serving.py            # default profile (~12 min on 2 cores)
    .venv/bin/python benchmarks/serving.py --quick    # short points, for debugging

Unless given `--run-dir` / `--many-run-dir`, it trains two FedDPA-T runs (synthetic data, 2 rounds,
eval off, in-process): `main` (8 clients, one task each, 60 items/task) and `many` (IID, 120
clients x 2 items). Writes `serving.json` (a key per figure + targets/details/meta) and `serving.md`.
1. throughput_ratio_dynamic_vs_base: `ServingEngine.run_batch`, 16 requests of 8 clients (the
   calibrated gate) vs the same model with adapters disabled scoring the same 16 examples (MiniLM,
   multiple choice); throughput_ratio_gate_embedding_vs_base: the gate on token embeddings (an
   `embedding` run: the same data, weighting.representation=embedding). throughput_ratio_dynamic_vs_base_generate: the same for generation (beam 4, 80 new
   tokens) on a MiniLM-size Llama (random init, trained 1 round so every client has adapters).
2. latency_p50_ratio_dynamic_vs_fixed: single requests through the engine, gate vs fixed (and the
   gate on token embeddings vs fixed).
3. clients_resident_per_replica, rss_per_resident_client_mb, cold_load_p50_ms, cold_load_p95_ms,
   cold_load_p50_ms_last20 (the last 20 loads: 100+ clients resident; `many` run).
4. load_*: closed-loop HTTP clients against Ray Serve on 127.0.0.1: a concurrency curve, its knee
   (throughput grows < 10 % beyond it), then a long run at the knee.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from statistics import median

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from bench_common import fmt, machine_info, write_results  # noqa: E402
from ray import serve  # noqa: E402

from feddpa.core.adapters import GLOBAL_ONLY, Mix  # noqa: E402
from feddpa.core.config import build_config  # noqa: E402
from feddpa.core.models.mc import option_rows  # noqa: E402
from feddpa.datasets import read_manifest, read_test  # noqa: E402
from feddpa.orchestrator.driver import RAY_ENV  # noqa: E402
from feddpa.orchestrator.executor import InProcessExecutor  # noqa: E402
from feddpa.orchestrator.loop import train  # noqa: E402
from feddpa.serving.deployment import ServeOptions, start  # noqa: E402
from feddpa.serving.engine import Request, ServingEngine  # noqa: E402

log = logging.getLogger("bench.serving")
MIB = 2**20
Figure = tuple[float, str | None, float | None]  # value, "<=" / ">=" / None (no target), target


@dataclass(frozen=True)
class Profile:
    batch: int = 16
    warmup: int = 3  # batches per variant before timing
    reps: int = 7  # timed repetitions (median), all variants interleaved
    loops: int = 4  # batches per repetition
    latency_n: int = 80  # single requests per mode
    many_clients: int = 120
    curve: tuple[int, ...] = (1, 2, 4, 8, 16)
    curve_s: float = 8.0
    load_s: float = 60.0
    gen_batch: int = 8
    gen_beams: int = 4  # the paper's generation setting: beam 4, 80 new tokens
    gen_tokens: int = 80
    gen_reps: int = 3  # a batch takes ~10 s on 1 thread: fewer, single-batch repetitions


QUICK = Profile(
    warmup=1, reps=3, loops=2, latency_n=20, curve_s=3.0, load_s=15.0, gen_tokens=16, gen_reps=2
)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def train_run(
    name: str, data: dict, root: Path, weighting: dict | None = None
) -> tuple[Path, dict]:
    cfg = {"name": name, "method": "feddpa_t", "model": {"kind": "multiple_choice", "threads": 1},
           "data": data, "federation": {"rounds": 2}, "eval": {"every": 0, "final": False},
           "weighting": weighting or {}}  # fmt: skip
    run_dir, t0, load0 = root / name, time.perf_counter(), loadavg()
    log.info("training %s (%s)", name, data)
    train(build_config(cfg), run_dir, InProcessExecutor)
    return run_dir, {"data": data, "train_s": time.perf_counter() - t0, "loadavg": [load0, loadavg()]}  # fmt: skip


def own_task_items(run_dir: Path, rng: random.Random, per_client: int) -> list[Request]:
    """per_client test items per client, each of the client's own (main) task."""
    manifest, test = read_manifest(str(run_dir / "data")), read_test(str(run_dir / "data"))
    out = []
    for info in manifest.clients:
        task = max(info.tasks, key=info.tasks.__getitem__)
        pool = [ex for ex in test if ex.task == task]
        out += [Request(info.client_id, ex) for ex in rng.sample(pool, per_client)]
    return out


def with_mode(reqs: list[Request], mode: str) -> list[Request]:
    return [Request(r.client_id, r.example, r.task, mode) for r in reqs]  # type: ignore[arg-type]


def timed(fn, loops: int) -> float:
    t0 = time.perf_counter()
    [fn() for _ in range(loops)]
    return time.perf_counter() - t0


def interleaved_rps(runs: dict, n: int, p: Profile) -> tuple[dict, dict]:
    """Requests/s per variant (median over reps); variants interleaved so load hits them alike."""
    for fn in runs.values():
        timed(fn, p.warmup)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(p.reps):
        for k, fn in runs.items():
            rates[k].append(n * p.loops / timed(fn, p.loops))
    return {k: median(v) for k, v in rates.items()}, rates


def throughput(
    engine: ServingEngine, emb: ServingEngine, reqs: list[Request], p: Profile
) -> tuple[dict, dict]:
    """Batch throughput: the run's gate (local-adapter representation), the gate on token
    embeddings (`emb`: the same data trained with weighting.representation=embedding), the
    reference bank weighting and a fixed weight, against the base model alone."""
    examples, n, model = [r.example for r in reqs], len(reqs), engine.model
    spread = Mix(torch.linspace(0.5, 1.0, n), 0.0)  # a distinct weight per row: no option dedup

    def base(mix: Mix = GLOBAL_ONLY) -> None:
        with torch.no_grad(), model.peft.disable_adapter():
            model.option_probs(examples, mix)

    runs = {"dynamic_gate": lambda: engine.run_batch(with_mode(reqs, "gate")), "base": base,
            "dynamic_gate_embedding": lambda: emb.run_batch(with_mode(reqs, "gate")),
            "dynamic_bank": lambda: engine.run_batch(with_mode(reqs, "bank")),
            "fixed": lambda: engine.run_batch(with_mode(reqs, "fixed")),
            "base_no_option_dedup": lambda: base(spread)}  # fmt: skip
    load0 = loadavg()
    rps, rates = interleaved_rps(runs, n, p)
    dyn, per_row = rps["dynamic_gate"], Mix(torch.rand(n), torch.rand(n))  # distinct row weights
    stems = model.tokenizer([e.stem for e in examples])["input_ids"]
    details = {"batch": n, "clients_in_batch": len({r.client_id for r in reqs}),
               "requests_per_s_median": rps, "requests_per_s_all": rates,
               "option_sequences_per_batch": {"distinct_weights": len(option_rows(examples, per_row).texts),
                                              "base": len(option_rows(examples, GLOBAL_ONLY).texts)},
               "stem_tokens_per_batch": sum(map(len, stems)),
               "ratio_bank_vs_base": rps["dynamic_bank"] / rps["base"],
               "ratio_dynamic_vs_base_no_option_dedup": dyn / rps["base_no_option_dedup"],
               "ratio_fixed_vs_base": rps["fixed"] / rps["base"],
               "ratio_dynamic_vs_fixed": dyn / rps["fixed"], "loadavg": [load0, loadavg()]}  # fmt: skip
    emb_ratio = rps["dynamic_gate_embedding"] / rps["base"]
    figures: dict[str, Figure] = {"throughput_ratio_dynamic_vs_base": (dyn / rps["base"], ">=", 0.75),
        "throughput_ratio_gate_embedding_vs_base": (emb_ratio, ">=", 0.75),
        "throughput_dynamic_rps": (dyn, None, None), "throughput_base_rps": (rps["base"], None, None)}  # fmt: skip
    return figures, {"throughput": details}


def save_causal_base(path: Path) -> Path:
    """A MiniLM-size Llama (6 layers, hidden 384, MiniLM's tokenizer), random weights, saved."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from feddpa.core.models.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tok.eos_token, tok.pad_token = "[SEP]", "[PAD]"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=6, vocab_size=len(tok),
                         max_position_embeddings=512, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_causal_run(root: Path, p: Profile) -> tuple[Path, dict]:
    base = save_causal_base(root / "causal_base")
    cfg = {"name": "causal", "method": "feddpa_t", "data": {"train_per_task": 8, "test_per_task": 4},
           "model": {"kind": "causal_lm", "path": str(base), "threads": 1, "max_length": 96},
           "federation": {"rounds": 2},  # FedDPA-T trains local adapters from round 1
           "eval": {"every": 0, "final": False, "num_beams": p.gen_beams,
                    "max_new_tokens": p.gen_tokens}}  # fmt: skip
    run_dir, t0 = root / "causal", time.perf_counter()
    log.info("training causal (MiniLM-size Llama, random init)")
    train(build_config(cfg), run_dir, InProcessExecutor)
    return run_dir, {"base": "LlamaForCausalLM 6x384 (random init)", "train_s": time.perf_counter() - t0}  # fmt: skip


def throughput_generate(run_dir: Path, p: Profile) -> tuple[dict, dict]:
    """Generation (beam search) with dual adapters + bank weighting vs the base model alone."""
    torch.set_num_threads(1)
    engine = ServingEngine(run_dir)
    reqs = own_task_items(run_dir, random.Random(0), per_client=2)[: p.gen_batch]
    reqs = [Request(r.client_id, r.example, "generate") for r in reqs]
    examples, model, n = [r.example for r in reqs], engine.model, len(reqs)
    texts: dict[str, list[str]] = {}

    def base() -> None:
        with torch.no_grad(), model.peft.disable_adapter():
            texts["base"] = model.generate(examples, GLOBAL_ONLY)  # type: ignore[attr-defined]

    def dynamic() -> None:
        texts["dynamic"] = [r.text for r in engine.run_batch(with_mode(reqs, "gate"))]

    load0 = loadavg()
    timing = replace(p, warmup=1, reps=p.gen_reps, loops=1)
    rps, rates = interleaved_rps({"dynamic_gate": dynamic, "base": base}, n, timing)
    new_tokens = {k: sum(len(model.tokenizer(t)["input_ids"]) for t in v) for k, v in texts.items()}
    ratio = rps["dynamic_gate"] / rps["base"]
    details = {"batch": n, "clients_in_batch": len({r.client_id for r in reqs}),
               "num_beams": p.gen_beams, "max_new_tokens": p.gen_tokens,
               "generated_tokens_per_batch": new_tokens, "requests_per_s_median": rps,
               "requests_per_s_all": rates, "loadavg": [load0, loadavg()]}  # fmt: skip
    figures: dict[str, Figure] = {"throughput_ratio_dynamic_vs_base_generate": (ratio, ">=", 0.75),
        "throughput_generate_dynamic_rps": (rps["dynamic_gate"], None, None)}  # fmt: skip
    return figures, {"throughput_generate": details}


def latency(
    engine: ServingEngine, emb: ServingEngine, reqs: list[Request], p: Profile
) -> tuple[dict, dict]:
    """Single requests: the gate (local-adapter and token-embedding representation) vs fixed."""
    rng = random.Random(1)
    variants = {
        "gate": (engine, "gate"),
        "fixed": (engine, "fixed"),
        "gate_embedding": (emb, "gate"),
    }
    for r in reqs:  # every client resident, every code path warm
        for eng, mode in variants.values():
            eng.run_batch(with_mode([r], mode))
    load0, ms = loadavg(), {k: [] for k in variants}
    for i in range(p.latency_n):  # the same request in every variant, order rotating
        req = rng.choice(reqs)
        names = list(variants)
        for name in names[i % 3 :] + names[: i % 3]:
            eng, mode = variants[name]
            t0 = time.perf_counter()
            eng.run_batch(with_mode([req], mode))
            ms[name].append((time.perf_counter() - t0) * 1e3)
    p50 = {k: median(v) for k, v in ms.items()}
    details = {"requests_per_mode": p.latency_n, "p50_ms": p50,
               "p95_ms": {k: pct(v, 95) for k, v in ms.items()}, "loadavg": [load0, loadavg()]}  # fmt: skip
    return {
        "latency_p50_ratio_dynamic_vs_fixed": (p50["gate"] / p50["fixed"], "<=", 1.15),
        "latency_p50_ratio_gate_embedding_vs_fixed": (
            p50["gate_embedding"] / p50["fixed"],
            "<=",
            1.15,
        ),
    }, {"latency": details}


def residency(run_dir: Path, p: Profile) -> tuple[dict, dict]:
    """Runs in a fresh spawned process: a heap without the training's freed memory (clean RSS)."""
    torch.set_num_threads(1)
    load0, rng = loadavg(), random.Random(2)
    engine = ServingEngine(run_dir, capacity=max(128, p.many_clients + 8))
    test = read_test(str(run_dir / "data"))
    reqs = [Request(c, rng.choice(test)) for c in engine.clients]
    engine.run_batch(reqs[:1])  # client 0 resident, code paths warm
    gc.collect()
    rss0, ms = psutil.Process().memory_info().rss, []
    for cid in engine.clients[1:]:
        t0 = time.perf_counter()
        engine.slot(cid)  # local adapter + bank from disk into a LocalStack slot
        ms.append((time.perf_counter() - t0) * 1e3)
    gc.collect()
    rss1, resident = psutil.Process().memory_info().rss, len(engine.slots)
    t0 = time.perf_counter()  # 16 different resident clients in one batch: all usable
    assert len(engine.run_batch(reqs[-p.batch :])) == p.batch and len(engine.slots) == resident
    batch_s = time.perf_counter() - t0
    figures: dict[str, Figure] = {"clients_resident_per_replica": (resident, ">=", 100),
        "rss_per_resident_client_mb": ((rss1 - rss0) / MIB / (resident - 1), None, None),
        "cold_load_p50_ms": (median(ms), "<=", 500.0), "cold_load_p95_ms": (pct(ms, 95), None, None),
        "cold_load_p50_ms_last20": (median(ms[-20:]), "<=", 500.0)}  # fmt: skip  # near capacity
    slot = engine.slots[engine.clients[1]]  # its tensors: local adapter (float32) + bank
    tensors = [t[slot.index] for t in (*engine.stack.A, *engine.stack.B)]
    state_mb = sum(t.numel() * t.element_size() for t in [*tensors, slot.bank.vectors]) / MIB  # type: ignore[misc]
    details = {"clients_in_run": len(engine.clients), "capacity": engine.capacity,
               "cold_loads": len(ms), "cold_load_max_ms": max(ms),
               "cold_load_p50_ms_first10_last10": [median(ms[:10]), median(ms[-10:])],
               "rss_mb_1_resident_vs_all": [rss0 / MIB, rss1 / MIB],
               "tensor_mb_per_client": state_mb, "bank_shape": list(slot.bank.vectors.shape),  # type: ignore[union-attr]
               "batch_of_16_clients_s": batch_s, "loadavg": [load0, loadavg()],
               "note": "adapters and banks of a just-written run: files in the page cache"}  # fmt: skip
    return figures, {"residency": details}


def isolated(fn, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def closed_loop(url: str, concurrency: int, seconds: float, items: list, seed: int) -> dict:
    """`concurrency` threads, each sending its next request when the previous one returns."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    lock, stop = threading.Lock(), time.monotonic() + seconds

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx2.Client(timeout=60) as client:
            while time.monotonic() < stop:
                cid, text = rng.choice(items)
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/v1/clients/{cid}/predict", json={"instruction": text})
                    err = None if r.status_code == 200 else f"http_{r.status_code}"
                except httpx2.HTTPError as exc:
                    err = type(exc).__name__
                with lock:
                    if err is None:
                        lat.append((time.perf_counter() - t0) * 1e3)
                    else:
                        errors[err] = errors.get(err, 0) + 1

    load0, t0 = loadavg(), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:  # a worker's exception surfaces here
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - t0  # includes the last requests' tails
    return {"concurrency": concurrency, "wall_s": wall, "ok": len(lat), "rps": len(lat) / wall,
            "errors": sum(errors.values()), "error_kinds": errors, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "loadavg": [load0, loadavg()]}  # fmt: skip


def knee(curve: list[dict]) -> int:
    """The concurrency after which throughput grows by less than 10 %."""
    for a, b in zip(curve, curve[1:], strict=False):
        if b["rps"] < 1.10 * a["rps"]:
            return a["concurrency"]
    return curve[-1]["concurrency"]


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx2.TransportError):
            if httpx2.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Serve app did not become healthy in {timeout_s} s")


@contextlib.contextmanager
def serve_on_loopback(options: ServeOptions, timeout_s: float = 600) -> Iterator[str]:
    """A fresh local Ray and the Serve app for `options` on a free 127.0.0.1 port, healthy; yields
    its base URL and shuts both down after."""
    with socket.socket() as sock:  # a free port on loopback, released for Serve
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": RAY_ENV}, log_to_driver=False)  # fmt: skip
    try:
        start(options, host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))
        wait_healthy(url, timeout_s)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def load_test(run_dir: Path, p: Profile) -> tuple[dict, dict]:
    with socket.socket() as sock:  # a free port on loopback, released for Serve
        sock.bind(("127.0.0.1", 0))
        url, rng = f"http://127.0.0.1:{(port := sock.getsockname()[1])}", random.Random(3)
    clients = read_manifest(str(run_dir / "data")).client_ids
    items = [(rng.choice(clients), ex.instruction) for ex in read_test(str(run_dir / "data"))]
    # address="local": a fresh Ray; `init_ray("local")` joins another job's `ray start` cluster
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": RAY_ENV}, log_to_driver=False)  # fmt: skip
    t0 = time.perf_counter()
    try:
        start(ServeOptions(str(run_dir), cpus_per_replica=1), host="127.0.0.1", port=port)
        wait_healthy(url)
        startup_s = time.perf_counter() - t0
        for cid in clients:  # every client resident on the replica
            httpx2.post(f"{url}/v1/clients/{cid}/predict", json={"instruction": items[0][1]})
        closed_loop(url, 4, min(3.0, p.curve_s), items, seed=99)  # warm-up, discarded
        curve = []
        for c in p.curve:
            curve.append(closed_loop(url, c, p.curve_s, items, seed=c))
            log.info("c=%d: %.2f req/s, p50 %.0f ms", c, curve[-1]["rps"], curve[-1]["p50_ms"])
        k = knee(curve)
        main = closed_loop(url, k, p.load_s, items, seed=1000)
        personalizer = serve.get_deployment_handle("Personalizer", app_name="feddpa")
        batches = personalizer.batch_sizes.remote().result()  # {size: count}, whole run
    finally:
        serve.shutdown()
        ray.shutdown()
    figures: dict[str, Figure] = {
        f"load_{x}": (main[x], None, None) for x in ("rps", "p50_ms", "p99_ms")
    }
    figures |= {"load_errors": (main["errors"], "<=", 0), "load_knee_concurrency": (k, None, None)}
    details = {"serve": "ServeOptions(run_dir, cpus_per_replica=1): 1 replica, max_batch_size 16, 5 ms",
               "requests": "POST /v1/clients/{cid}/predict, random client x random synthetic test item",
               "startup_s": startup_s, "curve": curve, "load": main,
               "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
               "mean_batch_size": sum(k * v for k, v in batches.items()) / sum(batches.values())}  # fmt: skip
    return figures, {"load_test": details}


def render_markdown(figures: dict[str, Figure], det: dict, meta: dict) -> str:
    out = ["# Serving benchmark", "", f"Command: `{meta['command']}` ({meta['profile']} profile)", "",
        f"Machine: {meta['cpu_count']} CPUs ({meta['cpu_model']}), {meta['ram_gib']:.1f} GiB RAM, "
        f"Python {meta['python']}, torch {meta['torch']} ({meta['torch_threads']} thread), "
        f"ray {meta['ray']}; {meta['date']}; total {meta['total_s']:.0f} s. Load averages "
        f"(1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; "
        "other jobs shared the machine. Per-part load averages (before, after) are in `loadavg`.",
        "", "| figure | value | target | |", "|---|---|---|---|"]  # fmt: skip
    for k, (v, op, b) in figures.items():
        ok = op is None or (v <= b if op == "<=" else v >= b)  # type: ignore[operator]
        verdict = ("pass" if ok else "FAIL") if op else "(no target)"
        out.append(f"| `{k}` | {fmt(v)} | {f'{op} {fmt(b)}' if op else '—'} | {verdict} |")
    if "load_test" in det:
        out += ["", "## HTTP closed-loop curve (Ray Serve, 127.0.0.1); last row: the long run", ""]
        out += ["| concurrency | s | req/s | p50 ms | p99 ms | errors | 1-min load before → after |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in [*det["load_test"]["curve"], det["load_test"]["load"]]:
            la = f"{r['loadavg'][0][0]} → {r['loadavg'][1][0]}"
            row = [r["concurrency"], r["wall_s"], r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]]
            out.append("| " + " | ".join(fmt(c) for c in [*row, la]) + " |")
    for key, d in [(k, d) for k, d in det.items() if d]:
        brief = {k: v for k, v in d.items() if k not in ("curve", "requests_per_s_all")}
        out += ["", f"## {key}", "", "```json", json.dumps(brief, indent=1), "```"]
    return "\n".join([*out, "", "All data: `serving.json`.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short points, for debugging")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output dir")
    parser.add_argument("--run-dir", type=Path, help="reuse this trained 8-client run")
    parser.add_argument("--many-run-dir", type=Path, help="reuse this trained 120-client run")
    parser.add_argument("--work", type=Path, help="train runs here and keep them (default: temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("feddpa", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    profile = QUICK if args.quick else Profile()
    t0, load0 = time.perf_counter(), loadavg()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="feddpa-serve-bench-")
    root = args.work or Path(tmp.name)  # type: ignore[union-attr]
    figures: dict[str, Figure] = {}
    details: dict = {"runs": {}}
    run_dir, many_dir = args.run_dir, args.many_run_dir
    try:
        if run_dir is None:
            data = {"train_per_task": 60, "test_per_task": 20}
            run_dir, details["runs"]["main"] = train_run("main", data, root)
        if many_dir is None:
            n = profile.many_clients  # 2 training items per client
            data = {"partition": "iid", "num_clients": n, "train_per_task": n // 4}
            many_dir, details["runs"]["many"] = train_run("many", data | {"test_per_task": 4}, root)

        def measure(fn, *fn_args) -> None:
            log.info("measuring %s", fn_args[0].__name__ if fn is isolated else fn.__name__)
            f, d = fn(*fn_args)
            figures.update(f)
            details.update(d)
            log.info("%s", {k: round(float(v[0]), 3) for k, v in f.items()})

        data = {"train_per_task": 60, "test_per_task": 20}
        emb_dir, details["runs"]["embedding"] = train_run(
            "embedding", data, root, {"representation": "embedding"}
        )
        engine, emb = ServingEngine(run_dir), ServingEngine(emb_dir)
        reqs = own_task_items(run_dir, random.Random(0), per_client=2)[: profile.batch]
        measure(throughput, engine, emb, reqs, profile)
        measure(latency, engine, emb, reqs, profile)
        del engine, emb  # free their memory before the residency engine and the Serve replica
        gc.collect()
        measure(isolated, residency, many_dir, profile)
        causal_dir, details["runs"]["causal"] = train_causal_run(root, profile)
        measure(isolated, throughput_generate, causal_dir, profile)
        measure(load_test, run_dir, profile)
    finally:
        if tmp is not None:
            tmp.cleanup()
    meta = machine_info() | {
        "command": shlex.join([".venv/bin/python", "benchmarks/serving.py", *sys.argv[1:]]),
        "profile": "quick" if args.quick else "default",
        "profile_settings": {k: str(v) for k, v in asdict(profile).items()},
        "total_s": time.perf_counter() - t0, "loadavg_start": load0, "loadavg_end": loadavg()}  # fmt: skip
    write_results(
        args.out, "serving", figures, details, meta, render_markdown(figures, details, meta)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
