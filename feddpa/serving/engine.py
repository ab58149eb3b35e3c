"""The serving engine: one base model + the current global adapter, and an LRU of client local
adapters (each a slot of a `LocalStack`) with their representation banks.

A batch may hold requests of many clients: `Mix.local_of_row` gives each row its client's stack
slot and its own instance-wise weight, so the batch runs as one forward pass whose LoRA cost does
not grow with the number of clients in it (FedDPA, arXiv 2403.19211, Eq. 6–7; the math is
`feddpa.core`'s).

Roll-out: at the start of every batch the engine checks the run's LATEST round; when training has
committed a new one it swaps in the new global adapter and drops cached clients (their local
adapters changed too). Batches run one at a time per replica, so no request sees mixed versions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from feddpa.core import algorithms
from feddpa.core.adapters import GLOBAL, Mix, load_adapter_state, set_trainable
from feddpa.core.config import WeightingConfig, WeightMode, load_config
from feddpa.core.evaluation import ClientWeighting, query_representations
from feddpa.core.models import build_task_model
from feddpa.core.records import Example
from feddpa.core.stack import LocalStack
from feddpa.core.storage import client_dir, latest_checkpoint, load_adapter, load_bank
from feddpa.core.weighting import ClientBank, mix_rows, needs_bank
from feddpa.serving.errors import TooLarge, UnknownClient

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


class ServingEngine:
    def __init__(self, run_dir: str | Path, capacity: int = 128) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = load_config(self.run_dir / "config.yaml")
        self.model = build_task_model(self.cfg.model, self.cfg.lora, self.cfg.eval)
        self.model.peft.base_model.set_adapter([GLOBAL])  # type: ignore[union-attr,operator]
        set_trainable(self.model.peft, None)  # set_adapter marks the active adapter trainable
        self.stack = LocalStack(self.model.peft, slots=min(capacity, 16))  # grows by doubling
        self.weighting = algorithms.eval_weighting(self.cfg)
        self.capacity = capacity
        self.slots: OrderedDict[int, ClientSlot] = OrderedDict()
        self.version = ""
        self.clients: list[int] = []
        self.lock = threading.RLock()  # re-entrant: run_batch and validate call slot/refresh
        if not self.refresh():
            raise FileNotFoundError(f"{self.run_dir}: no committed round to serve yet")

    @property
    def kind(self) -> str:
        return self.cfg.model.kind

    def refresh(self) -> bool:
        """Switch to the newest committed round if training moved on; True if one is loaded."""
        with self.lock:  # never swap the global or evict under a running batch
            latest = latest_checkpoint(self.run_dir / "checkpoints")
            if latest is None:
                return bool(self.version)
            if latest.name != self.version:
                state = json.loads((latest / "state.json").read_text())
                load_adapter_state(self.model.peft, GLOBAL, load_adapter(latest / "global"))
                for cid in list(self.slots):
                    self._evict(cid)
                self.clients = sorted(state["clients"])
                self.version, self.checkpoint = latest.name, latest
                log.info("serving %s (%d clients)", latest.name, len(self.clients))
            return True

    def describe(self) -> dict:
        """{"clients", "version", "kind"} without waiting for a running batch: the ingress asks on
        every request, and blocking here would hold requests back from the next batch. When the
        engine is idle it first picks up a newly committed round."""
        if self.lock.acquire(blocking=False):
            try:
                self.refresh()
            finally:
                self.lock.release()
        return {"clients": self.clients, "version": self.version, "kind": self.kind}

    def _evict(self, cid: int) -> None:
        slot = self.slots.pop(cid)
        if slot.has_local:
            self.stack.release(slot.index)

    def slot(self, cid: int) -> ClientSlot:
        """The client's cached slot, loading its local adapter + bank on a miss (LRU)."""
        with self.lock:  # Serve warms slots from the event loop while a batch runs
            if cid in self.slots:
                self.slots.move_to_end(cid)
                return self.slots[cid]
            if cid not in self.clients:
                raise UnknownClient(cid)
            start = time.perf_counter()
            cdir = client_dir(self.checkpoint, cid)
            index = (
                self.stack.put(load_adapter(cdir / "local"), owner=str(cdir / "local"))
                if (cdir / "local").is_dir()
                else -1
            )
            bank = (
                load_bank(cdir / "bank.safetensors")
                if (cdir / "bank.safetensors").is_file()
                else None
            )
            self.slots[cid] = ClientSlot(cid, index, bank, time.perf_counter() - start)
            return self.slots[cid]

    def shrink(self) -> None:
        """Evict least recently used clients beyond the capacity (never during a batch)."""
        while len(self.slots) > self.capacity:
            self._evict(next(iter(self.slots)))

    def _weights(self, requests: list[Request], slots: list[ClientSlot], route: Mix) -> Mix:
        """Per-row (global, local) weights: `mix_rows`, the function evaluation calls too."""
        examples = [r.example for r in requests]
        rows = [
            s.weighting.row(self._mode(r, s), self.cfg.seed, self.model.query_text(r.example))
            for r, s in zip(requests, slots, strict=True)
        ]
        mix = mix_rows(rows, query_representations(self.model, examples, rows, route))
        return Mix(mix.global_w, mix.local_w, route.local_of_row, route.stack)

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
            with self.lock:
                self.refresh()
                slot = self.slot(req.client_id)
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

    def run_batch(self, requests: list[Request]) -> list[Result]:
        """Serve a batch of (possibly) many clients' requests in one pass."""
        with self.lock, torch.no_grad():
            self.refresh()
            slots = [self.slot(r.client_id) for r in requests]
            route = Mix(0.0, 1.0, torch.tensor([s.index for s in slots]), self.stack)
            try:
                return self._run(requests, self._weights(requests, slots, route))
            finally:
                self.shrink()

    def _run(self, requests: list[Request], mix: Mix) -> list[Result]:
        wg, wl = mix.as_rows(len(requests))
        results = [
            Result(r.client_id, float(wg[i]), float(wl[i]), self.version)
            for i, r in enumerate(requests)
        ]
        predict = [i for i, r in enumerate(requests) if r.task == "predict"]
        generate = [i for i, r in enumerate(requests) if r.task == "generate"]
        if predict:
            examples = [requests[i].example for i in predict]
            probs = self.model.option_probs(examples, mix.rows(torch.tensor(predict)))
            for i, ex, p in zip(predict, examples, probs, strict=True):
                results[i].probs = p.tolist()
                results[i].choice = ex.options[int(p.argmax())]
        if generate:
            gen_fn = getattr(self.model, "generate", None)
            if gen_fn is None:
                raise ValueError(
                    "this run's model is multiple_choice: it scores OPTIONS, it does not generate"
                )
            for (tokens, beams), rows in self._decoding_groups(requests, generate).items():
                texts = gen_fn(
                    [requests[i].example for i in rows],
                    mix.rows(torch.tensor(rows)),
                    max_new_tokens=tokens,
                    num_beams=beams,
                )
                for i, text in zip(rows, texts, strict=True):
                    results[i].text = text
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
