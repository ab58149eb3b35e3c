"""One training phase: a fresh AdamW with linear decay over the phase's steps (as the reference
code restarts its optimizer and schedule for each phase), one adapter trained, the other frozen.

All randomness (shuffling, dropout) comes from `seed`, so a client's update depends only on
(seed, round, client, phase) — not on which process or actor runs it.

The optimizer step is pluggable: `run_phase` hands gradients to a `PhaseOptimizer` built by an
`OptimizerFactory` for the phase. The default is torch AdamW + linear decay; the DeepSpeed ZeRO
engine (feddpa.actors.engine) implements the same protocol, so core never imports deepspeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from feddpa.core.adapters import Mix, training
from feddpa.core.config import TrainConfig
from feddpa.core.models import TaskModel
from feddpa.core.records import Example


@dataclass(frozen=True)
class Phase:
    """Train `adapter` for `epochs` with the forward mix `mix` (the other adapter stop-grad)."""

    name: str
    adapter: str
    mix: Mix
    epochs: int


@dataclass(frozen=True)
class PhaseResult:
    name: str
    steps: int
    epoch_losses: tuple[float, ...]


class PhaseOptimizer(Protocol):
    """One phase's optimizer, fresh for the phase: gradients in, clipped updates out."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (already scaled to its share of the step)."""
        ...

    def step(self) -> None:
        """Clip, update the parameters, advance the LR schedule, clear the gradients."""
        ...


OptimizerFactory = Callable[[list[nn.Parameter], TrainConfig, int], PhaseOptimizer]


class TorchPhaseOptimizer:
    """AdamW with linear decay to 0 over `total_steps`, no warmup; grad-norm clipping."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig, total_steps: int) -> None:
        self.params = params
        self.max_grad_norm = cfg.max_grad_norm
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = get_linear_schedule_with_warmup(self.opt, 0, total_steps)
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, total_steps: int
) -> PhaseOptimizer:
    """The default phase optimizer (torch)."""
    return TorchPhaseOptimizer(params, cfg, total_steps)


def batches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


def run_phase(
    model: TaskModel,
    data: list[Example],
    phase: Phase,
    cfg: TrainConfig,
    seed: int,
    optimizer_factory: OptimizerFactory | None = None,
) -> PhaseResult:
    """Train `phase.adapter` for `phase.epochs`; `optimizer_factory` defaults to torch AdamW."""
    if not data:
        raise ValueError(f"phase {phase.name!r}: no training examples")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * phase.epochs
    losses: list[float] = []
    with training(model.peft, phase.adapter) as params:
        opt = (optimizer_factory or make_optimizer)(params, cfg, total)
        for _ in range(phase.epochs):
            epoch_loss, seen = 0.0, 0
            for step in batches(len(data), cfg.batch_size, gen):
                for start in range(0, len(step), cfg.micro_batch_size):
                    micro = [data[i] for i in step[start : start + cfg.micro_batch_size]]
                    loss = model.loss(micro, phase.mix)
                    opt.backward(loss * len(micro) / len(step))
                    epoch_loss += float(loss.detach()) * len(micro)
                    seen += len(micro)
                opt.step()
            losses.append(epoch_loss / seen)
    return PhaseResult(phase.name, total, tuple(losses))
