"""Dual LoRA adapters on stock peft (FedDPA, arXiv 2403.19211, Sec. 4).

Every adapted linear layer computes

    h = W0·x + s·[ w_g·B_g A_g x + w_l·B_l A_l x ]        s = lora_alpha / r

where (w_g, w_l) is a `Mix`. peft keeps a per-adapter `scaling` in each LoRA layer; we set it to
s·w, and w may be a tensor of shape (B,) so one batch mixes many rows (reshaped to (B, 1, 1)).
A `RowRoute` passed beside the mix (as peft's per-call `adapter_names=`) gives each row a local
adapter of its own in place of the one named `local`.
Training one adapter freezes the other and stops the gradient through its output (a forward hook
that detaches its lora_B output), so `a·ΔL + (1−a)·stopgrad(ΔG)` is exact.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

GLOBAL = "global"
LOCAL = "local"
ADAPTERS = (GLOBAL, LOCAL)

AdapterState = dict[str, torch.Tensor]


def select_rows(
    t: torch.Tensor, index: torch.Tensor | None = None, repeat: int = 1
) -> torch.Tensor:
    """Per-example values as per-sequence rows: the rows `index` of `t`, each repeated `repeat`x."""
    if index is not None:
        t = t[index]
    return t.repeat_interleave(repeat) if repeat > 1 else t


@dataclass(frozen=True)
class Mix:
    """Weights of the global and local adapter: floats, or tensors of shape (B,) per row."""

    global_w: float | torch.Tensor
    local_w: float | torch.Tensor

    def rows(self, index: torch.Tensor | None = None, repeat: int = 1) -> Mix:
        """Expand per-example weights to per-sequence rows: select by `index`, repeat each `repeat`x."""

        def expand(w: float | torch.Tensor) -> float | torch.Tensor:
            return select_rows(w, index, repeat) if isinstance(w, torch.Tensor) else w

        return Mix(expand(self.global_w), expand(self.local_w))

    def as_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row tensors (n,) of both weights."""

        def full(w: float | torch.Tensor) -> torch.Tensor:
            return w.float() if isinstance(w, torch.Tensor) else torch.full((n,), float(w))

        return full(self.global_w), full(self.local_w)


class RowRoute(Protocol):
    """A local adapter per row, passed beside a `Mix` (as peft's per-call `adapter_names=`): within
    `mixed`, row i's local term comes from adapter `index[i]` (-1: none) instead of the adapter
    named `local`. `mixed` applies it; an implementation holds the adapters."""

    @property
    def index(self) -> torch.Tensor:
        """(B,) int: each row's adapter; rows with the same index share their local term."""
        ...

    def rows(self, index: torch.Tensor | None = None, repeat: int = 1) -> RowRoute:
        """The route of `Mix.rows(index, repeat)`'s rows."""
        ...

    def applied(self, weight: torch.Tensor) -> AbstractContextManager[None]:
        """Within the block every LoRA layer adds row i's local term times `weight[i]` (B,)."""
        ...


def route_rows(
    route: RowRoute | None, index: torch.Tensor | None = None, repeat: int = 1
) -> RowRoute | None:
    """`route.rows(index, repeat)`, or None without a route."""
    return None if route is None else route.rows(index, repeat)


GLOBAL_ONLY = Mix(1.0, 0.0)
LOCAL_ONLY = Mix(0.0, 1.0)


def attach_dual_adapters(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap `model` with the two named adapters (same LoRA config), both active."""
    peft_model = get_peft_model(model, config, adapter_name=GLOBAL)
    peft_model.add_adapter(LOCAL, config)
    peft_model.base_model.set_adapter(list(ADAPTERS))  # type: ignore[operator]
    set_trainable(peft_model, None)
    return peft_model


_LAYERS: weakref.WeakKeyDictionary[nn.Module, list[LoraLayer]] = weakref.WeakKeyDictionary()


def lora_layers(model: nn.Module) -> Iterator[LoraLayer]:
    """The model's LoRA layers, found once per model (the module walk is on every forward's path;
    adding or deleting adapters changes the layers' contents, never which layers there are)."""
    if model not in _LAYERS:
        _LAYERS[model] = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return iter(_LAYERS[model])


def _base_scale(layer: LoraLayer, name: str) -> float:
    return layer.lora_alpha[name] / layer.r[name]


def _layer_weight(w: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w.to(device=like.device, dtype=like.dtype).view(-1, 1, 1)
    return w


@contextmanager
def mixed(model: nn.Module, mix: Mix, route: RowRoute | None = None) -> Iterator[None]:
    """Run the block with adapter scalings s·w_g and s·w_l (the local term from `route`'s adapters
    when one is given); restores the plain scalings after."""
    local_w = mix.local_w if route is None else 0.0  # the route supplies the local term
    weights = {GLOBAL: mix.global_w, LOCAL: local_w}
    for layer in lora_layers(model):
        ref = layer.lora_A[GLOBAL].weight
        assert isinstance(ref, torch.Tensor)
        for name, w in weights.items():
            layer.scaling[name] = _base_scale(layer, name) * _layer_weight(w, ref)
    try:
        local = nullcontext() if route is None else route.applied(mix.as_rows(len(route.index))[1])
        with local:
            yield
    finally:
        for layer in lora_layers(model):
            for name in weights:
                layer.scaling[name] = _base_scale(layer, name)


def set_trainable(model: nn.Module, adapter: str | None) -> None:
    """Only `adapter`'s LoRA parameters require grad (None: nothing trains)."""
    for name, param in model.named_parameters():
        param.requires_grad = adapter is not None and f".{adapter}." in name and "lora_" in name


@contextmanager
def training(model: nn.Module, adapter: str) -> Iterator[list[nn.Parameter]]:
    """Train `adapter` alone: yields its parameters; the other adapter's output is detached."""
    set_trainable(model, adapter)
    hooks = [
        layer.lora_B[other].register_forward_hook(lambda _m, _i, out: out.detach())
        for layer in lora_layers(model)
        for other in ADAPTERS
        if other != adapter
    ]
    model.train()
    try:
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        for h in hooks:
            h.remove()
        set_trainable(model, None)
        model.eval()


def adapter_state(model: nn.Module, name: str) -> AdapterState:
    """The adapter's weights in stock PEFT key format (no adapter name in the keys), cloned."""
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_adapter_state(model: nn.Module, name: str, state: AdapterState) -> None:
    """Copy `state` (PEFT key format) into the adapter `name` in place."""
    params = dict(model.named_parameters())
    suffix = f".{name}.weight"
    loaded = 0
    for key, value in state.items():
        target = params.get(key.removesuffix(".weight") + suffix)
        if target is None:
            raise KeyError(f"adapter tensor {key!r} has no matching parameter in the model")
        with torch.no_grad():
            target.copy_(value)
        loaded += 1
    expected = sum(1 for k in params if k.endswith(suffix) and "lora_" in k)
    if loaded != expected:
        raise KeyError(
            f"adapter state has {loaded} tensors, the model's {name!r} adapter {expected}"
        )


def fresh_adapter_state(model: nn.Module, seed: int) -> AdapterState:
    """A new adapter as peft initialises one (A kaiming-uniform, B zero), seeded, model-independent."""
    gen = torch.Generator().manual_seed(seed)
    out: AdapterState = {}
    for key, value in sorted(adapter_state(model, GLOBAL).items()):
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(value.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
            out[key] = ((torch.rand(value.shape, generator=gen) * 2 - 1) * bound).to(value.dtype)
        else:
            out[key] = torch.zeros_like(value)
    return out
