"""Base-model loading options: gradient checkpointing (CPU-testable) and k-bit quantization."""

from __future__ import annotations

import pytest
import torch

from feddpa.core.adapters import GLOBAL, Mix, fresh_adapter_state, load_adapter_state, training
from feddpa.core.config import ConfigError, EvalConfig, LoraSettings, ModelConfig, build_config
from feddpa.core.models import build_task_model
from feddpa.core.models.loading import load_base
from feddpa.core.records import Example, format_options

COLOURS = ["red", "green", "blue"]


def items(kind: str) -> list[Example]:
    stems = [f"Say the colour number {i}." for i in range(4)]
    if kind == "multiple_choice":
        stems = [format_options(s, COLOURS) for s in stems]
    return [Example(s, COLOURS[i % 3], "c") for i, s in enumerate(stems)]


def loss_and_grads(model, data: list[Example]) -> tuple[float, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    state = {  # the same adapter in both models; non-zero B, so every path has a gradient
        k: v + 0.3 * torch.randn(v.shape, generator=gen)
        for k, v in fresh_adapter_state(model.peft, seed=0).items()
    }
    load_adapter_state(model.peft, GLOBAL, state)
    with training(model.peft, GLOBAL):
        torch.manual_seed(0)  # the same dropout masks (MiniLM has hidden dropout 0.1)
        loss = model.loss(data, Mix(1.0, 0.0))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.peft.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize("kind", ["causal_lm", "multiple_choice"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_llama_dir, kind):
    path = str(tiny_llama_dir) if kind == "causal_lm" else "minilm"
    results = []
    for checkpointing in (False, True):
        cfg = ModelConfig(kind=kind, path=path, threads=1, gradient_checkpointing=checkpointing)
        model = build_task_model(cfg, LoraSettings(dropout=0.0), EvalConfig())
        assert model.peft.get_base_model().is_gradient_checkpointing == checkpointing
        results.append(loss_and_grads(model, items(kind)))
    (loss0, g0), (loss1, g1) = results
    assert loss0 == pytest.approx(loss1, abs=1e-6)
    assert g0.keys() == g1.keys() and len(g0) in (8, 24)  # 2 or 6 layers x (q, v) x (A, B)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantization_without_cuda_says_what_to_do(tiny_llama_dir, bits):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(kind="causal_lm", path=str(tiny_llama_dir), quantization=bits)
    with pytest.raises(RuntimeError, match=f"model.quantization '{bits}' needs a CUDA device"):
        load_base(AutoModelForCausalLM, cfg)


def test_quantization_with_deepspeed_is_rejected_at_config_load():
    with pytest.raises(ConfigError, match="model.quantization needs engine.kind .torch."):
        build_config({"model": {"quantization": "4bit"}, "engine": {"kind": "deepspeed"}})
