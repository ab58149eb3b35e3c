"""The round loop shared by the in-process and the Ray paths.

    for each round: sample clients (seeded by round) → fit → fold each global update into the
    running FedAvg as it arrives → evaluate when due → commit the round atomically

FedDPA-F adds one last step after the rounds (index `rounds`): every client fine-tunes a copy of
the final global adapter as its local adapter. All randomness derives from (seed, round, client),
so a resumed run replays exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from feddpa.core import algorithms
from feddpa.core.adapters import AdapterState
from feddpa.core.config import ExperimentConfig, load_config, save_config
from feddpa.core.evaluation import ItemScores, summarize
from feddpa.core.fedavg import FlatState, OrderedAverage, state_nbytes
from feddpa.core.models.loading import lora_config
from feddpa.core.storage import (
    EXECUTION_FILE,
    LOCK_FILE,
    atomic_write_bytes,
    read_jsonl,
    run_lock,
)
from feddpa.datasets import Manifest, read_manifest, read_test
from feddpa.datasets.prepare import prepare_shards
from feddpa.orchestrator.checkpoint import Checkpoints
from feddpa.orchestrator.executor import Executor
from feddpa.orchestrator.sampling import sample_clients

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[ExperimentConfig, str, list[int], Path], Executor]


def total_steps(cfg: ExperimentConfig) -> int:
    return cfg.federation.rounds + (1 if algorithms.finetune_phases(cfg) else 0)


def eval_due(cfg: ExperimentConfig, step: int) -> bool:
    last = step == total_steps(cfg) - 1
    return (last and cfg.eval.final) or (cfg.eval.every > 0 and (step + 1) % cfg.eval.every == 0)


def step_weighting(cfg: ExperimentConfig, step: int):
    """FedDPA-F's rounds before its fine-tuning step are FedIT rounds: evaluate the global alone."""
    if cfg.method == "feddpa_f" and step < cfg.federation.rounds:
        return cfg.weighting.model_copy(update={"mode": "global_only"})
    return algorithms.eval_weighting(cfg)


def evaluate(
    executor: Executor, cfg: ExperimentConfig, manifest: Manifest, test, step: int, global_state
) -> dict:
    weighting = step_weighting(cfg, step)
    ids = manifest.client_ids
    alone_scores: ItemScores | None = None  # the global adapter alone, beside the mix
    if weighting.mode == "global_only":  # one evaluation serves every client
        items: dict[int, ItemScores] = dict.fromkeys(ids, executor.evaluate_global(global_state))
    else:
        # a mix's items that lean on the global adapter alone reuse its scores (computed once)
        shared = executor.evaluate_global(global_state) if mixes_global(cfg) else None
        items = dict(executor.evaluate(step, ids, global_state, weighting, shared))
        alone_scores = shared  # FedIT beside FedDPA: their global trajectories are the same
    clients = {
        str(cid): {"tasks": sorted(c.tasks), **summarize(test, items[cid], set(c.tasks))}
        for cid, c in zip(ids, manifest.clients, strict=True)
        if cid in items  # a client whose actor failed during evaluation is left out
    }
    record = {"weighting": weighting.mode, "avg": average(clients), "clients": clients}
    if alone_scores is not None:
        # FedDPA-T's and FedDPA-F's global trajectory is FedIT's: FedIT read from this very run
        alone = {
            cid: {
                "tasks": c["tasks"],
                **{
                    k: v
                    for k, v in summarize(test, alone_scores, set(c["tasks"])).items()
                    if k in (*PT, "scores")
                },
            }
            for cid, c in clients.items()
        }
        record["global_only"] = {"avg": average(alone), "clients": alone}
    return record


PT = ("P", "TTP")


def mixes_global(cfg: ExperimentConfig) -> bool:
    """Whether the method's evaluation mixes the global adapter into some items."""
    return cfg.method in ("feddpa_t", "feddpa_f") and cfg.weighting.mode != "local_only"


def average(clients: dict[str, dict]) -> dict[str, float]:
    return {k: sum(v[k] for v in clients.values()) / len(clients) for k in PT}


def ensure_new_run_dir(run_dir: Path) -> None:
    written_first = ("train.log", EXECUTION_FILE, LOCK_FILE)  # by the CLI before training starts
    if run_dir.exists() and any(p.name not in written_first for p in run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {run_dir} already exists and is not empty; choose another "
            f"--run-dir or continue it with --resume {run_dir}"
        )


def start_run(cfg: ExperimentConfig, run_dir: Path) -> None:
    ensure_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")


def resumed_config(run_dir: Path) -> ExperimentConfig:
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a feddpa run directory")
    return load_config(run_dir / "config.yaml")


def append_metrics(run_dir: Path, record: dict, upto_step: int) -> None:
    """Append `record`, first dropping lines of steps >= upto_step left by a killed run; the file
    is replaced atomically, so a kill leaves the old or the new file, never a torn line."""
    path = run_dir / "metrics.jsonl"
    kept = [r for r in read_jsonl(path) if r["round"] < upto_step] if path.exists() else []
    lines = [json.dumps(r, sort_keys=True) + "\n" for r in [*kept, record]]
    atomic_write_bytes(path, "".join(lines).encode())


def recover_metrics(run_dir: Path, latest: Path | None) -> None:
    """A run killed between committing a round and writing its metrics line: the committed
    round's own metrics.json has the line."""
    if latest is None:
        return
    record = json.loads((latest / "metrics.json").read_text())
    path = run_dir / "metrics.jsonl"
    have = {r["round"] for r in read_jsonl(path)} if path.exists() else set()
    if record.get("round") is not None and record["round"] not in have:
        log.warning(
            "metrics.jsonl lacks committed round %d: restored from %s", record["round"], latest
        )
        append_metrics(run_dir, record, record["round"])


def train(
    cfg: ExperimentConfig, run_dir: Path, make_executor: ExecutorFactory, *, resume: bool = False
) -> dict:
    """Run (or resume) a training run; returns the final evaluation record. The process holds
    the run directory's lock throughout: a second writer (say, a second --resume) fails at once."""
    with run_lock(run_dir):
        return _train(cfg, run_dir, make_executor, resume)


def _train(
    cfg: ExperimentConfig, run_dir: Path, make_executor: ExecutorFactory, resume: bool
) -> dict:
    if resume:
        cfg = resumed_config(run_dir)
    else:
        start_run(cfg, run_dir)
    data_dir = run_dir / "data"
    manifest = prepare_shards(
        cfg.data, data_dir, model_kind=cfg.model.kind, max_test_per_task=cfg.eval.max_test_per_task
    )
    test = read_test(str(data_dir), manifest)
    client_ids = manifest.client_ids
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.keep_checkpoints)
    latest = ckpts.latest()
    recover_metrics(run_dir, latest)
    executor = make_executor(cfg, str(data_dir), client_ids, ckpts.root)
    try:
        start = ckpts.state(latest)["completed_steps"] if latest else 0
        global_state = ckpts.global_state(latest) if latest else executor.initial_global()
        log.info(
            "run %s: method %s, %d clients, steps %d..%d",
            run_dir,
            cfg.method,
            len(client_ids),
            start,
            total_steps(cfg) - 1,
        )
        final: dict = {}
        for step in tqdm(
            range(start, total_steps(cfg)),
            desc="rounds",
            unit="round",
            initial=start,
            total=total_steps(cfg),
        ):
            global_state, final = run_step(
                cfg, step, executor, ckpts, manifest, test, global_state, run_dir
            )
        if not final and latest is not None:
            final = json.loads((latest / "metrics.json").read_text()).get("eval", {})
        return final
    finally:
        executor.close()


def run_step(
    cfg: ExperimentConfig,
    step: int,
    executor: Executor,
    ckpts: Checkpoints,
    manifest: Manifest,
    test,
    global_state: AdapterState,
    run_dir: Path,
) -> tuple[AdapterState, dict]:
    t0 = time.perf_counter()
    finetune = step >= cfg.federation.rounds
    ids = manifest.client_ids
    sampled = ids if finetune else sample_clients(ids, cfg.federation, cfg.seed, step)
    fit_ids = [-1] if cfg.method == "centralized" and not finetune else sampled
    stage = ckpts.stage(step)
    avg = OrderedAverage(fit_ids)  # folds in client-id order: bit-identical whatever arrives first
    losses, compute, bytes_up, fold_s, rejected = {}, 0.0, 0, 0.0, []
    for res in executor.fit(step, fit_ids, global_state, stage):
        compute += res.compute_s
        if res.global_state is None:
            losses[str(res.client_id)] = res.losses
            continue
        t = time.perf_counter()
        update = FlatState.of(res.global_state)
        if not bool(torch.isfinite(update.data).all()):
            # left out of the average and of `reported`: its staged files are dropped below and
            # the commit carries its previous round forward
            log.error(
                "round %d client %d: NaN/inf update, its previous round kept", step, res.client_id
            )
            executor.discard([res.client_id])
            avg.skip(res.client_id)
            rejected.append(res.client_id)
            continue
        losses[str(res.client_id)] = res.losses
        avg.add(res.client_id, update, res.num_examples)
        fold_s += time.perf_counter() - t
        bytes_up += state_nbytes(update)
    t_fit = time.perf_counter()
    stats = executor.round_stats()
    stats["failures"] += [
        {"round": step, "client": c, "call": "fit", "error": "non-finite update"} for c in rejected
    ]
    if len(losses) < min(cfg.federation.min_fit_clients, len(fit_ids)):
        raise RuntimeError(
            f"round {step}: only {len(losses)} of {len(fit_ids)} clients reported, fewer than "
            f"federation.min_fit_clients={cfg.federation.min_fit_clients}; "
            f"failures: {stats['failures']}"
        )
    reported = {int(c) for c in losses}
    ckpts.drop_unreported(stage, reported)  # evaluation reads staged files of reporters only
    if avg.count:
        global_state = avg.result()
    trust = calibrate(executor, cfg, step, sorted(reported), global_state, stage)
    t_agg = time.perf_counter()
    evaluation = (
        evaluate(executor, cfg, manifest, test, step, global_state) if eval_due(cfg, step) else {}
    )
    t_eval = time.perf_counter()
    eval_stats = executor.round_stats()
    global_bytes = state_nbytes(global_state)
    timing: dict[str, float] = {
        "fit_s": t_fit - t0,  # wall time of the fit phase, aggregation folds included
        "client_compute_s": compute,  # summed over clients
        "transfer_s": stats["transfer_s"],
        "aggregate_s": fold_s + (t_agg - t_fit),
        "eval_s": t_eval - t_agg,
    }
    record = {
        "round": step,
        "phase": "finetune" if finetune else "round",
        "sampled": sampled,
        "losses": losses,
        "bytes_up": bytes_up,
        "bytes_down": global_bytes * len(fit_ids),
        "timing": timing,
        "eval": evaluation,
        "trust": trust,
        "failures": stats["failures"] + eval_stats["failures"],
    }
    state = {"completed_steps": step + 1, "method": cfg.method, "sampled": sampled, "clients": ids}
    ckpts.commit(
        step, stage, global_state, lora_config(cfg.model, cfg.lora), state, record, reported
    )
    timing["checkpoint_s"] = time.perf_counter() - t_eval
    timing["wall_s"] = time.perf_counter() - t0
    append_metrics(run_dir, record, step)
    if evaluation:
        log.info(
            "round %d: P %.4f TTP %.4f", step, evaluation["avg"]["P"], evaluation["avg"]["TTP"]
        )
    return global_state, evaluation


def calibrate(
    executor: Executor,
    cfg: ExperimentConfig,
    step: int,
    reported: list[int],
    global_state: AdapterState,
    stage: Path,
) -> dict[str, float]:
    """{client: trust} of the clients that trained a local adapter this step, measured against
    the aggregated global they will be mixed with (not the one they were sent: it is a round
    older, and on dataset 1 a round changes which adapter wins)."""
    if cfg.weighting.trust != "validation" or not algorithms.trains_local(cfg):
        return {}
    found = executor.calibrate(step, reported, global_state, stage)
    return {str(cid): t for cid, t in found if t is not None}


def run_manifest(run_dir: Path) -> Manifest:
    return read_manifest(str(run_dir / "data"))
