"""One training phase: a fresh AdamW with linear decay over the phase's steps (as the reference
code restarts its optimizer and schedule for each phase), one adapter trained, the other frozen.

All randomness (shuffling, dropout) comes from `seed`, so a client's update depends only on
(seed, round, client, phase) — not on which process or actor runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
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


def batches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


def run_phase(
    model: TaskModel, data: list[Example], phase: Phase, cfg: TrainConfig, seed: int
) -> PhaseResult:
    if not data:
        raise ValueError(f"phase {phase.name!r}: no training examples")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * phase.epochs
    losses: list[float] = []
    with training(model.peft, phase.adapter) as params:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, 0, total)
        for _ in range(phase.epochs):
            epoch_loss, seen = 0.0, 0
            for step in batches(len(data), cfg.batch_size, gen):
                opt.zero_grad(set_to_none=True)
                for start in range(0, len(step), cfg.micro_batch_size):
                    micro = [data[i] for i in step[start : start + cfg.micro_batch_size]]
                    loss = model.loss(micro, phase.mix)
                    (loss * len(micro) / len(step)).backward()
                    epoch_loss += float(loss.detach()) * len(micro)
                    seen += len(micro)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
            losses.append(epoch_loss / seen)
    return PhaseResult(phase.name, total, tuple(losses))
