"""The CUDA paths: bf16, k-bit bases (bitsandbytes), per-row client mixing on the GPU.

Marked `gpu`; skipped without CUDA (tests/conftest.py). Run with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from feddpa.core.adapters import GLOBAL, GLOBAL_ONLY, LOCAL, Mix, adapter_state, load_adapter_state
from feddpa.core.config import EvalConfig, LoraSettings, ModelConfig, TrainConfig
from feddpa.core.models import build_task_model
from feddpa.core.records import Example, format_options
from feddpa.core.training import Phase, run_phase
from feddpa.serving.stack import LocalStack, StackRoute

pytestmark = pytest.mark.gpu

COLOURS = ["red", "green", "blue"]
DATA = [Example(f"Say the colour number {i}.", COLOURS[i % 3], "c") for i in range(8)]


def causal(tiny_llama_dir, **model) -> object:
    cfg = ModelConfig(kind="causal_lm", path=str(tiny_llama_dir), device="cuda", **model)
    return build_task_model(cfg, LoraSettings(), EvalConfig(num_beams=2, max_new_tokens=4))


def train_global(model, steps: int = 6) -> tuple[float, float]:
    before = float(model.loss(DATA, GLOBAL_ONLY))
    run_phase(
        model,
        DATA,
        Phase("global", GLOBAL, GLOBAL_ONLY, steps),
        TrainConfig(lr=1e-2, batch_size=8, micro_batch_size=4),
        seed=0,
    )
    return before, float(model.loss(DATA, GLOBAL_ONLY))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_training_on_cuda_lowers_the_loss(tiny_llama_dir, dtype):
    model = causal(tiny_llama_dir, dtype=dtype, gradient_checkpointing=True)
    assert model.device.type == "cuda"
    before, after = train_global(model)
    assert math.isfinite(before) and after < before - 0.05


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs feddpa[gpu]")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_kbit_base_trains_its_adapters_and_serves_many_clients(tiny_llama_dir, bits):
    model = causal(tiny_llama_dir, quantization=bits, dtype="bfloat16")
    before, after = train_global(model)
    assert after < before - 0.05
    stack = LocalStack(model.peft)
    gen = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=gen) * 0.1
        for k, v in adapter_state(model.peft, GLOBAL).items()
    }
    slot = stack.put(state)
    rows = model.generate_rows(
        DATA[:2],
        Mix(torch.tensor([0.5, 1.0]), torch.tensor([0.5, 0.0])),
        route=StackRoute(stack, torch.tensor([slot, -1])),
    )
    assert len(rows) == 2 and all(isinstance(r.text, str) for r in rows)


def test_per_row_clients_on_cuda_match_one_at_a_time(tiny_llama_dir):
    model = causal(tiny_llama_dir)
    gen = torch.Generator().manual_seed(1)
    states = [
        {
            k: torch.randn(v.shape, generator=gen) * 0.2
            for k, v in adapter_state(model.peft, GLOBAL).items()
        }
        for _ in range(2)
    ]
    stack = LocalStack(model.peft)
    slots = torch.tensor([stack.put(s) for s in states])
    wg, wl = torch.tensor([0.3, 0.8]), torch.tensor([0.7, 0.2])
    items = [Example(format_options(e.instruction, COLOURS), e.output, "c") for e in DATA[:2]]
    both = model.option_probs(items, Mix(wg, wl), StackRoute(stack, slots))
    for i in range(2):
        load_adapter_state(model.peft, LOCAL, states[i])  # the stock peft path, one client
        one = model.option_probs(items[i : i + 1], Mix(float(wg[i]), float(wl[i])))
        torch.testing.assert_close(both[i], one[0], atol=1e-4, rtol=0)
