"""The serving engine: one base model + the current global adapter, and an LRU of client local
adapters (each a slot of a `LocalStack`) with their representation banks.

A batch may hold requests of many clients: a `StackRoute` beside the batch's `Mix` gives each row
its client's stack slot, the mix its own instance-wise weight, so the batch runs as one forward
pass whose LoRA cost does not grow with the number of clients in it (FedDPA, arXiv 2403.19211,
Eq. 6–7; the math is `feddpa.core`'s).

Roll-out: at the start of every batch the engine checks the run's LATEST round; when training has
committed a new one it swaps in the new global adapter and drops cached clients (their local
adapters changed too). Batches run one at a time per replica, so no request sees mixed versions.
The new round is read and checked outside the engine's lock (one reader at a time): batches keep
running on the served round meanwhile, and only the swap waits for the running batch.

Memory: at most `capacity` clients are resident (local adapter in a `LocalStack` slot, bank in
memory). A client is loaded only after the least recently used one beyond the capacity is
evicted, the stack never grows past `capacity` slots, and a batch holding more distinct clients
than that runs in parts of at most `capacity` clients each.

A bad round never takes serving down: a new round is read and checked whole (state, the global
adapter's keys, shapes and values, every local adapter's header and values, every bank) before
anything is replaced; if that fails the engine keeps serving the previous round, reports itself `degraded`
(with the reason) and tries again after `retry_s`. The global adapter is held in memory; a client's
local adapter and bank are read on its first request, so if training prunes the served
round meanwhile (FileNotFoundError) the engine moves to the newest round and loads it from there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from feddpa.core import algorithms
from feddpa.core.adapters import (
    GLOBAL,
    AdapterState,
    Mix,
    adapter_state,
    load_adapter_state,
    set_trainable,
)
from feddpa.core.config import WeightingConfig, WeightMode
from feddpa.core.evaluation import ClientWeighting, query_representations
from feddpa.core.models import build_task_model
from feddpa.core.models.causal import TextSink
from feddpa.core.records import Example
from feddpa.core.storage import LATEST, ClientFiles, Round, RunDir
from feddpa.core.weighting import ClientBank, mix_rows, needs_bank
from feddpa.serving.errors import TooLarge, Unavailable, UnknownClient
from feddpa.serving.stack import LocalStack, StackRoute

__all__ = ["Request", "Result", "ServingEngine", "TooLarge", "UnknownClient"]

log = logging.getLogger(__name__)


@dataclass
class ClientSlot:
    client_id: int
    index: int  # the local adapter's slot in the engine's LocalStack; -1: the client has none
    bank: ClientBank | None
    loaded_s: float

    @property
    def has_local(self) -> bool:
        return self.index >= 0

    @property
    def weighting(self) -> ClientWeighting:
        return ClientWeighting(self.client_id, self.bank, self.has_local)


class RoundVanished(Unavailable):
    """The served round's files are gone (training pruned it): move to the newest round."""


@dataclass(frozen=True)
class LoadedRound:
    """A committed round read and checked whole, before it replaces the served one."""

    source: Round
    clients: list[int]
    global_state: AdapterState
    has_local: frozenset[int]  # banks and local adapters are read when a client is loaded


@dataclass(frozen=True)
class Request:
    client_id: int
    example: Example
    task: str = "predict"  # or "generate"
    mode: WeightMode | None = None  # weighting override; None = the run's method default
    max_new_tokens: int | None = None  # decoding bound; None = the run's eval.max_new_tokens
    max_prompt_tokens: int | None = None  # refuse longer prompts (TooLarge); None = no limit
    max_beams: int | None = None  # cap on the run's eval.num_beams; None = no cap
    request_id: str = ""  # the HTTP request's id, for the log


@dataclass
class Result:
    client_id: int
    global_weight: float
    local_weight: float
    version: str
    probs: list[float] = field(default_factory=list)
    choice: str = ""
    text: str = ""
    prompt_tokens: int = 0  # the run's tokenizer: what the model read for the prompt
    completion_tokens: int = 0  # generated tokens (stop token included), or the chosen option's
    finish_reason: str = "stop"  # or "length": generation reached max_new_tokens


class ServingEngine:
    def __init__(self, run_dir: str | Path, capacity: int = 128) -> None:
        self.run = RunDir(run_dir)
        self.run_dir = self.run.path
        self.cfg = self.run.read_config()
        self.model = build_task_model(self.cfg.model, self.cfg.lora, self.cfg.eval)
        self.model.peft.base_model.set_adapter([GLOBAL])  # type: ignore[union-attr,operator]
        set_trainable(self.model.peft, None)  # set_adapter marks the active adapter trainable
        if capacity < 1:
            raise ValueError(
                f"--capacity must be >= 1 (clients resident per replica), got {capacity}"
            )
        # grows by doubling, never past the capacity
        self.stack = LocalStack(self.model.peft, slots=min(capacity, 16), limit=capacity)
        self.weighting = algorithms.method_of(self.cfg).eval_weighting()
        self.capacity = capacity
        self.slots: OrderedDict[int, ClientSlot] = OrderedDict()
        self.version = ""
        self.clients: list[int] = []
        self.round: LoadedRound | None = None
        self.expected = {
            k: tuple(v.shape) for k, v in adapter_state(self.model.peft, GLOBAL).items()
        }
        self.problem: str | None = None  # why the newest round is not served (degraded)
        self.failed: tuple[str, float] | None = None  # (round, monotonic time) of the last failure
        self.retry_s = 30.0  # a round that failed is read again after this long
        self.lock = threading.RLock()  # re-entrant: run_batch and validate call slot/refresh
        self.reading = threading.Lock()  # one thread reads a new round, outside `lock`
        self.pinned: set[int] = set()  # clients of the running batch part: never evicted
        if not self.refresh():
            raise FileNotFoundError(f"{self.run_dir}: no committed round to serve yet")

    @property
    def kind(self) -> str:
        return self.cfg.model.kind

    def refresh(self) -> bool:
        """Switch to the newest committed round if training moved on and it checks out; True if
        a round is served. Raises only when there is no round to fall back on (start-up).

        The round is read outside `lock` (batches go on meanwhile); the swap takes it. While
        another thread is reading, this returns at once: the served round stays."""
        if not self.reading.acquire(blocking=not self.version):
            return True
        try:
            name = LATEST
            try:
                latest = self.run.latest()
                if latest is None:
                    return bool(self.version)
                name = latest.name
                if name == self.version or self._waiting(name):
                    return bool(self.version)
                loaded = self._read_round(latest)
            except (OSError, ValueError, KeyError, TypeError) as err:
                if not self.version:
                    raise
                if not self._waiting(name):  # once per retry_s in the log, not per request
                    self._degrade(name, err)
                return True
            with self.lock:  # never swap the global or evict under a running batch
                self._switch(loaded)
            return True
        finally:
            self.reading.release()

    def _waiting(self, name: str) -> bool:
        """True while the round `name` failed less than `retry_s` ago."""
        return (
            self.failed is not None
            and self.failed[0] == name
            and time.monotonic() < self.failed[1] + self.retry_s
        )

    def _degrade(self, name: str, err: Exception) -> None:
        """Report the failed round (public: `/healthz` shows it, so paths are relative to the
        run directory; the log has the full error)."""
        relative = str(err).replace(f"{self.run_dir}{os.sep}", "").replace(str(self.run_dir), ".")
        self.problem = (
            f"{name} could not be loaded ({relative}); serving {self.version}, "
            f"retrying every {self.retry_s:g} s"
        )
        self.failed = (name, time.monotonic())
        log.error("%s could not be loaded (%s); serving %s", name, err, self.version)

    def _switch(self, loaded: LoadedRound) -> None:
        """Replace the served round (everything was checked: nothing below can fail halfway)."""
        load_adapter_state(self.model.peft, GLOBAL, loaded.global_state)
        for cid in list(self.slots):
            self._evict(cid)
        self.round, self.clients = loaded, loaded.clients
        self.version = loaded.source.name
        self.problem = self.failed = None
        log.info("serving %s (%d clients)", loaded.source.name, len(self.clients))

    def _read_round(self, source: Round) -> LoadedRound:
        """Read and check a committed round whole; raises naming the file at fault. Local
        adapters and banks are checked one at a time and not kept: a client's are read again
        when it is loaded, so only resident clients' are in memory."""
        clients = source.client_ids()
        global_state = source.global_adapter()
        self._check_adapter(source.global_file, _shapes(global_state))
        _check_finite(source.global_dir, global_state)
        has_local = set()
        for cid in clients:
            files = source.client(cid)
            if files.has_local():
                self._check_adapter(files.local_file, _header_shapes(files.local_file))
                _check_finite(files.local_dir, files.read_local() or {})
                has_local.add(cid)
            _checked_bank(files)
        if not source.committed():
            raise FileNotFoundError(f"{source.path} was removed while it was read")
        return LoadedRound(source, clients, global_state, frozenset(has_local))

    def _check_adapter(self, where: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        if shapes.keys() != self.expected.keys():
            diff = sorted(shapes.keys() ^ self.expected.keys())[:3]
            raise ValueError(f"{where}: tensors do not match the model's LoRA layers (e.g. {diff})")
        for key, shape in shapes.items():
            if shape != self.expected[key]:
                raise ValueError(f"{where}: {key} has shape {shape}, not {self.expected[key]}")

    def describe(self) -> dict:
        """{"clients", "version", "kind"} without waiting for a running batch: the ingress asks on
        every request, and blocking here would hold requests back from the next batch. When the
        engine is idle it first picks up a newly committed round."""
        if self.lock.acquire(blocking=False):
            try:
                self.refresh()
            finally:
                self.lock.release()
        return {
            "clients": self.clients,
            "version": self.version,
            "kind": self.kind,
            "problem": self.problem,
        }

    def _evict(self, cid: int) -> None:
        slot = self.slots.pop(cid)
        if slot.has_local:
            self.stack.release(slot.index)

    def slot(self, cid: int) -> ClientSlot:
        """The client's cached slot, loading its local adapter + bank on a miss (LRU): the least
        recently used client not in the running batch part is evicted first, so at most
        `capacity` clients are ever resident."""
        with self.lock:  # Serve warms slots from the event loop while a batch runs
            if cid in self.slots:
                self.slots.move_to_end(cid)
                return self.slots[cid]
            if cid not in self.clients:
                raise UnknownClient(cid)
            assert self.round is not None  # set with self.clients
            self._make_room()
            start = time.perf_counter()
            files = self.round.source.client(cid)
            try:
                state = files.read_local() if cid in self.round.has_local else None
                bank = _checked_bank(files)
                if state is not None:
                    _check_finite(files.local_dir, state)
            except FileNotFoundError:
                raise RoundVanished(f"{self.version} was removed while serving it; retry") from None
            except Exception as err:  # the server's files, not the request: never a 4xx
                log.error("client %d of %s could not be loaded: %s", cid, self.version, err)
                raise Unavailable(
                    f"client {cid}'s adapters in {self.version} could not be loaded; the server "
                    "log has the details (the operator must repair or replace the round)"
                ) from None
            if cid in self.round.has_local and state is None:
                raise RoundVanished(f"{self.version} was removed while serving it; retry")
            index = -1 if state is None else self.stack.put(state, owner=str(files.local_dir))
            self.slots[cid] = ClientSlot(cid, index, bank, time.perf_counter() - start)
            return self.slots[cid]

    def _make_room(self) -> None:
        """Evict least recently used clients (never the running part's) until one more fits."""
        for old in list(self.slots):
            if len(self.slots) < self.capacity:
                return
            if old not in self.pinned:
                self._evict(old)
        if len(self.slots) >= self.capacity:  # run_batch splits batches: cannot happen
            raise RuntimeError(f"all {self.capacity} resident clients are in the running batch")

    def slots_for(self, cids: list[int]) -> list[ClientSlot]:
        """Every client's slot; if training pruned the served round meanwhile, the newest round
        is switched to and the slots are loaded from it (once)."""
        try:
            return [self.slot(c) for c in cids]
        except RoundVanished:
            self.failed = None  # read the newest round now
            self.refresh()
            return [self.slot(c) for c in cids]

    def _weights(self, requests: list[Request], slots: list[ClientSlot], route: StackRoute) -> Mix:
        """Per-row (global, local) weights: `mix_rows`, the function evaluation calls too."""
        examples = [r.example for r in requests]
        rows = [
            s.weighting.row(self._mode(r, s), self.cfg.seed, self.model.query_text(r.example))
            for r, s in zip(requests, slots, strict=True)
        ]
        return mix_rows(rows, query_representations(self.model, examples, rows, route))

    def _mode(self, req: Request, slot: ClientSlot) -> WeightingConfig:
        """The request's weighting. A client without a local adapter gets the global adapter
        alone whatever the mode (`mix_rows`); one with a local adapter but no bank (a run trained
        with a bank-free weighting) can only use the bank-free modes."""
        mode = (
            self.weighting
            if req.mode is None
            else self.weighting.model_copy(update={"mode": req.mode})
        )
        if slot.has_local and needs_bank(mode) and slot.bank is None:
            raise ValueError(
                f"client {slot.client_id} has no representation bank in this run: "
                "use weighting fixed, global_only or local_only"
            )
        return mode

    def validate(self, req: Request) -> None:
        """Raise UnknownClient / ValueError for a request that cannot be served.

        A resident client is checked without the lock, so requests keep validating (and joining
        the next batch) while a batch runs; a miss loads the client under the lock. `run_batch`
        resolves every slot again under the lock, so an eviction in between only costs a reload.
        """
        slot = self.slots.get(req.client_id)  # a dict read: atomic, never a torn slot
        if slot is None:
            self.refresh()
            with self.lock:
                (slot,) = self.slots_for([req.client_id])
        self._mode(req, slot)
        if req.task == "generate" and self.kind != "causal_lm":
            raise ValueError(
                "this run's model is multiple_choice: it scores OPTIONS, it does not generate"
            )
        if req.task == "predict" and len(req.example.options) < 2:
            raise ValueError("predict needs two or more OPTIONS")
        if req.max_prompt_tokens is not None:
            text = self.model.query_text(req.example)
            count = len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
            if count > req.max_prompt_tokens:
                raise TooLarge(f"prompt has {count} tokens; the limit is {req.max_prompt_tokens}")

    def run_batch(self, requests: list[Request], on_text: TextSink | None = None) -> list[Result]:
        """Serve a batch of (possibly) many clients' requests in one pass (in parts of at most
        `capacity` distinct clients). `on_text(i, delta)` receives the generated text of
        `requests[i]` as it is decoded (streaming)."""
        self.refresh()
        results: list[Result | None] = [None] * len(requests)
        with self.lock, torch.no_grad():
            for rows in _parts(requests, self.capacity):
                part = [requests[i] for i in rows]
                sink = None if on_text is None else _rows_to_requests(on_text, rows)
                self.pinned = {r.client_id for r in part}
                try:
                    slots = self.slots_for([r.client_id for r in part])
                    route = StackRoute(self.stack, torch.tensor([s.index for s in slots]))
                    mix = self._weights(part, slots, route)
                    for i, result in zip(rows, self._run(part, mix, route, sink), strict=True):
                        results[i] = result
                finally:
                    self.pinned = set()
        return [r for r in results if r is not None]

    def _count(self, text: str, special: bool) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _run(
        self,
        requests: list[Request],
        mix: Mix,
        route: StackRoute,
        on_text: TextSink | None,
    ) -> list[Result]:
        wg, wl = mix.as_rows(len(requests))
        results = [
            Result(r.client_id, float(wg[i]), float(wl[i]), self.version)
            for i, r in enumerate(requests)
        ]
        predict = [i for i, r in enumerate(requests) if r.task == "predict"]
        generate = [i for i, r in enumerate(requests) if r.task == "generate"]
        if predict:
            examples = [requests[i].example for i in predict]
            at = torch.tensor(predict)
            probs = self.model.option_probs(examples, mix.rows(at), route.rows(at))
            for i, ex, p in zip(predict, examples, probs, strict=True):
                results[i].probs = p.tolist()
                results[i].choice = ex.options[int(p.argmax())]
                results[i].prompt_tokens = self._count(self.model.query_text(ex), special=True)
                results[i].completion_tokens = self._count(results[i].choice, special=False)
        if generate:
            gen_fn = getattr(self.model, "generate_rows", None)
            if gen_fn is None:
                raise ValueError(
                    "this run's model is multiple_choice: it scores OPTIONS, it does not generate"
                )
            for (tokens, beams), rows in self._decoding_groups(requests, generate).items():
                sink = None if on_text is None else _rows_to_requests(on_text, rows)
                at = torch.tensor(rows)
                generated = gen_fn(
                    [requests[i].example for i in rows],
                    mix.rows(at),
                    max_new_tokens=tokens,
                    num_beams=beams,
                    on_text=sink,
                    route=route.rows(at),
                )
                for i, g in zip(rows, generated, strict=True):
                    results[i].text = g.text
                    results[i].prompt_tokens = g.prompt_tokens
                    results[i].completion_tokens = g.completion_tokens
                    results[i].finish_reason = g.finish_reason
        return results

    def _decoding_groups(
        self, requests: list[Request], rows: list[int]
    ) -> dict[tuple[int, int], list[int]]:
        """Rows by (max new tokens, beams): each group decodes only as far as it asked."""
        evaluation = self.cfg.eval
        groups: dict[tuple[int, int], list[int]] = {}
        for i in rows:
            req = requests[i]
            tokens = req.max_new_tokens or evaluation.max_new_tokens
            beams = min(evaluation.num_beams, req.max_beams or evaluation.num_beams)
            groups.setdefault((tokens, beams), []).append(i)
        return groups


def _parts(requests: list[Request], capacity: int) -> list[list[int]]:
    """Row indices in order, cut into parts of at most `capacity` distinct clients each."""
    parts: list[list[int]] = [[]]
    clients: set[int] = set()
    for i, req in enumerate(requests):
        if req.client_id not in clients and len(clients) == capacity:
            parts.append([])
            clients = set()
        clients.add(req.client_id)
        parts[-1].append(i)
    return parts


def _check_finite(where: Path, state: AdapterState) -> None:
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{where}: {key} holds NaN or inf")


def _checked_bank(files: ClientFiles) -> ClientBank | None:
    """The client's bank, checked, as a copy (the loaded tensors may map the file, which must
    not pin the round); None without one."""
    bank = files.read_bank()
    if bank is None:
        return None
    if bank.vectors.ndim != 2 or not torch.isfinite(bank.vectors).all():
        raise ValueError(f"{files.bank_file}: not an (N, H) finite bank")
    return replace(bank, vectors=bank.vectors.clone(), loo=bank.loo.clone())


def _rows_to_requests(on_text: TextSink, rows: list[int]) -> TextSink:
    """A decoding group's row k is the batch's request rows[k]."""
    return lambda k, delta: on_text(rows[k], delta)


def _shapes(state: AdapterState) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a saved adapter from the file's header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types, naming no file
        raise ValueError(f"{path}: unreadable adapter ({err})") from None
