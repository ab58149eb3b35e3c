"""Causal LM with dual adapters — the paper's setting (FedDPA, arXiv 2403.19211, Sec. 5).

Training: Alpaca short prompt, loss on response tokens only, EOS appended, cut at `max_length`.
Evaluation: items with an OPTIONS block are scored by the mean log-likelihood of each option given
the prompt (`eval.causal: auto`), or every item is generated (beam search) and scored by ROUGE-1 F
(`eval.causal: generate`, the paper's protocol). The weighting representation is the final-layer
hidden state of the last prompt token, local adapter only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from feddpa.core.adapters import (
    LOCAL_ONLY,
    Mix,
    RowRoute,
    attach_dual_adapters,
    mixed,
    route_rows,
)
from feddpa.core.config import EvalConfig, LoraSettings, ModelConfig
from feddpa.core.models.loading import load_base, lora_config, resolve_model_path
from feddpa.core.records import Example

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE = -100


TextSink = Callable[[int, str], None]  # (row, text delta)


def prompt_for(instruction: str) -> str:
    return PROMPT.format(instruction=instruction)


@dataclass(frozen=True)
class Generated:
    text: str
    prompt_tokens: int  # tokens the model read (special tokens included, after the length cut)
    completion_tokens: int  # tokens generated, the stop token included
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)


class RowText(BaseStreamer):
    """Per-row text deltas of a batched generate. transformers calls `put` with the prompt ids
    (B, T) first, then with each step's new tokens (B,); rows that stopped get padding, ignored
    here. A row's text is decoded whole at each step and only its new end is handed on; trailing
    whitespace and an unfinished character (U+FFFD) are held back until more text follows, so the
    deltas join up to the stripped text `generate` returns."""

    def __init__(self, tokenizer, stops: frozenset[int], on_text: TextSink) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.on_text = on_text
        self.ids: list[list[int]] = []
        self.sent: list[str] = []
        self.done: list[bool] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            rows = value.shape[0]
            self.ids, self.sent, self.done = [[] for _ in range(rows)], [""] * rows, [False] * rows
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.stops:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            self._emit(row, final=False)

    def end(self) -> None:
        for row in range(len(self.ids)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True).lstrip()
        text = text.rstrip() if final else text.rstrip().rstrip("\ufffd")
        sent = self.sent[row]
        if len(text) > len(sent) and text.startswith(sent):
            self.sent[row] = text
            self.on_text(row, text[len(sent) :])


class CausalLMModel:
    def __init__(self, peft, tokenizer, max_length: int, evaluation: EvalConfig) -> None:
        self.peft = peft
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eval_cfg = evaluation
        self.rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
        self.option_rows = 32  # option sequences scored per forward pass (bounds memory)

    @classmethod
    def load(cls, cfg: ModelConfig, lora: LoraSettings, evaluation: EvalConfig) -> CausalLMModel:
        path = resolve_model_path(cfg.path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = load_base(AutoModelForCausalLM, cfg)
        peft = attach_dual_adapters(base, lora_config(cfg, lora, base.config.model_type))
        peft.eval()
        return cls(peft, tokenizer, cfg.max_length, evaluation)

    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def query_text(self, example: Example) -> str:
        return prompt_for(example.instruction)

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _pad(self, seqs: list[list[int]], labels: list[list[int]] | None, left: bool) -> dict:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids, mask, labs = [], [], []
        for i, seq in enumerate(seqs):
            gap = width - len(seq)
            fill, ones = [pad] * gap, [1] * len(seq)
            ids.append(fill + seq if left else seq + fill)
            mask.append([0] * gap + ones if left else ones + [0] * gap)
            if labels is not None:
                labs.append([IGNORE] * gap + labels[i] if left else labels[i] + [IGNORE] * gap)
        batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if labels is not None:
            batch["labels"] = torch.tensor(labs)
        return {k: v.to(self.device) for k, v in batch.items()}

    def training_sequence(self, example: Example) -> tuple[list[int], list[int]]:
        """(input ids, labels): prompt tokens masked with -100, EOS appended, at most max_length.

        A prompt too long for the cutoff loses its beginning, never the answer, so every item
        keeps response tokens to learn from (a fully masked item would give a NaN loss)."""
        prompt = self._ids(prompt_for(example.instruction), special=True)
        answer = (self._ids(example.output, special=False) + [self.tokenizer.eos_token_id])[
            : self.max_length - 1
        ]
        prompt = prompt[-(self.max_length - len(answer)) :]
        return prompt + answer, [IGNORE] * len(prompt) + answer

    def loss(self, examples: list[Example], mix: Mix) -> torch.Tensor:
        seqs = [self.training_sequence(e) for e in examples]
        batch = self._pad([s for s, _ in seqs], [lab for _, lab in seqs], left=False)
        with mixed(self.peft, mix):
            return self.peft(**batch).loss

    def _prompt_batch(self, texts: list[str]) -> dict:
        return self._pad(
            [self._ids(t, special=True)[-self.max_length :] for t in texts], None, True
        )

    @torch.no_grad()
    def represent(
        self,
        texts: list[str],
        local: Mix = LOCAL_ONLY,
        layer: float = 1.0,
        route: RowRoute | None = None,
    ) -> torch.Tensor:
        """(B, H) e(x): the last prompt token's hidden state after `layer` of the layers, with the
        local adapter alone (`route`: each row's own; `local` may be no adapter at all)."""
        batch = self._prompt_batch(texts)
        with mixed(self.peft, local, route):  # the LM head on the last position only: logits unused
            out = self.peft(**batch, output_hidden_states=True, logits_to_keep=1)
        states = out.hidden_states  # L + 1: the embeddings, then each layer's output
        # left padding: the last position is every row's last prompt token
        return states[round(layer * (len(states) - 1))][:, -1, :].float().cpu()

    @torch.no_grad()
    def generate(
        self,
        examples: list[Example],
        mix: Mix,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
    ) -> list[str]:
        """Beam search (the eval settings unless given) from each example's prompt."""
        return [g.text for g in self.generate_rows(examples, mix, max_new_tokens, num_beams)]

    @torch.no_grad()
    def generate_rows(
        self,
        examples: list[Example],
        mix: Mix,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        on_text: TextSink | None = None,
        route: RowRoute | None = None,
    ) -> list[Generated]:
        """`generate` with token counts and why each row stopped. `on_text(row, delta)` receives
        each row's text as it is decoded: token by token during greedy decoding (transformers'
        streamer interface), or after beam search (which cannot stream) token by token from the
        finished sequences. The deltas of a row join up to its `text`. `route`: per-row local
        adapters."""
        batch = self._prompt_batch([prompt_for(e.instruction) for e in examples])
        beams = num_beams or self.eval_cfg.num_beams
        stops = self._stop_ids()
        parts = None if on_text is None else RowText(self.tokenizer, stops, on_text)
        with mixed(self.peft, mix.rows(repeat=beams), route_rows(route, repeat=beams)):
            out = self.peft.generate(
                **batch,
                num_beams=beams,
                do_sample=False,
                max_new_tokens=max_new_tokens or self.eval_cfg.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=parts if beams == 1 else None,
            )
        new = out[:, batch["input_ids"].shape[1] :].cpu()  # (B, T): pad after a row's EOS
        if parts is not None and beams > 1:
            parts.put(batch["input_ids"].cpu())  # the prompt, as generate hands it first
            for step in new.T:
                parts.put(step)
            parts.end()
        prompt_tokens = batch["attention_mask"].sum(1).tolist()
        rows = []
        for ids, n_prompt in zip(new.tolist(), prompt_tokens, strict=True):
            end = next((k for k, t in enumerate(ids) if t in stops), None)
            text_ids = ids if end is None else ids[:end]
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
            reason, count = ("length", len(ids)) if end is None else ("stop", end + 1)
            rows.append(Generated(text, int(n_prompt), count, reason))
        return rows

    def _stop_ids(self) -> frozenset[int]:
        """Token ids that end a sequence: the tokenizer's EOS and the generation config's."""
        configured = self.peft.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured]
        return frozenset(i for i in [*ids, self.tokenizer.eos_token_id] if i is not None)

    @torch.no_grad()
    def option_loglik(
        self, examples: list[Example], mix: Mix, route: RowRoute | None = None
    ) -> list[torch.Tensor]:
        """Per example: mean log-likelihood of each option's tokens given the prompt.

        Memory is bounded per pass: option sequences go `option_rows` at a time, and logits are
        computed only where they are read (the answer positions), never (rows, T, V)."""
        seqs, labels, owners = self.option_sequences(examples)
        owner_t = torch.tensor(owners)
        step = self.option_rows
        per_seq = torch.cat(
            [
                self._answer_logp(
                    seqs[k : k + step],
                    labels[k : k + step],
                    mix.rows(owner_t[k : k + step]),
                    route_rows(route, owner_t[k : k + step]),
                )
                for k in range(0, len(seqs), step)
            ]
        )
        return [per_seq[owner_t == i] for i in range(len(examples))]

    def option_sequences(
        self, examples: list[Example]
    ) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """(ids, labels, owning example) of every prompt + option + EOS, cut at max_length."""
        seqs, labels, owners = [], [], []
        for i, ex in enumerate(examples):
            prompt = self._ids(prompt_for(ex.instruction), special=True)
            for opt in ex.options:
                answer = self._ids(opt, special=False) + [self.tokenizer.eos_token_id]
                seqs.append((prompt + answer)[-self.max_length :])
                labels.append(([IGNORE] * len(prompt) + answer)[-self.max_length :])
                owners.append(i)
        return seqs, labels, owners

    def _answer_logp(
        self,
        seqs: list[list[int]],
        labels: list[list[int]],
        mix: Mix,
        route: RowRoute | None = None,
    ) -> torch.Tensor:
        """(R,) mean log-probability of each sequence's answer tokens (labels != IGNORE).

        Left padding puts every answer at the end of its row, so the answer positions of all rows
        lie in the last `keep` positions and the model's `logits_to_keep` applies the LM head to
        those alone: (R, keep, V) with keep = longest answer + 1. Position ids count real tokens
        only, so each row sees the positions it has unpadded."""
        batch = self._pad(seqs, labels, left=True)
        mask = batch["attention_mask"]
        answer_len = int((batch["labels"][:, 1:] != IGNORE).sum(1).max())
        keep = min(answer_len + 1, mask.shape[1])
        with mixed(self.peft, mix, route):
            logits = self.peft(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                logits_to_keep=keep,
            ).logits  # (R, keep, V): logits[:, j] predicts token T - keep + j + 1
        target = batch["labels"][:, -keep:][:, 1:]  # (R, keep - 1)
        valid = target != IGNORE
        rows = logits[:, :-1][valid].float()  # (K, V): answer positions only
        tok_logp = rows.log_softmax(-1).gather(-1, target[valid].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(valid.shape[0], device=rows.device).index_add_(
            0, valid.nonzero()[:, 0], tok_logp
        )
        return (sums / valid.sum(1).clamp(min=1)).cpu()

    def option_probs(
        self, examples: list[Example], mix: Mix, route: RowRoute | None = None
    ) -> list[torch.Tensor]:
        """Per example: softmax over its options' mean log-likelihoods."""
        return [ll.softmax(0) for ll in self.option_loglik(examples, mix, route)]

    def score(self, examples: list[Example], mix: Mix) -> tuple[list[float], list[str]]:
        scores: list[float] = [0.0] * len(examples)
        preds: list[str] = [""] * len(examples)
        by_options = [
            i for i, e in enumerate(examples) if e.options and self.eval_cfg.causal == "auto"
        ]
        free = [i for i in range(len(examples)) if i not in set(by_options)]
        if by_options:
            sub = [examples[i] for i in by_options]
            for i, ex, ll in zip(
                by_options,
                sub,
                self.option_loglik(sub, mix.rows(torch.tensor(by_options))),
                strict=True,
            ):
                preds[i] = ex.options[int(ll.argmax())]
                scores[i] = float(preds[i] == ex.output)
        if free:
            sub = [examples[i] for i in free]
            for i, ex, text in zip(
                free, sub, self.generate(sub, mix.rows(torch.tensor(free))), strict=True
            ):
                preds[i] = text
                scores[i] = self.rouge.score(ex.output, text)["rouge1"].fmeasure
        return scores, preds
