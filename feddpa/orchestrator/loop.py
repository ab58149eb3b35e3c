"""The round loop shared by the in-process and the Ray paths.

    for each round: sample clients (seeded by round) → fit → fold each global update into the
    running FedAvg as it arrives → evaluate when due → commit the round atomically

FedDPA-F adds one last step after the rounds (index `rounds`): every client fine-tunes a copy of
the final global adapter as its local adapter. All randomness derives from (seed, round, client),
so a resumed run replays exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from feddpa.core.adapters import AdapterState
from feddpa.core.algorithms import method_of
from feddpa.core.config import ExperimentConfig
from feddpa.core.evaluation import ItemScores, summarize
from feddpa.core.fedavg import FlatState, OrderedAverage, state_nbytes
from feddpa.core.models.loading import lora_config
from feddpa.core.privacy import Privacy, resolve
from feddpa.core.storage import Checkpoints, Round, RoundRecord, RunDir, Stage, Timing
from feddpa.datasets import Manifest, read_manifest, read_test
from feddpa.datasets.prepare import prepare_shards
from feddpa.orchestrator.executor import Executor
from feddpa.orchestrator.private_round import fit_private
from feddpa.orchestrator.sampling import sample_clients

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[ExperimentConfig, str, list[int], RunDir], Executor]


def total_steps(cfg: ExperimentConfig) -> int:
    return method_of(cfg).total_steps


def eval_due(cfg: ExperimentConfig, step: int) -> bool:
    last = step == total_steps(cfg) - 1
    return (last and cfg.eval.final) or (cfg.eval.every > 0 and (step + 1) % cfg.eval.every == 0)


def evaluate(
    executor: Executor, cfg: ExperimentConfig, manifest: Manifest, test, step: int, global_state
) -> dict:
    method = method_of(cfg)
    weighting = method.step_weighting(step)
    ids = manifest.client_ids
    alone_scores: ItemScores | None = None  # the global adapter alone, beside the mix
    if weighting.mode == "global_only":  # one evaluation serves every client
        items: dict[int, ItemScores] = dict.fromkeys(ids, executor.evaluate_global(global_state))
    else:
        # a mix's items that lean on the global adapter alone reuse its scores (computed once)
        shared = executor.evaluate_global(global_state) if method.fedit_beside(weighting) else None
        items = dict(executor.evaluate(step, ids, global_state, weighting, shared))
        alone_scores = shared  # FedIT beside FedDPA: their global trajectories are the same
    clients = {
        str(cid): {"tasks": sorted(c.tasks), **summarize(test, items[cid], set(c.tasks))}
        for cid, c in zip(ids, manifest.clients, strict=True)
        if cid in items  # a client whose actor failed during evaluation is left out
    }
    record: dict = {"weighting": weighting.mode, "avg": average(clients), "clients": clients}
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


def average(clients: dict[str, dict]) -> dict[str, float]:
    return {k: sum(v[k] for v in clients.values()) / len(clients) for k in PT}


def append_metrics(run: RunDir, record: RoundRecord, upto_step: int) -> None:
    """The round's line in the run's metrics log (`RunDir.append_metrics`)."""
    run.append_metrics(record, upto_step)


def recover_metrics(run: RunDir, latest: Round | None) -> None:
    """A run killed between committing a round and writing its metrics line: the committed
    round's own record has the line."""
    if latest is None:
        return
    record = latest.metrics()
    have = {r["round"] for r in run.read_metrics()}
    if record.get("round") is not None and record["round"] not in have:
        log.warning(
            "the metrics log lacks committed round %d: restored from %s",
            record["round"],
            latest.path,
        )
        append_metrics(run, record, record["round"])


def train(
    cfg: ExperimentConfig, run_dir: Path, make_executor: ExecutorFactory, *, resume: bool = False
) -> dict:
    """Run (or resume) a training run; returns the final evaluation record. The process holds
    the run directory's lock throughout: a second writer (say, a second --resume) fails at once."""
    run = RunDir(run_dir)
    with run.lock():
        return _train(cfg, run, make_executor, resume)


def _train(
    cfg: ExperimentConfig, run: RunDir, make_executor: ExecutorFactory, resume: bool
) -> dict:
    if resume:
        cfg = run.read_config()
    else:
        run.ensure_new()
        run.write_config(cfg)
    data_dir = run.data_dir
    manifest = prepare_shards(
        cfg.data, data_dir, model_kind=cfg.model.kind, max_test_per_task=cfg.eval.max_test_per_task
    )
    cfg = resolved_privacy(cfg, run, len(manifest.client_ids))
    test = read_test(str(data_dir), manifest)
    client_ids = manifest.client_ids
    ckpts = run.checkpoints(cfg.keep_checkpoints)
    latest = ckpts.latest()
    recover_metrics(run, latest)
    executor = make_executor(cfg, str(data_dir), client_ids, run)
    try:
        start = latest.completed_rounds() if latest else 0
        global_state = latest.global_adapter() if latest else executor.initial_global()
        privacy = None
        if cfg.privacy.active:  # the accountant and clip continue from the committed round
            saved = latest.state().get("privacy") if latest else None
            privacy = Privacy(cfg, len(client_ids), saved)
        log.info(
            "run %s: method %s, %d clients, steps %d..%d",
            run.path,
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
                cfg, step, executor, ckpts, manifest, test, global_state, run, privacy
            )
        if not final and latest is not None:
            final = latest.metrics().get("eval", {})
        return final
    finally:
        executor.close()


@dataclass
class Fitted:
    """What a round's fit phase produced: the aggregated global and who reported."""

    global_state: AdapterState
    losses: dict[str, dict]
    reported: set[int]
    failures: list[dict]
    compute_s: float  # summed over clients
    transfer_s: float
    fold_s: float  # folding updates into the average as they arrived
    bytes_up: int
    privacy: dict  # the round's ε, clip, uploads (feddpa.core.privacy); {} without privacy


def run_step(
    cfg: ExperimentConfig,
    step: int,
    executor: Executor,
    ckpts: Checkpoints,
    manifest: Manifest,
    test,
    global_state: AdapterState,
    run: RunDir,
    privacy: Privacy | None = None,
) -> tuple[AdapterState, dict]:
    """One round: sample → fit and aggregate → calibrate → evaluate → commit → log."""
    method = method_of(cfg)
    t0 = time.perf_counter()
    sampled = sample(cfg, manifest.client_ids, step)
    fit_ids = method.fit_clients(step, sampled)
    stage = ckpts.stage(step)
    fitted = fit_and_aggregate(cfg, step, executor, fit_ids, global_state, stage, privacy)
    t_fit = time.perf_counter()
    trust = calibrate(executor, cfg, step, sorted(fitted.reported), fitted.global_state, stage)
    t_agg = time.perf_counter()
    evaluation = (
        evaluate(executor, cfg, manifest, test, step, fitted.global_state)
        if eval_due(cfg, step)
        else {}
    )
    t_eval = time.perf_counter()
    ckpts.prepare(stage, fitted.global_state, lora_config(cfg.model, cfg.lora), fitted.reported)
    t_done = time.perf_counter()
    timing: Timing = {
        "fit_s": t_fit - t0,  # wall time of the fit phase, aggregation folds included
        "client_compute_s": fitted.compute_s,
        "transfer_s": fitted.transfer_s,
        "aggregate_s": fitted.fold_s + (t_agg - t_fit),
        "eval_s": t_eval - t_agg,
        "checkpoint_s": t_done - t_eval,  # the stage's files; the rename after it takes ms
        "wall_s": t_done - t0,
    }
    record: RoundRecord = {
        "round": step,
        "phase": "finetune" if method.finetunes(step) else "round",
        "sampled": sampled,
        "losses": fitted.losses,
        "bytes_up": fitted.bytes_up,
        "bytes_down": state_nbytes(fitted.global_state) * len(fit_ids),
        "timing": timing,
        "eval": evaluation,
        "trust": trust,
        "failures": fitted.failures + executor.round_stats()["failures"],
        "privacy": fitted.privacy,
    }
    ids = manifest.client_ids
    state: dict = {
        "completed_steps": step + 1,
        "method": cfg.method,
        "sampled": sampled,
        "clients": ids,
    }
    if privacy is not None:
        state["privacy"] = privacy.state()  # the accountant continues from here on --resume
    ckpts.commit(stage, state, record)  # the record is complete: metrics.jsonl gets it as is
    append_metrics(run, record, step)
    if "epsilon" in fitted.privacy:
        log.info(
            "round %d: ε = %.4g at δ = %g (noise multiplier %s, clip %s)",
            step,
            fitted.privacy["epsilon"],
            fitted.privacy["delta"],
            fitted.privacy.get("noise_multiplier"),
            fitted.privacy.get("clip"),
        )
    if evaluation:
        log.info(
            "round %d: P %.4f TTP %.4f", step, evaluation["avg"]["P"], evaluation["avg"]["TTP"]
        )
    return fitted.global_state, evaluation


def sample(cfg: ExperimentConfig, ids: list[int], step: int) -> list[int]:
    """The federation clients of step `step` (every client in a fine-tuning step)."""
    if method_of(cfg).finetunes(step):
        return ids
    return sample_clients(ids, cfg.federation, cfg.seed, step)


def fit_and_aggregate(
    cfg: ExperimentConfig,
    step: int,
    executor: Executor,
    fit_ids: list[int],
    global_state: AdapterState,
    stage: Stage,
    privacy: Privacy | None = None,
) -> Fitted:
    """Fit `fit_ids`, folding each global update into FedAvg as it arrives. A NaN/inf update is
    left out (its client's previous round is kept); fewer reporters than
    `federation.min_fit_clients` abort the round before anything is committed. Under `privacy`
    the clients upload privatized, sealed updates (`fit_private`)."""
    method = method_of(cfg)
    if privacy is not None and method.finetunes(step):
        fitted = fit_and_aggregate(cfg, step, executor, fit_ids, global_state, stage)
        fitted.privacy = privacy.untouched()  # nothing leaves the clients: nothing is spent
        return fitted
    if privacy is not None:
        out = fit_private(cfg, step, executor, fit_ids, global_state, stage, privacy)
        stats = executor.round_stats()
        stage.drop_unreported(out["reported"])
        return Fitted(
            out["global_state"],
            out["losses"],
            out["reported"],
            stats["failures"] + out["failures"],
            out["compute_s"],
            stats["transfer_s"],
            out["fold_s"],
            out["bytes_up"],
            out["privacy"],
        )
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
    stats = executor.round_stats()
    failures = stats["failures"] + [
        {"round": step, "client": c, "call": "fit", "error": "non-finite update"} for c in rejected
    ]
    if len(losses) < min(cfg.federation.min_fit_clients, len(fit_ids)):
        raise RuntimeError(
            f"round {step}: only {len(losses)} of {len(fit_ids)} clients reported, fewer than "
            f"federation.min_fit_clients={cfg.federation.min_fit_clients}; "
            f"failures: {failures}"
        )
    reported = {int(c) for c in losses}
    stage.drop_unreported(reported)  # evaluation reads staged files of reporters only
    aggregated = avg.result() if avg.count else global_state
    return Fitted(
        aggregated, losses, reported, failures, compute, stats["transfer_s"], fold_s, bytes_up, {}
    )


def resolved_privacy(cfg: ExperimentConfig, run: RunDir, population: int) -> ExperimentConfig:
    """The run's privacy settings made explicit (calibrated noise multiplier, the rounds the ε
    budget allows) and written into its config.yaml, so a resumed run uses exactly them."""
    try:
        resolved, notes = resolve(cfg, population)
    except ValueError as err:
        raise ValueError(f"{run.config_file}: {err}") from None
    for note in notes:
        log.warning("privacy: %s", note)
    if resolved != cfg:
        run.write_config(resolved)
    return resolved


def calibrate(
    executor: Executor,
    cfg: ExperimentConfig,
    step: int,
    reported: list[int],
    global_state: AdapterState,
    stage: Stage,
) -> dict[str, float]:
    """{client: trust} of the clients that trained a local adapter this step, measured against
    the aggregated global they will be mixed with (not the one they were sent: it is a round
    older, and on dataset 1 a round changes which adapter wins)."""
    if cfg.weighting.trust != "validation" or not method_of(cfg).trains_local:
        return {}
    found = executor.calibrate(step, reported, global_state, stage)
    return {str(cid): t for cid, t in found if t is not None}


def run_manifest(run: RunDir) -> Manifest:
    return read_manifest(str(run.data_dir))
