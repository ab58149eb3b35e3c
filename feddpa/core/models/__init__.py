"""Model kinds behind one interface: a frozen HF model wrapped with the dual adapters.

`TaskModel` is what training, weighting and evaluation call:

- `loss(examples, mix)`: the training loss of a batch under an adapter mix;
- `represent(texts)`: (B, H) representations with the local adapter only (for the weighting);
  `token_embedding_means(model, texts)` is the cheap alternative (no forward pass);
- `option_probs(examples, mix)`: per item, the probability of each of its OPTIONS;
- `score(examples, mix)`: per-item metric (accuracy 0/1, or ROUGE-1 F for free text) + predictions.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from feddpa.core.adapters import Mix, RowRoute
from feddpa.core.config import EvalConfig, LoraSettings, ModelConfig
from feddpa.core.records import Example


class TaskModel(Protocol):
    peft: torch.nn.Module
    tokenizer: Any
    max_length: int

    def loss(self, examples: list[Example], mix: Mix) -> torch.Tensor: ...

    def represent(
        self, texts: list[str], local: Mix = ..., layer: float = ..., route: RowRoute | None = ...
    ) -> torch.Tensor: ...

    def option_probs(
        self, examples: list[Example], mix: Mix, route: RowRoute | None = ...
    ) -> list[torch.Tensor]: ...

    def query_text(self, example: Example) -> str: ...

    def score(self, examples: list[Example], mix: Mix) -> tuple[list[float], list[str]]: ...


@torch.no_grad()
def token_embedding_means(model: TaskModel, texts: list[str]) -> torch.Tensor:
    """(B, H) mean of the frozen input token embeddings of each text (padding excluded): a
    representation that costs an embedding lookup, not a forward pass."""
    batch = model.tokenizer(
        texts, padding=True, truncation=True, max_length=model.max_length, return_tensors="pt"
    )
    table = model.peft.get_input_embeddings()  # type: ignore[operator]
    emb = table(batch["input_ids"].to(table.weight.device)).float()  # (B, T, H)
    mask = batch["attention_mask"].to(emb.device).unsqueeze(-1).float()  # (B, T, 1)
    return ((emb * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()


def build_task_model(model: ModelConfig, lora: LoraSettings, evaluation: EvalConfig) -> TaskModel:
    """Load the base model once and attach the `global` and `local` adapters."""
    if model.threads:
        torch.set_num_threads(model.threads)
    if model.kind == "multiple_choice":
        from feddpa.core.models.mc import MultipleChoiceModel

        return MultipleChoiceModel.load(model, lora)
    from feddpa.core.models.causal import CausalLMModel

    return CausalLMModel.load(model, lora, evaluation)
