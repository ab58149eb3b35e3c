"""Experiment configuration: typed, frozen, validated on load.

A config is a YAML file; `--set key.sub=value` overrides are applied before validation, and the
resolved config is written into every run directory. Validation errors name the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Method = Literal["fedit", "feddpa_t", "feddpa_f", "local", "centralized"]
WeightMode = Literal["gate", "sample", "bank", "fixed", "global_only", "local_only"]
# `model.path` names of models that ship inside PyPI wheels (resolved by core.models.loading);
# anything else is a directory path
EMBEDDED_MINILM = "minilm"
EMBEDDED_SMOLLM2 = "smollm2"
EMBEDDED_MODELS = (EMBEDDED_MINILM, EMBEDDED_SMOLLM2)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    kind: Literal["multiple_choice", "causal_lm"] = "multiple_choice"
    path: str = Field("minilm", description="HF model dir, or 'minilm' for the embedded MiniLM")
    max_length: int = Field(64, gt=0, description="token cutoff per sequence")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mc_scale: float = Field(20.0, gt=0, description="logit scale on cosine option scores")
    threads: int = Field(0, ge=0, description="torch threads; 0 keeps the default")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = cuda if available"
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="load the frozen base in 8-bit or 4-bit NF4 (bitsandbytes, CUDA only)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, ~30% slower)"
    )


class LoraSettings(_Frozen):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = None


class DataConfig(_Frozen):
    source: Literal["synthetic", "shared_input", "feddpa", "files"] = Field(
        "synthetic",
        description="synthetic / shared_input: built-in federations (feddpa.datasets); "
        "feddpa: the release layout at data.path; files: train_files + test_file",
    )
    path: str | None = Field(None, description="directory of the FedDPA release layout")
    train_files: tuple[str, ...] = ()
    test_file: str | None = None
    tasks: tuple[str, ...] | None = Field(None, description="keep only these tasks")
    partition: Literal["task", "dirichlet", "iid"] = "task"
    num_clients: int | None = Field(None, gt=0)
    alpha: float = Field(0.5, gt=0)
    train_per_task: int = Field(300, gt=0)
    test_per_task: int = Field(50, gt=0)
    max_train_per_client: int | None = Field(
        None, gt=0, description="keep a seeded random subset of this many items per client"
    )
    holdout_fraction: float = Field(0.0, ge=0, lt=1)
    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each client's training items kept out of training as its own "
        "validation slice (weighting.trust: validation reads it); the same for every method",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source == "feddpa" and not self.path:
            raise ValueError(
                "data.path must name the dataset directory when data.source is 'feddpa'"
            )
        if self.source == "files" and not (self.train_files and self.test_file):
            raise ValueError("data.train_files and data.test_file are required for source 'files'")
        if self.partition != "task" and self.num_clients is None:
            raise ValueError(f"data.num_clients is required for partition '{self.partition}'")
        return self


class FederationConfig(_Frozen):
    rounds: int = Field(3, ge=1)
    fraction_fit: float = Field(1.0, gt=0, le=1)
    min_fit_clients: int = Field(1, ge=1)
    sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="fixed: ceil(fraction_fit · N) clients drawn without replacement each round; "
        "poisson: each client independently with probability fraction_fit (privacy.dp accounts "
        "for whichever is configured)",
    )


class TrainConfig(_Frozen):
    epochs: int = Field(1, ge=1, description="epochs of the global phase per round")
    local_epochs: int = Field(1, ge=1, description="FedDPA-T local phase epochs / Local epochs")
    finetune_epochs: int = Field(1, ge=1, description="FedDPA-F local fine-tuning epochs")
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    mix_a: float = Field(0.5, ge=0, le=1, description="FedDPA-T local-phase weight a")

    @model_validator(mode="after")
    def _micro(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError("train.batch_size must be a multiple of train.micro_batch_size")
        return self


class WeightingConfig(_Frozen):
    """How the two adapters are mixed per input (feddpa.core.weighting has the formulas)."""

    mode: WeightMode = "gate"
    weight_on: Literal["global", "local"] = "global"
    lam: float = Field(0.5, ge=0, le=1)
    k: int = Field(5, ge=1, description="references per instance in 'sample' mode")
    topk: int | None = Field(None, ge=1, description="'bank' mode: mean of the top-k cosines")
    fixed: float = Field(0.5, ge=0, le=1)
    gate_topk: int = Field(5, ge=1, description="'gate': neighbours in the kNN similarity score")
    gate_quantile: float = Field(
        0.05, gt=0, lt=0.5, description="'gate': threshold = this quantile of the bank's own scores"
    )
    gate_width: float = Field(
        1.0, gt=0, description="'gate': sigmoid width as a fraction of (median − threshold)"
    )
    gate_floor: float = Field(0.0, ge=0, le=1, description="'gate': least local weight")
    gate_ceiling: float = Field(1.0, ge=0, le=1, description="'gate': most local weight")
    gate_snap: float = Field(
        1e-3,
        ge=0,
        lt=0.5,
        description="'gate': a weight this close to the floor or ceiling is set to it exactly",
    )
    representation: Literal["local", "base", "embedding"] = Field(
        "local",
        description="e(x) of the bank modes: 'local' = final hidden state with the local adapter "
        "alone (the paper); 'base' = final hidden state of the frozen model, no adapter (the same "
        "for every client, so computed once per input); 'embedding' = mean input token embedding "
        "(no forward pass)",
    )
    layer: float = Field(
        1.0,
        gt=0,
        le=1,
        description="depth of e(x) for 'local' / 'base': the hidden state after this fraction of "
        "the layers (1 = the final layer; 0.5 = the middle one)",
    )
    trust: Literal["full", "validation"] = Field(
        "full",
        description="'gate': how far the local adapter is trusted on the client's own inputs "
        "(the gate's local weight is scaled by it): 'full' = 1; 'validation' = the weight of "
        "trust_grid with the lowest loss on the client's validation slice (data.validation_"
        "fraction), 0 = the global adapter alone",
    )
    trust_grid: tuple[float, ...] = Field(
        (0.0, 0.25, 0.5, 0.75, 1.0), min_length=1, description="local weights 'validation' tries"
    )

    @model_validator(mode="after")
    def _gate_bounds(self) -> WeightingConfig:
        if self.gate_floor > self.gate_ceiling:
            raise ValueError("weighting.gate_floor must not exceed weighting.gate_ceiling")
        if any(not 0 <= w <= 1 for w in self.trust_grid):
            raise ValueError(
                f"weighting.trust_grid {self.trust_grid}: every weight must be in [0, 1]"
            )
        return self


class EvalConfig(_Frozen):
    every: int = Field(1, ge=0, description="evaluate every N rounds; 0 = only at the end")
    final: bool = Field(True, description="evaluate after the last round")
    batch_size: int = Field(64, ge=1)
    max_test_per_task: int | None = Field(None, ge=1)
    causal: Literal["generate", "auto"] = "auto"
    num_beams: int = Field(4, ge=1)
    max_new_tokens: int = Field(80, ge=1)


class RayConfig(_Frozen):
    num_actors: int = Field(0, ge=0, description="client actors; 0 = from the cluster's resources")
    cpus_per_actor: float = Field(0.5, gt=0, description="fractional CPUs per client actor")
    gpus_per_actor: float = Field(0.0, ge=0, description="fractional GPUs per client actor")
    max_restarts: int = Field(3, ge=0, description="restarts of a crashed client actor")
    round_timeout_s: float = Field(3600.0, gt=0, description="a round closes with the survivors")
    driver_cpus: float = Field(0.1, gt=0)


class EngineConfig(_Frozen):
    """How a phase's optimizer steps: plain torch AdamW, or a DeepSpeed ZeRO engine (actors only).

    Gradient accumulation is not a setting here: it is train.batch_size / train.micro_batch_size."""

    kind: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state on the CPU")
    offload_params: bool = Field(False, description="ZeRO-3 parameters on the CPU")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    stage3_param_persistence_threshold: int = Field(
        0, ge=0, description="ZeRO-3 keeps params below this size unpartitioned; 0 = partition all"
    )

    @model_validator(mode="after")
    def _offload(self) -> EngineConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("engine.offload_params needs engine.zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage 1, 2 or 3")
        return self


class DPConfig(_Frozen):
    """Client-level DP on the global adapter (DP-FedAvg, McMahan et al. 2018; feddpa.core.dp)."""

    enabled: bool = False
    clip: float = Field(
        0.1,
        gt=0,
        description="L2 bound C on a client's global-adapter update (initial C if adaptive)",
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="z: Gaussian noise of std z·C on the sum of the round's clipped updates; "
        "null = calibrated so that federation.rounds rounds spend target_epsilon",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="the budget: with noise_multiplier null, z is calibrated to spend it over "
        "federation.rounds; with both set, the run stops after the last round within it",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) reported")
    noise: Literal["server", "client"] = Field(
        "server",
        description="server: the trusted driver adds N(0, z²C²) to the sum; client: each of the "
        "m participants adds N(0, z²C²/m) before masking (needs secure_aggregation)",
    )
    adaptive: bool = Field(False, description="adaptive clipping (Andrew et al. 2021)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: γ, unclipped share")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: η_C of C ← C·exp(−η_C(b̄ − γ))")
    count_stddev: float | None = Field(
        None, gt=0, description="adaptive: σ_b, noise on the unclipped count; null = m/20"
    )

    @model_validator(mode="after")
    def _noise(self) -> DPConfig:
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "privacy.dp needs noise_multiplier or target_epsilon (or both: the run then "
                "stops at the target)"
            )
        return self


class SecureAggregationConfig(_Frozen):
    """Pairwise additive masks that cancel in the sum (feddpa.core.secagg)."""

    enabled: bool = False
    fractional_bits: int = Field(
        24, ge=8, le=40, description="fixed point: values rounded to multiples of 2^-bits"
    )
    neighbors: int | None = Field(
        None,
        ge=2,
        description="SecAgg+ style: each client masks with this many ring neighbours (O(m·k) "
        "masks instead of O(m²)); null = every pair. Privacy holds against fewer than k "
        "colluding neighbours",
    )
    max_attempts: int = Field(
        3, ge=1, description="masking attempts per round: a client lost after masking restarts it"
    )


class PrivacyConfig(_Frozen):
    dp: DPConfig = Field(default_factory=DPConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)

    @property
    def active(self) -> bool:
        return self.dp.enabled or self.secure_aggregation.enabled


class ExperimentConfig(_Frozen):
    name: str = "feddpa"
    seed: int = 0
    method: Method = "feddpa_t"
    output_dir: str = "runs"
    keep_checkpoints: int = Field(2, ge=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="after")
    def _privacy(self) -> ExperimentConfig:
        dp, sa = self.privacy.dp, self.privacy.secure_aggregation
        if dp.enabled and dp.noise == "client" and not sa.enabled:
            raise ValueError(
                "privacy.dp.noise 'client' (distributed noise) is private only when the driver "
                "sees the sum alone: set privacy.secure_aggregation.enabled true, or noise 'server'"
            )
        if sa.enabled and self.federation.min_fit_clients < 2:
            raise ValueError(
                "privacy.secure_aggregation needs federation.min_fit_clients >= 2 (a lone "
                "client's masked update is its update in the clear)"
            )
        return self

    @model_validator(mode="after")
    def _quantized_engine(self) -> ExperimentConfig:
        if self.model.quantization != "none" and self.engine.kind == "deepspeed":
            raise ValueError(
                "model.quantization needs engine.kind 'torch': DeepSpeed ZeRO does not partition "
                "bitsandbytes weights (the frozen quantized base is already small)"
            )
        if self.weighting.trust == "validation" and self.data.validation_fraction == 0:
            raise ValueError(
                "weighting.trust 'validation' chooses each client's trust on its validation "
                "slice: set data.validation_fraction (e.g. 0.2) or weighting.trust 'full'"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_absolute_paths(self) -> ExperimentConfig:
        """File paths resolved against the current directory (actors may run elsewhere)."""

        def absolute(p: str | None) -> str | None:
            return str(Path(p).expanduser().resolve()) if p else p

        data = self.data.model_copy(
            update={
                "path": absolute(self.data.path),
                "test_file": absolute(self.data.test_file),
                "train_files": tuple(str(absolute(p)) for p in self.data.train_files),
            }
        )
        model = self.model
        if model.path not in EMBEDDED_MODELS:  # a name, not a path
            model = model.model_copy(update={"path": absolute(model.path)})
        return self.model_copy(update={"data": data, "model": model})


class ConfigError(ValueError):
    """A config file or override the user must fix; the message names the key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], yaml-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = value
    return out


def build_config(data: dict[str, Any], origin: str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"{origin}: invalid config\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    data: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    return build_config(apply_overrides(data, overrides or []), origin)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
