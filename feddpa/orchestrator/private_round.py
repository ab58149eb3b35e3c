"""A round's fit and aggregation under `privacy` (feddpa.core.privacy has the math).

    secure aggregation: participants advertise a fresh public key (attempt 0)
    fit: each client trains, privatizes (clip, client noise) and seals (masks) its update; the
         driver folds the sealed uploads into a modular sum as they arrive (memory: one vector)
    a participant lost after the keys went out (crash, timeout, NaN update): its masks cannot
         cancel, so the attempt's sum is dropped unread and the survivors mask their held updates
         again among themselves with new keys (attempt + 1; client noise topped up to the smaller
         group); after `secure_aggregation.max_attempts`, or below `federation.min_fit_clients`,
         the round fails before anything is committed
    aggregate: decode, check every mask cancelled, server noise, mean, adaptive clip, accounting

Without secure aggregation there are no keys and no restarts: the uploads of the clients that
reported are summed as they are (clipped, and noised by the client if configured).
"""

from __future__ import annotations

import logging
import time

from feddpa.core.adapters import AdapterState
from feddpa.core.config import ExperimentConfig
from feddpa.core.privacy import Privacy
from feddpa.core.secagg import ModularSum
from feddpa.core.storage import Stage
from feddpa.orchestrator.executor import Executor

log = logging.getLogger(__name__)


class RoundRefused(RuntimeError):
    """Secure aggregation could not produce the survivors' exact sum: nothing is committed."""


def fit_private(
    cfg: ExperimentConfig,
    step: int,
    executor: Executor,
    fit_ids: list[int],
    global_state: AdapterState,
    stage: Stage,
    privacy: Privacy,
) -> dict:
    """{'global_state', 'losses', 'reported', 'failures', 'compute_s', 'fold_s', 'bytes_up',
    'privacy'} of one private round."""
    attempt = 0
    keys = advertise(executor, step, fit_ids, attempt) if privacy.secure else None
    participants = sorted(keys) if keys is not None else list(fit_ids)
    check_quorum(cfg, step, participants, len(fit_ids), privacy)
    task = privacy.task(step, attempt, len(participants), keys)
    total, losses, compute, fold_s, rejected = ModularSum(), {}, 0.0, 0.0, []
    for res in executor.fit(step, participants, global_state, stage, task):
        compute += res.compute_s
        if res.nonfinite:
            executor.discard([res.client_id])
            rejected.append(res.client_id)
            continue
        losses[str(res.client_id)] = res.losses
        if res.sealed is not None:
            t = time.perf_counter()
            total.add(res.client_id, res.sealed)
            fold_s += time.perf_counter() - t
    uploaded = sorted(total.ids)
    bytes_up = upload_bytes(total)
    while privacy.secure and uploaded != participants:
        lost = sorted(set(participants) - set(uploaded))
        attempt += 1
        if attempt >= privacy.sa.max_attempts:
            raise RoundRefused(
                f"round {step}: clients {lost} were lost after masking and "
                f"privacy.secure_aggregation.max_attempts={privacy.sa.max_attempts} is spent; "
                "the round is refused (nothing committed): resume to retry it"
            )
        log.warning(
            "round %d: clients %s lost after masking: the %d survivors mask again (attempt %d)",
            step,
            lost,
            len(uploaded),
            attempt,
        )
        keys = advertise(executor, step, uploaded, attempt)
        participants = sorted(keys)
        check_quorum(cfg, step, participants, len(fit_ids), privacy)
        task = privacy.task(step, attempt, len(participants), keys)
        total = ModularSum()
        for cid, sealed in executor.seal(participants, task):
            total.add(cid, sealed)
        uploaded = sorted(total.ids)
        bytes_up += upload_bytes(total)
    check_quorum(cfg, step, uploaded, len(fit_ids), privacy)
    dropped = sorted(int(c) for c in losses if int(c) not in uploaded)
    if dropped:  # trained and staged, but not in the sum: their round is not committed
        executor.discard(dropped)
    t = time.perf_counter()
    new_global, record = privacy.aggregate(step, global_state, total.total, len(uploaded))
    fold_s += time.perf_counter() - t
    record["attempts"] = attempt + 1
    failures = [
        {"round": step, "client": c, "call": "fit", "error": "non-finite update"} for c in rejected
    ] + [
        {"round": step, "client": c, "call": "seal", "error": "lost after masking"} for c in dropped
    ]
    return {
        "global_state": new_global,
        "losses": {c: v for c, v in losses.items() if int(c) in uploaded},
        "reported": set(uploaded),
        "failures": failures,
        "compute_s": compute,
        "fold_s": fold_s,
        "bytes_up": bytes_up,
        "privacy": record,
    }


def upload_bytes(total: ModularSum) -> int:
    return 0 if total.total is None else total.total.nbytes * len(total.ids)


def advertise(executor: Executor, step: int, ids: list[int], attempt: int) -> dict[int, bytes]:
    """The public keys of the clients that answered (one that did not is out of the attempt)."""
    return dict(executor.advertise(step, ids, attempt))


def check_quorum(
    cfg: ExperimentConfig, step: int, participants: list[int], sampled: int, privacy: Privacy
) -> None:
    need = min(cfg.federation.min_fit_clients, sampled)
    if privacy.secure and participants and len(participants) < 2:
        need = 2  # a lone participant's masked upload would be its update in the clear
    if len(participants) < need:
        raise RoundRefused(
            f"round {step}: only {len(participants)} of {sampled} sampled clients can take part "
            f"(federation.min_fit_clients={cfg.federation.min_fit_clients}); nothing committed"
        )
