"""Multiple choice with a sentence encoder: softmax over scale·cos(e(stem), e(option)).

e(·) is the attention-mask mean of the encoder's final hidden states (the sentence-transformers
pooling of all-MiniLM-L6-v2). Options are parsed from the instruction's `OPTIONS:` block and go
through the same adapted encoder as the stem. The logit scale is fixed (`model.mc_scale`), so the
adapters are the only trained parameters. The weighting representation is e(instruction with its
options), with the local adapter only or (`weighting.representation: base`) the frozen encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from feddpa.core.adapters import (
    LOCAL_ONLY,
    Mix,
    RowRoute,
    attach_dual_adapters,
    mixed,
    route_rows,
)
from feddpa.core.config import LoraSettings, ModelConfig
from feddpa.core.models.loading import load_base, lora_config, resolve_model_path
from feddpa.core.records import Example


@dataclass
class OptionRows:
    """Unique (option text, row weights) sequences of a batch and each example's row ids."""

    texts: list[str]
    owners: torch.Tensor  # (R,) index of the example whose weights the row uses
    index: list[list[int]]  # per example: row id of each of its options
    targets: torch.Tensor  # (B,) position of the answer among the example's options


def option_rows(examples: list[Example], mix: Mix, route: RowRoute | None = None) -> OptionRows:
    wg, wl = mix.as_rows(len(examples))
    local = route.index if route is not None else torch.zeros(len(examples))
    seen: dict[tuple[str, float, float, int], int] = {}
    texts: list[str] = []
    owners: list[int] = []
    index: list[list[int]] = []
    targets: list[int] = []
    for i, ex in enumerate(examples):
        options = ex.options
        if not options:
            raise ValueError(
                f"task {ex.task!r}: item has no OPTIONS block: {ex.instruction[:60]!r}"
            )
        ids = []
        for opt in options:
            # a row without local weight computes the same whatever its local adapter: shared
            key = (opt, float(wg[i]), float(wl[i]), int(local[i]) if float(wl[i]) else -1)
            if key not in seen:
                seen[key] = len(texts)
                texts.append(opt)
                owners.append(i)
            ids.append(seen[key])
        index.append(ids)
        targets.append(options.index(ex.output) if ex.output in options else -1)
    return OptionRows(texts, torch.tensor(owners), index, torch.tensor(targets))


class MultipleChoiceModel:
    def __init__(self, peft, tokenizer, max_length: int, scale: float) -> None:
        self.peft = peft
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.scale = scale

    @classmethod
    def load(cls, cfg: ModelConfig, lora: LoraSettings) -> MultipleChoiceModel:
        path = resolve_model_path(cfg.path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = load_base(AutoModel, cfg)
        peft = attach_dual_adapters(base, lora_config(cfg, lora, base.config.model_type))
        peft.eval()
        return cls(peft, tokenizer, cfg.max_length, cfg.mc_scale)

    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def query_text(self, example: Example) -> str:
        """What the gate represents: the whole instruction, its OPTIONS included — the answer
        space names the task where inputs are shared (benchmarks/results/gate-signal-*.md: mean
        own-vs-other AUC 0.993 vs 0.975 on dataset 1, 0.982 vs 0.976 on shared_input)."""
        return example.instruction

    def encode(
        self, texts: list[str], mix: Mix, layer: float = 1.0, route: RowRoute | None = None
    ) -> torch.Tensor:
        """(N, H) mean-pooled hidden states after `layer` of the layers (1: the final ones) under
        `mix` (per-row weights allowed; `route`: per-row local adapters)."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with mixed(self.peft, mix, route):
            out = self.peft(**batch, output_hidden_states=layer < 1)
        states = out.hidden_states
        hidden = out.last_hidden_state if layer == 1 else states[round(layer * (len(states) - 1))]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def logits(
        self, examples: list[Example], mix: Mix, route: RowRoute | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_options) logits (-inf padding) and (B,) answer positions."""
        rows = option_rows(examples, mix, route)
        stems = self.encode([e.stem for e in examples], mix, route=route)
        opts = self.encode(rows.texts, mix.rows(rows.owners), route=route_rows(route, rows.owners))
        stems, opts = F.normalize(stems.float(), dim=-1), F.normalize(opts.float(), dim=-1)
        width = max(len(ids) for ids in rows.index)
        out = torch.full((len(examples), width), float("-inf"), device=stems.device)
        for i, ids in enumerate(rows.index):
            out[i, : len(ids)] = self.scale * (opts[ids] @ stems[i])
        return out, rows.targets.to(stems.device)

    def loss(self, examples: list[Example], mix: Mix) -> torch.Tensor:
        logits, targets = self.logits(examples, mix)
        if (targets < 0).any():
            bad = examples[int((targets < 0).nonzero()[0])]
            raise ValueError(f"task {bad.task!r}: answer {bad.output!r} is not among the OPTIONS")
        return F.cross_entropy(logits, targets)

    @torch.no_grad()
    def represent(
        self,
        texts: list[str],
        local: Mix = LOCAL_ONLY,
        layer: float = 1.0,
        route: RowRoute | None = None,
    ) -> torch.Tensor:
        """(B, H) e(x) with the local adapter alone (`route`: each row's own)."""
        return self.encode(texts, local, layer, route).float().cpu()

    @torch.no_grad()
    def option_probs(
        self, examples: list[Example], mix: Mix, route: RowRoute | None = None
    ) -> list[torch.Tensor]:
        """Per example: softmax over its options."""
        logits, _ = self.logits(examples, mix, route)
        return [
            row[: len(ex.options)].softmax(0).cpu()
            for row, ex in zip(logits, examples, strict=True)
        ]

    @torch.no_grad()
    def score(self, examples: list[Example], mix: Mix) -> tuple[list[float], list[str]]:
        logits, targets = self.logits(examples, mix)
        choice = logits.argmax(dim=1)
        preds = [ex.options[int(c)] for ex, c in zip(examples, choice, strict=True)]
        return (choice == targets).float().tolist(), preds
