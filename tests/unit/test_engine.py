"""The DeepSpeed config derived from an experiment config, and the DeepSpeed phase's schedule.
No Ray and no deepspeed import: `feddpa.actors.engine` imports deepspeed only when an engine is
built (the Ray test builds real ones)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from feddpa.actors import engine
from feddpa.actors.engine import DeepSpeedPhase, deepspeed_config, write_deepspeed_config
from feddpa.core.config import ConfigError, ExperimentConfig, build_config
from feddpa.core.storage import RunDir

TRAIN = {"batch_size": 16, "micro_batch_size": 4, "lr": 2e-4, "weight_decay": 0.01}


def config(train: dict | None = None, **eng) -> ExperimentConfig:
    return build_config(
        {"train": {**TRAIN, **(train or {})}, "engine": {"kind": "deepspeed", **eng}}
    )


def test_default_is_zero2_fp32_with_torch_adamw_and_derived_accumulation():
    assert deepspeed_config(config(train={"max_grad_norm": 0.5})) == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 4,  # 16 / 4
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 2e-4,
                "weight_decay": 0.01,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def test_zero3_offload_and_bf16():
    ds = deepspeed_config(
        config(
            zero_stage=3,
            offload_optimizer=True,
            offload_params=True,
            precision="bf16",
            stage3_param_persistence_threshold=100,
        )
    )
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
        "stage3_param_persistence_threshold": 100,
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_zero3_partitions_everything_by_default_and_fp16_is_passed_through():
    ds = deepspeed_config(config(zero_stage=3, precision="fp16"))
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["fp16"] == {"enabled": True} and ds["bf16"] == {"enabled": False}


def test_accumulation_and_clipping_follow_train():
    ds = deepspeed_config(
        config(train={"batch_size": 6, "micro_batch_size": 3, "max_grad_norm": 0})
    )
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0


def test_default_engine_is_torch():
    assert build_config({}).engine.kind == "torch"


@pytest.mark.parametrize(
    ("engine_section", "words"),
    [
        ({"offload_params": True, "zero_stage": 2}, "offload_params"),
        ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer"),
        ({"zero_stage": 4}, "engine.zero_stage"),
        ({"precision": "fp8"}, "engine.precision"),
    ],
)
def test_invalid_engine_settings_name_the_key(engine_section, words):
    with pytest.raises(ConfigError, match=words):
        build_config({"engine": engine_section})


def test_written_json_is_the_config(tmp_path):
    cfg = config(zero_stage=3)
    path = write_deepspeed_config(cfg, RunDir(tmp_path / "run").deepspeed_file)
    assert path == tmp_path / "run" / "deepspeed_config.json"
    assert json.loads(path.read_text()) == deepspeed_config(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["deepspeed_config.json"]


def test_engine_module_imports_deepspeed_only_inside_functions():
    tree = ast.parse(Path(engine.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not any(n.split(".")[0] == "deepspeed" for n in names)


class FakeEngine:
    """Records what the phase hands to a DeepSpeed engine."""

    def __init__(self, group: dict) -> None:
        self.optimizer = self
        self.group = group
        self.lrs: list[float] = []
        self.backwards: list[tuple[float, bool]] = []
        self.resets = 0

    def clear_backward_seen_flag(self) -> None:
        self.resets += 1

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        self.backwards.append((float(loss), scale_wrt_gas))

    def step(self) -> None:
        self.lrs.append(self.group["lr"])


def test_deepspeed_phase_uses_the_torch_linear_decay_exactly():
    total, lr = 5, 3e-4
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, 0, total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    group = {"lr": lr}
    fake = FakeEngine(group)
    phase = DeepSpeedPhase(fake, group, lr, total)
    for _ in range(total):
        phase.backward(torch.tensor(0.25))
        phase.backward(torch.tensor(0.5))
        phase.step()
    assert fake.lrs == expected  # bit-equal floats, last one lr/5
    assert fake.backwards == [(0.25, False), (0.5, False)] * total  # run_phase already scaled
    assert fake.resets == 2 * total
