"""Training engines for a client host: plain torch, or DeepSpeed ZeRO — the only deepspeed import.

A host owns one engine for its process. The engine decides how a phase's optimizer steps (a
`PhaseOptimizer` factory for `run_phase`) and how adapter tensors are read and written (under
ZeRO-3 the module's parameters are partitioned and must be gathered first).

DeepSpeed, one engine per process, reused by every phase and client the process hosts. It is
built once around the whole PEFT model with the LoRA parameters of both adapters as two parameter
groups (`global`, `local`). Each phase restarts the optimizer as the algorithm asks (a fresh AdamW
with linear decay, FedDPA arXiv 2403.19211 / the reference code):

- the fp32 master copy is refreshed from the module (the host loaded a client's adapters there);
- the AdamW moments and step counts are dropped;
- the frozen adapter's group steps with lr 0 and weight decay 0, so it stays bit-identical;
- the trained group's lr follows lr·(T−k)/T, set before step k (no DeepSpeed scheduler: 0.19.8's
  WarmupDecayLR rejects warmup_num_steps 0 and clamps it to ≥ 2, so step 0 would run at lr 0).

The optimizer is torch's AdamW (`torch_adam: true`), the same update as the torch path, so no
cpu_adam / fused_adam op is compiled. Gradient accumulation is unmanaged: `run_phase` scales each
micro-batch loss to its share of the step and every `step()` is a boundary, so a short last batch
is exact. On CPU: DS_ACCELERATOR=cpu, gloo, world size 1 with a free MASTER_PORT per process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from feddpa.core import adapters
from feddpa.core.adapters import ADAPTERS, AdapterState
from feddpa.core.atomic import atomic_write_bytes
from feddpa.core.config import ExperimentConfig, TrainConfig
from feddpa.core.models import TaskModel
from feddpa.core.training import OptimizerFactory, PhaseOptimizer

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, spelled out so both paths match
ADAM_EPS = 1e-8


def deepspeed_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run, derived from `train` and `engine` (world size 1)."""
    train, eng = cfg.train, cfg.engine
    zero: dict[str, Any] = {"stage": eng.zero_stage}
    if eng.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if eng.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if eng.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = eng.stage3_param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.batch_size // train.micro_batch_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": eng.precision == "bf16"},
        "fp16": {"enabled": eng.precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "weight_decay": train.weight_decay,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def write_deepspeed_config(cfg: ExperimentConfig, path: Path) -> Path:
    """Write the resolved DeepSpeed config (`RunDir.deepspeed_file`) for the record, atomically
    (several actors may write it at once)."""
    atomic_write_bytes(path, (json.dumps(deepspeed_config(cfg), indent=2) + "\n").encode())
    return path


class TorchEngine:
    """The default: torch AdamW per phase, adapters read and written in place."""

    optimizer_factory: OptimizerFactory | None = None

    def __init__(self, model: TaskModel) -> None:
        self.model = model

    def gathered(self, name: str, modify: bool = False) -> AbstractContextManager[None]:
        return nullcontext()

    def adapter_state(self, name: str) -> AdapterState:
        with self.gathered(name):
            return adapters.adapter_state(self.model.peft, name)

    def load_adapter_state(self, name: str, state: AdapterState) -> None:
        with self.gathered(name, modify=True):
            adapters.load_adapter_state(self.model.peft, name, state)

    def fresh_adapter_state(self, seed: int) -> AdapterState:
        with self.gathered(adapters.GLOBAL):
            return adapters.fresh_adapter_state(self.model.peft, seed)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The LoRA parameters of adapter `name` (the ones `set_trainable(model, name)` trains)."""
    return [p for k, p in model.named_parameters() if f".{name}." in k and "lora_" in k]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _import_deepspeed(device: torch.device) -> Any:
    """deepspeed, with the accelerator matching the model's device (chosen before the import)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else device.type)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if (device.type == "cpu") != (accelerator == "cpu"):
        raise RuntimeError(
            f"the model is on {device} but DeepSpeed's accelerator is {accelerator!r}: set "
            f"DS_ACCELERATOR={'cpu' if device.type == 'cpu' else device.type} for the actors"
        )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def init_distributed_once(deepspeed: Any, backend: str) -> None:
    """World size 1 for this process on 127.0.0.1 and a free port; a no-op when already done."""
    if torch.distributed.is_initialized():
        return
    port = _free_port()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_SIZE="1",
    )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    # The CPU shm comm op maps a 66 MB /dev/shm segment per process and never unlinks it; with
    # one rank nobody else opens it, so drop the name now (the mapping stays valid).
    shm = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0")
    shm.unlink(missing_ok=True)


class DeepSpeedEngine(TorchEngine):
    """One DeepSpeed engine around the host's model, restarted (not rebuilt) for every phase."""

    def __init__(self, model: TaskModel, cfg: ExperimentConfig) -> None:
        super().__init__(model)
        device = next(model.peft.parameters()).device
        self._ds = _import_deepspeed(device)
        init_distributed_once(self._ds, "gloo" if device.type == "cpu" else "nccl")
        self.train_cfg = cfg.train
        groups = {name: adapter_parameters(model.peft, name) for name in ADAPTERS}
        self._group_of = {id(p): i for i, name in enumerate(ADAPTERS) for p in groups[name]}
        for params in groups.values():  # ZeRO keeps only parameters that require grad
            for p in params:
                p.requires_grad = True
        self.engine, *_ = self._ds.initialize(
            model=model.peft,
            model_parameters=[{"params": groups[name], "name": name} for name in ADAPTERS],
            config=deepspeed_config(cfg),
        )
        adapters.set_trainable(model.peft, None)
        model.peft.eval()
        self.optimizer_factory = self.restart

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    def gathered(self, name: str, modify: bool = False) -> AbstractContextManager[None]:
        if not self.zero3:
            return nullcontext()
        return self._ds.zero.GatheredParameters(
            adapter_parameters(self.model.peft, name), modifier_rank=0 if modify else None
        )

    def restart(
        self, params: list[nn.Parameter], train: TrainConfig, total_steps: int
    ) -> PhaseOptimizer:
        """A fresh optimizer for a phase training `params` (one adapter's group)."""
        if train.max_grad_norm != self.train_cfg.max_grad_norm:
            raise ValueError(
                "train.max_grad_norm differs from the one the DeepSpeed engine was built with"
            )
        owners = {self._group_of.get(id(p)) for p in params}
        if len(owners) != 1 or None in owners:
            raise ValueError("a DeepSpeed phase must train exactly one adapter's LoRA parameters")
        (index,) = owners
        assert index is not None
        zero = self.engine.optimizer
        if hasattr(zero, "refresh_fp32_params"):
            zero.refresh_fp32_params()
        basic = self.engine.basic_optimizer
        basic.state.clear()
        for i, group in enumerate(basic.param_groups):
            group["lr"] = train.lr if i == index else 0.0
            group["weight_decay"] = train.weight_decay if i == index else 0.0
        return DeepSpeedPhase(self.engine, basic.param_groups[index], train.lr, total_steps)


class DeepSpeedPhase:
    """Backward and step through the engine; the linear decay is applied to the trained group."""

    def __init__(self, engine: Any, group: dict, lr: float, total_steps: int) -> None:
        self.engine = engine
        self.group = group
        self.lr = lr
        self.total = total_steps
        self.done = 0

    def backward(self, loss: torch.Tensor) -> None:
        # engine.forward would reset ZeRO's per-backward hook bookkeeping; the model is called
        # directly (TaskModel.loss), so reset it here, before each micro-batch's backward.
        reset = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if reset is not None:
            reset()
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        # transformers' get_linear_schedule_with_warmup(opt, 0, T) at step k, same float math
        k, t = self.done, self.total
        self.group["lr"] = self.lr * max(0.0, float(t - k) / float(max(1, t)))
        self.engine.step()
        self.done += 1


def build_engine(cfg: ExperimentConfig, model: TaskModel) -> TorchEngine:
    """The engine `cfg.engine.kind` names, around the host's model."""
    if cfg.engine.kind == "deepspeed":
        return DeepSpeedEngine(model, cfg)
    return TorchEngine(model)
