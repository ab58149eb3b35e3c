"""P and TTP (FedDPA, arXiv 2403.19211, Sec. 5.1).

P   = a client's score on the test items of its own task(s);
TTP = its score on all test items of all tasks (own included).
Scores are accuracy for multiple-choice items and ROUGE-1 F for free text, per item; a task's score
is the mean over its items, P and TTP are means over items.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from feddpa.core import algorithms
from feddpa.core.adapters import Mix
from feddpa.core.config import WeightingConfig
from feddpa.core.models import TaskModel, token_embedding_means
from feddpa.core.records import Example
from feddpa.core.weighting import ClientBank, RowWeighting, mix_rows


@dataclass(frozen=True)
class ItemScores:
    scores: tuple[float, ...]
    global_weights: tuple[float, ...]  # weight each item gave the global adapter


@dataclass(frozen=True)
class ClientWeighting:
    """What evaluation and serving know of a client when they mix its adapters."""

    client_id: int
    bank: ClientBank | None
    has_local: bool  # False: it never trained a local adapter (it is served by the global alone)

    def row(self, cfg: WeightingConfig, run_seed: int, query_text: str) -> RowWeighting:
        """One input's weighting: `sample` mode draws its references from a seed of the run, the
        client and the prompt, the same in evaluation and serving."""
        seed = algorithms.derive_seed(run_seed, "weighting", self.client_id, query_text)
        return RowWeighting(cfg, self.bank, self.has_local, seed)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def representations(
    model: TaskModel, texts: list[str], representation: str, local: Mix | None = None
) -> torch.Tensor:
    """(B, H) e(x) of `texts` as weighting.representation says: the final hidden state with the
    local adapter alone (`local` routes rows to their clients' adapters in serving; default the
    model's `local` adapter), or the mean token embedding (the same for every client)."""
    if representation == "embedding":
        return token_embedding_means(model, texts)
    return model.represent(texts) if local is None else model.represent(texts, local)


@torch.no_grad()
def representation_bank(
    model: TaskModel, data: list[Example], cfg: WeightingConfig, batch_size: int
) -> ClientBank:
    """The client's training prompts' representations, (N, H), calibrated for the gate."""
    rep = cfg.representation
    reps = [
        representations(model, [model.query_text(e) for e in b], rep)
        for b in chunks(data, batch_size)
    ]
    return ClientBank.build(torch.cat(reps).float(), cfg.gate_topk, rep)


def query_representations(
    model: TaskModel, examples: list[Example], rows: list[RowWeighting], local: Mix | None = None
) -> torch.Tensor | None:
    """(B_q, H) representations of the rows that need one, in row order."""
    wanted = [i for i, r in enumerate(rows) if r.needs_query]
    if not wanted:
        return None
    kinds = {rows[i].cfg.representation for i in wanted}
    if len(kinds) > 1:
        raise ValueError(f"one batch mixes representations {sorted(kinds)}")
    texts = [model.query_text(examples[i]) for i in wanted]
    route = None if local is None else local.rows(torch.tensor(wanted))
    return representations(model, texts, kinds.pop(), route)


@torch.no_grad()
def score_items(
    model: TaskModel,
    test: list[Example],
    weighting: WeightingConfig,
    client: ClientWeighting,
    run_seed: int,
    batch_size: int,
) -> ItemScores:
    """Per-item scores of `test` under the client's instance-wise weighting (`mix_rows`, the same
    function serving calls)."""
    scores: list[float] = []
    weights: list[float] = []
    for batch in chunks(test, batch_size):
        rows = [client.row(weighting, run_seed, model.query_text(e)) for e in batch]
        mix = mix_rows(rows, query_representations(model, batch, rows))
        batch_scores, _ = model.score(batch, mix)
        scores.extend(batch_scores)
        weights.extend(mix.as_rows(len(batch))[0].tolist())
    return ItemScores(tuple(scores), tuple(weights))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(test: list[Example], items: ItemScores, own_tasks: set[str]) -> dict:
    """{'P', 'TTP', 'per_task': {task: score}, 'mean_global_weight', the mean local weight on
    own-task and other items, and their histograms} for one client."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for ex, s in zip(test, items.scores, strict=True):
        by_task[ex.task].append(s)
    own = [s for ex, s in zip(test, items.scores, strict=True) if ex.task in own_tasks]
    local_w = [
        (ex.task in own_tasks, 1 - w) for ex, w in zip(test, items.global_weights, strict=True)
    ]
    own_w = [w for is_own, w in local_w if is_own]
    other_w = [w for is_own, w in local_w if not is_own]
    return {
        "P": mean(own),
        "TTP": mean(list(items.scores)),
        "per_task": {t: mean(v) for t, v in sorted(by_task.items())},
        "mean_global_weight": mean(list(items.global_weights)),
        "local_weight_own": mean(own_w),
        "local_weight_other": mean(other_w),
        "local_weight_hist": {"own": histogram(own_w), "other": histogram(other_w)},
    }


WEIGHT_BINS = 10


def histogram(weights: list[float]) -> list[int]:
    """Counts of weights in [0, 1] over WEIGHT_BINS equal bins (1.0 in the last)."""
    counts = [0] * WEIGHT_BINS
    for w in weights:
        counts[min(max(int(w * WEIGHT_BINS), 0), WEIGHT_BINS - 1)] += 1
    return counts
