"""Many clients' local adapters in one forward pass (FedDPA arXiv 2403.19211, Eq. 6).

A batch holding requests of many clients needs, in every adapted layer,

    h_i = W0·x_i + s·[ w_g,i · B_g A_g x_i + w_l,i · B_{c(i)} A_{c(i)} x_i ]

where c(i) is row i's client. The global term is stock peft (per-row scaling). The local term
comes from a `LocalStack`: every resident client's A (r, in) and B (out, r) stacked per layer in
slots, gathered per row and applied with two batched matmuls (the gather-and-bmm of Punica/S-LoRA,
in plain torch). The cost is one LoRA branch whatever the number of clients in the batch; peft's
one-adapter-per-client alternative runs every resident client's branch over every row.

A client's slot is filled from its adapter in stock PEFT key format (the run directory's files);
the stack grows by doubling when all slots are taken, up to its `limit` (the engine's capacity:
it evicts a client before loading one beyond it). A batch's `StackRoute` (each row's slot) is
passed beside its `Mix`: core's `RowRoute` hook, which `mixed` applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from feddpa.core.adapters import GLOBAL, AdapterState, lora_layers, select_rows


class LocalStack:
    def __init__(self, model: nn.Module, slots: int = 8, limit: int | None = None) -> None:
        self.limit = limit  # most slots ever allocated; None: no bound
        layers = list(lora_layers(model))
        names = {id(m): name for name, m in model.named_modules()}
        self.keys: dict[str, tuple[int, str]] = {}  # PEFT key -> (layer index, "A" | "B")
        self.A: list[torch.Tensor] = []  # per layer (S, r, in)
        self.B: list[torch.Tensor] = []  # per layer (S, out, r)
        self.scale: list[float] = []
        for i, layer in enumerate(layers):
            if layer.fan_in_fan_out or any(layer.use_dora.values()):  # type: ignore[attr-defined]
                raise ValueError("LocalStack supports plain LoRA on nn.Linear layers only")
            a: torch.Tensor = layer.lora_A[GLOBAL].weight  # type: ignore[assignment]  # (r, in)
            b: torch.Tensor = layer.lora_B[GLOBAL].weight  # type: ignore[assignment]  # (out, r)
            self.A.append(a.new_zeros((slots, *a.shape)))
            self.B.append(b.new_zeros((slots, *b.shape)))
            self.scale.append(layer.lora_alpha[GLOBAL] / layer.r[GLOBAL])
            self.keys[f"{names[id(layer)]}.lora_A.weight"] = (i, "A")
            self.keys[f"{names[id(layer)]}.lora_B.weight"] = (i, "B")
        self.layers = layers
        self.free = list(range(slots))[::-1]  # pop() hands out the lowest slot first

    @property
    def capacity(self) -> int:
        return self.A[0].shape[0] if self.A else 0

    def _grow(self) -> None:
        old, n = self.capacity, max(1, self.capacity)  # doubles; a 0-slot stack gets 1
        if self.limit is not None:
            n = min(n, self.limit - old)
        if n <= 0:
            raise RuntimeError(f"all {old} slots of the local-adapter stack are taken: evict first")
        self.A = [torch.cat([t, t.new_zeros((n, *t.shape[1:]))]) for t in self.A]
        self.B = [torch.cat([t, t.new_zeros((n, *t.shape[1:]))]) for t in self.B]
        self.free = list(range(old + n - 1, old - 1, -1)) + self.free

    def put(self, state: AdapterState, owner: str = "adapter") -> int:
        """Copy an adapter (PEFT key format) into a free slot; returns the slot."""
        if state.keys() != self.keys.keys():
            diff = sorted(state.keys() ^ self.keys.keys())[:3]
            raise KeyError(f"{owner}: tensors do not match the model's LoRA layers (e.g. {diff})")
        for key, (i, which) in self.keys.items():
            want = (self.A if which == "A" else self.B)[i].shape[1:]
            if state[key].shape != want:
                raise KeyError(f"{owner}: {key} has shape {tuple(state[key].shape)}, not {want}")
        if not self.free:
            self._grow()
        slot = self.free.pop()
        with torch.no_grad():
            for key, (i, which) in self.keys.items():
                (self.A if which == "A" else self.B)[i][slot].copy_(state[key])
        return slot

    def release(self, slot: int) -> None:
        for t in (*self.A, *self.B):
            t[slot].zero_()
        self.free.append(slot)

    @contextmanager
    def applied(self, slot_of_row: torch.Tensor, weight: torch.Tensor) -> Iterator[None]:
        """Within the block every LoRA layer adds s·w_i·B[slot_i] A[slot_i] x_i to row i's output;
        `slot_of_row` (B,) int (-1: no local adapter, weight must be 0), `weight` (B,)."""
        if slot_of_row.shape != weight.shape:
            raise ValueError(f"{slot_of_row.shape} slots for {weight.shape} row weights")
        rows = slot_of_row.clamp(min=0).to(self.A[0].device if self.A else "cpu")
        w = weight.masked_fill(slot_of_row < 0, 0.0)
        handles: list[RemovableHandle] = []
        for i, layer in enumerate(self.layers):
            a, b = self.A[i][rows], self.B[i][rows]  # (B, r, in), (B, out, r): gathered once
            coef = (self.scale[i] * w).to(a.device, a.dtype).view(-1, 1, 1)
            module: nn.Module = layer  # type: ignore[assignment]  # peft's lora.Linear
            handles.append(module.register_forward_hook(_local_term(a.transpose(1, 2), b, coef)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _local_term(a_t: torch.Tensor, b: torch.Tensor, coef: torch.Tensor):
    b_t = b.transpose(1, 2)  # (B, r, out)

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_t.dtype)  # (B, T, in)
        if x3.shape[0] != a_t.shape[0]:
            raise ValueError(f"batch of {x3.shape[0]} rows, per-row adapters for {a_t.shape[0]}")
        term = torch.bmm(torch.bmm(x3, a_t), b_t) * coef  # (B, T, out)
        return output + term.view(output.shape).to(output.dtype)

    return hook


@dataclass(frozen=True)
class StackRoute:
    """Each row's slot in `stack` (-1: the row's client has no local adapter): a `RowRoute`."""

    stack: LocalStack
    index: torch.Tensor  # (B,) int

    def rows(self, index: torch.Tensor | None = None, repeat: int = 1) -> StackRoute:
        return StackRoute(self.stack, select_rows(self.index, index, repeat))

    def applied(self, weight: torch.Tensor) -> AbstractContextManager[None]:
        return self.stack.applied(self.index, weight)
