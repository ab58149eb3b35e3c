"""Shared fixtures: a tiny Llama saved to disk (the real `from_pretrained` path) and small configs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from feddpa.core.config import ExperimentConfig, build_config  # noqa: E402


def save_tiny_llama(path: Path) -> Path:
    """Write a 2-layer Llama with MiniLM's WordPiece tokenizer into `path` (`save_pretrained`)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from feddpa.core.models.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tok.eos_token = "[SEP]"
    tok.pad_token = "[PAD]"
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


SMALL = {
    "name": "test",
    "seed": 0,
    "method": "feddpa_t",
    "model": {"kind": "multiple_choice", "path": "minilm", "max_length": 48},
    "data": {"source": "synthetic", "partition": "task", "train_per_task": 24, "test_per_task": 6},
    "federation": {"rounds": 2},
    "train": {"batch_size": 8, "micro_batch_size": 8},
    "eval": {"batch_size": 32},
}


@pytest.fixture(scope="session")
def small_cfg() -> Callable[..., ExperimentConfig]:
    """`small_cfg({"train": {"lr": 1e-3}})` -> a tiny synthetic-data config with overrides merged."""

    def make(overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        return build_config(_merge(SMALL, overrides or {}))

    return make
