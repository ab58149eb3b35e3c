"""ClientHost: one process's share of the federation — a base model loaded once, and the clients
it owns (data shard, local adapter, representation bank). Plain Python: the in-process runner uses
it directly and the Ray client actor wraps it, so both paths run the same code.

Only global-adapter tensors leave a host (`FitResult.global_state`); local adapters and banks are
written by the host itself into the round's staging directory. Under `privacy` the global adapter
leaves only as the client's privatized, sealed update (`FitResult.sealed`: clipped and noised as
DP asks, masked under secure aggregation; feddpa.core.privacy), made here, on the client's side.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from feddpa.actors.engine import build_engine, write_deepspeed_config
from feddpa.core import algorithms, secagg
from feddpa.core.adapters import GLOBAL, LOCAL, AdapterState
from feddpa.core.config import ExperimentConfig, WeightingConfig
from feddpa.core.evaluation import (
    ClientWeighting,
    ItemScores,
    client_independent,
    representation_bank,
    representations_batched,
    score_items,
)
from feddpa.core.fedavg import FlatState
from feddpa.core.models import TaskModel, build_task_model
from feddpa.core.models.loading import lora_config
from feddpa.core.privacy import ClientTask, Held, privatize, seal, top_up
from feddpa.core.records import Example
from feddpa.core.storage import ClientFiles, Round, RunDir, Stage
from feddpa.core.training import run_phase
from feddpa.core.trust import choose_trust, split_validation, validation_losses
from feddpa.core.weighting import ClientBank, needs_bank
from feddpa.datasets import read_manifest, read_shard, read_test

log = logging.getLogger(__name__)


@dataclass
class ClientState:
    data: list[Example]  # trained on
    validation: list[Example] = field(default_factory=list)  # never trained on (trust)
    local: AdapterState | None = None
    bank: ClientBank | None = None


@dataclass(frozen=True)
class FitResult:
    client_id: int
    num_examples: int
    global_state: AdapterState | FlatState | None  # FlatState when it came over the wire
    losses: dict[str, tuple[float, ...]] = field(default_factory=dict)
    compute_s: float = 0.0
    sealed: np.ndarray | None = None  # privacy: the (masked) fixed-point upload, (P + 3,) uint64
    nonfinite: bool = False  # privacy: the update held NaN/inf and was not uploaded


class ClientHost:
    def __init__(
        self,
        cfg: ExperimentConfig,
        data_dir: str,
        client_ids: list[int],
        run: RunDir | None = None,
    ) -> None:
        """`run`: the run directory. Every owned client starts *stale*: at its first call it is
        read from the run directory (after a resume or an actor restart)."""
        self.cfg = cfg
        self.checkpoints = None if run is None else run.checkpoints()
        # clients whose in-memory state must be re-read from the run directory before use
        self.stale: set[int] = set(client_ids) if run is not None else set()
        self.manifest = read_manifest(data_dir)
        self.data_dir = data_dir
        self.model: TaskModel = build_task_model(cfg.model, cfg.lora, cfg.eval)
        self.engine = build_engine(cfg, self.model)  # adapter I/O goes through it (ZeRO-3 gathers)
        if cfg.engine.kind == "deepspeed" and run is not None:
            write_deepspeed_config(cfg, run.deepspeed_file)
        self.lora_config = lora_config(cfg.model, cfg.lora)
        self.method = algorithms.method_of(cfg)
        self.weighting = self.method.eval_weighting()
        self.clients: dict[int, ClientState] = {}
        self._test: list[Example] | None = None
        self._shared_reps: dict[str, torch.Tensor] = {}  # client-independent e(x) of the test set
        # privacy: each client's privatized update of its latest round, and its secure-aggregation
        # key of the current masking attempt ((step, attempt), key); memory, never written
        self.held: dict[int, Held] = {}
        self.keys: dict[int, tuple[tuple[int, int], secagg.X25519PrivateKey]] = {}
        for cid in client_ids:
            self.clients[cid] = ClientState(*self._read_data(cid))

    def _read_data(self, client_id: int) -> tuple[list[Example], list[Example]]:
        """(train, validation) of a client: `data.validation_fraction` of its shard is kept out of
        training for every method alike; the pooled client trains on all clients' train parts."""
        if client_id == algorithms.POOLED:
            parts = [self._read_data(cid) for cid in self.manifest.client_ids]
            return [ex for train, _ in parts for ex in train], []
        by_id = {info.client_id: info for info in self.manifest.clients}
        if client_id not in by_id:
            raise KeyError(f"client {client_id} is not in the manifest of {self.data_dir}")
        items = read_shard(self.data_dir, by_id[client_id])
        seed = algorithms.derive_seed(self.cfg.data.seed, "validation", client_id)
        return split_validation(items, self.cfg.data.validation_fraction, seed)

    @property
    def test(self) -> list[Example]:
        if self._test is None:
            self._test = read_test(self.data_dir, self.manifest)
        return self._test

    def discard(self, cid: int) -> None:
        """Forget client `cid`'s in-memory state (its round failed): the next call re-reads it."""
        self.stale.add(cid)

    def _current(self, cid: int, step: int | None = None) -> ClientState:
        """Client `cid` as the run directory says: after finishing round `step` (evaluation),
        its own staged files of that round; otherwise the latest committed round; fresh if none.
        The client stays stale until its files have been read, so a failed read raises again at
        the next call and never falls back to a fresh adapter."""
        state = self.clients[cid]
        if cid not in self.stale or self.checkpoints is None:
            return state
        staged = None if step is None else self.checkpoints.staged(step).client(cid)
        source: ClientFiles | None = None
        if staged is not None and staged.exists():
            source = staged
        elif (latest := self.checkpoints.latest()) is not None:
            source = latest.client(cid)
        log.info("client %d: state read from %s", cid, source.path if source else "nothing (fresh)")
        if source is not None:
            state.local, state.bank = source.read_local(), source.read_bank()
        else:
            state.local, state.bank = None, None
        self.stale.discard(cid)
        return state

    def restore(self, checkpoint: Round) -> None:
        """Load every owned client's local adapter and bank from a committed round."""
        log.info("restoring %d clients from %s", len(self.clients), checkpoint.path)
        for cid, state in self.clients.items():
            files = checkpoint.client(cid)
            state.local, state.bank = files.read_local(), files.read_bank()
            self.stale.discard(cid)

    def _local(self, cid: int) -> AdapterState:
        """The client's trained local adapter, or its seeded fresh start (not kept: `state.local`
        stays None until a phase trains it, so the client counts as having none)."""
        state = self.clients[cid]
        if state.local is not None:
            return state.local
        return self.engine.fresh_adapter_state(
            algorithms.derive_seed(self.cfg.seed, "local-init", cid)
        )

    def _load(self, global_state: AdapterState, cid: int) -> None:
        self.engine.load_adapter_state(GLOBAL, global_state)
        self.engine.load_adapter_state(LOCAL, self._local(cid))

    def fit(
        self,
        cid: int,
        step: int,
        global_state: AdapterState,
        stage: Stage | None,
        task: ClientTask | None = None,
    ) -> FitResult:
        """Run the method's phases of `step` for client `cid`; stage its changed local files.
        With a privacy `task`, the global adapter leaves only privatized and sealed."""
        start = time.perf_counter()
        state = self._current(cid)
        finetune = self.method.finetunes(step)
        phases = self.method.phases(step)
        self._load(global_state, cid)
        if finetune:  # FedDPA-F: the local adapter starts as a copy of the final global
            self.engine.load_adapter_state(LOCAL, global_state)
        losses = {}
        for phase in phases:
            seed = algorithms.derive_seed(self.cfg.seed, "fit", step, cid, phase.name)
            result = run_phase(
                self.model, state.data, phase, self.cfg.train, seed, self.engine.optimizer_factory
            )
            losses[phase.name] = result.epoch_losses
            log.info(
                "round %d client %d phase %s loss %s",
                step,
                cid,
                phase.name,
                [round(x, 4) for x in result.epoch_losses],
            )
        upload = (
            self.engine.adapter_state(GLOBAL)
            if self.method.uploads_global and not finetune
            else None
        )
        if any(p.adapter == LOCAL for p in phases):
            state.local = self.engine.adapter_state(LOCAL)
            state.bank = None
            if needs_bank(self.weighting):
                state.bank = self._bank(cid, self.weighting)
            if stage is not None:
                self.write_client(cid, stage)
        fitted = FitResult(cid, len(state.data), upload, losses, time.perf_counter() - start)
        if task is None or upload is None:
            return fitted
        held = privatize(upload, global_state, len(state.data), task)
        if held is None:
            log.error("round %d client %d: NaN/inf update, not uploaded", step, cid)
            return replace(fitted, global_state=None, nonfinite=True)
        for old in [c for c, h in self.held.items() if h.step < step]:
            del self.held[old]  # earlier rounds are summed and committed
        self.held[cid] = held
        sealed = self.seal(cid, task)
        return replace(
            fitted, global_state=None, sealed=sealed, compute_s=time.perf_counter() - start
        )

    # --- privacy: secure-aggregation keys and sealing (feddpa.core.privacy) --------------------

    def advertise(self, cid: int, step: int, attempt: int) -> bytes:
        """Client `cid`'s public key for masking attempt `attempt` of round `step` (a fresh key
        pair; the secret key stays here). A restart (attempt > 0) takes only clients that still
        hold their update of the round: one whose host restarted since has none and says so."""
        if attempt > 0:
            self._held(cid, step)
        key = secagg.new_key()
        self.keys[cid] = ((step, attempt), key)
        return secagg.public_bytes(key)

    def _held(self, cid: int, step: int) -> Held:
        held = self.held.get(cid)
        if held is None or held.step != step:
            raise RuntimeError(f"client {cid}: no update of round {step} held (host restarted)")
        return held

    def seal(self, cid: int, task: ClientTask) -> np.ndarray:
        """Client `cid`'s held update of round `task.step`, noised up to the task's std and
        sealed (masked with the attempt's keys). A host that lost the update or the key (it
        restarted) raises: the client drops out of the attempt instead of breaking the sum."""
        held = self._held(cid, task.step)
        key = None
        if task.public_keys is not None:
            have = self.keys.get(cid)
            if have is None or have[0] != (task.step, task.attempt):
                raise RuntimeError(
                    f"client {cid}: no key of round {task.step} attempt {task.attempt} (host restarted)"
                )
            key = have[1]
            if task.public_keys.get(cid) != secagg.public_bytes(key):
                raise RuntimeError(f"client {cid}: the round's key list does not hold its key")
        seed = algorithms.derive_seed(
            self.cfg.seed, "dp-client-noise", task.step, cid, task.attempt
        )
        held = top_up(held, task, np.random.default_rng(seed))
        self.held[cid] = held
        return seal(held, cid, task, key)

    def write_client(self, cid: int, stage: Stage) -> None:
        """Stage the client's local adapter and bank together (one rename: all or nothing)."""
        state = self.clients[cid]
        stage.write_client(cid, state.local, state.bank, self.lora_config)

    def _bank(self, cid: int, weighting: WeightingConfig) -> ClientBank:
        """The client's bank under the local adapter now loaded. With `weighting.trust`
        'validation' its trust starts at 0 (the global adapter alone) until `calibrate` has
        measured it against the round's aggregated global: a client whose calibration fails is
        served as FedIT, never by an unmeasured local adapter."""
        state, batch = self.clients[cid], self.cfg.eval.batch_size
        bank = representation_bank(self.model, state.data, weighting, batch)
        return replace(bank, trust=0.0) if weighting.trust == "validation" else bank

    def calibrate(
        self, cid: int, global_state: AdapterState, step: int, stage: Stage | None
    ) -> float | None:
        """Choose client `cid`'s trust in its local adapter against `global_state` (the round's
        aggregated global, the one it will be mixed with) on its validation slice, and restage
        its bank; None when the weighting does not use trust or the client has nothing to trust."""
        state = self._current(cid, step)
        if (
            self.weighting.trust != "validation"
            or state.local is None
            or state.bank is None
            or not state.validation
        ):
            return None
        self._load(global_state, cid)
        batch = self.cfg.eval.batch_size
        losses = validation_losses(self.model, state.validation, self.weighting.trust_grid, batch)
        trust = choose_trust(losses)
        log.info(
            "round %d client %d: trust %.2f in its local adapter (validation loss by weight: %s)",
            step,
            cid,
            trust,
            {t: round(v, 4) for t, v in losses.items()},
        )
        state.bank = replace(state.bank, trust=trust)
        if stage is not None:
            self.write_client(cid, stage)
        return trust

    def _shared_queries(self, weighting: WeightingConfig) -> torch.Tensor | None:
        """(N, H) representations of the test set that every client shares (computed once)."""
        rep, key = weighting.representation, f"{weighting.representation}@{weighting.layer}"
        if not (needs_bank(weighting) and client_independent(rep)):
            return None
        if key not in self._shared_reps:
            texts = [self.model.query_text(e) for e in self.test]
            self._shared_reps[key] = representations_batched(
                self.model, texts, weighting, self.cfg.eval.batch_size
            )
        return self._shared_reps[key]

    def evaluate(
        self,
        cid: int,
        global_state: AdapterState,
        step: int,
        weighting: WeightingConfig | None = None,
        global_scores: ItemScores | None = None,
    ) -> ItemScores:
        """Per-item test scores of client `cid` under its instance-wise weighting. A client that
        never trained a local adapter is scored with the global adapter alone. `global_scores`
        (`evaluate_global` of the same global adapter) supply the items whose mix is the global
        adapter alone."""
        weighting = weighting or self.weighting
        state = self._current(cid, step)
        has_local = state.local is not None
        self._load(global_state, cid)
        kind = (weighting.representation, weighting.layer)
        other_kind = (
            state.bank is not None and (state.bank.representation, state.bank.layer) != kind
        )
        if has_local and needs_bank(weighting) and (state.bank is None or other_kind):
            bank = self._bank(cid, weighting)  # trust 0 under 'validation' until calibrated
            # a measured trust does not depend on the gate's representation: it is kept
            state.bank = bank if state.bank is None else replace(bank, trust=state.bank.trust)
        client = ClientWeighting(cid, state.bank, has_local)
        return score_items(
            self.model,
            self.test,
            weighting,
            client,
            self.cfg.seed,
            self.cfg.eval.batch_size,
            global_scores=global_scores,
            shared=self._shared_queries(weighting),
        )

    def evaluate_global(self, global_state: AdapterState) -> ItemScores:
        """Per-item test scores of the global adapter alone (shared by all clients)."""
        self.engine.load_adapter_state(GLOBAL, global_state)
        only = self.weighting.model_copy(update={"mode": "global_only"})
        client = ClientWeighting(algorithms.POOLED, None, has_local=False)
        return score_items(
            self.model, self.test, only, client, self.cfg.seed, self.cfg.eval.batch_size
        )

    def initial_global(self) -> AdapterState:
        return self.engine.fresh_adapter_state(algorithms.derive_seed(self.cfg.seed, "global-init"))
