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
from feddpa.core.adapters import LOCAL_ONLY, Mix, RowRoute, route_rows
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


NO_ADAPTER = Mix(0.0, 0.0)  # the frozen foundation model


def client_independent(representation: str) -> bool:
    """Whether e(x) is the same for every client (computed once per input, shared by all)."""
    return representation in ("base", "embedding")


def representations(
    model: TaskModel,
    texts: list[str],
    representation: str,
    route: RowRoute | None = None,
    layer: float = 1.0,
) -> torch.Tensor:
    """(B, H) e(x) of `texts` as weighting.representation says: the final hidden state with the
    local adapter alone (the model's `local` adapter, or each row's own from `route`), the final
    hidden state of the frozen model ('base'), or the mean token embedding; the last two are the
    same for every client."""
    if representation == "embedding":
        return token_embedding_means(model, texts)
    if representation == "base":
        return model.represent(texts, NO_ADAPTER, layer)
    return model.represent(texts, LOCAL_ONLY, layer, route)


@torch.no_grad()
def representations_batched(
    model: TaskModel, texts: list[str], cfg: WeightingConfig, batch_size: int
) -> torch.Tensor:
    """(N, H) `representations` of many texts, `batch_size` at a time (bounded memory)."""
    rep, layer = cfg.representation, cfg.layer
    return torch.cat(
        [representations(model, b, rep, layer=layer) for b in chunks(texts, batch_size)]
    ).float()


@torch.no_grad()
def representation_bank(
    model: TaskModel, data: list[Example], cfg: WeightingConfig, batch_size: int
) -> ClientBank:
    """The client's training prompts' representations, (N, H), calibrated for the gate."""
    rep = cfg.representation
    texts = [model.query_text(e) for e in data]
    vectors = representations_batched(model, texts, cfg, batch_size)
    return ClientBank.build(vectors, cfg.gate_topk, rep, layer=cfg.layer)


def query_representations(
    model: TaskModel,
    examples: list[Example],
    rows: list[RowWeighting],
    route: RowRoute | None = None,
) -> torch.Tensor | None:
    """(B_q, H) representations of the rows that need one, in row order."""
    wanted = [i for i, r in enumerate(rows) if r.needs_query]
    if not wanted:
        return None
    kinds = {(rows[i].cfg.representation, rows[i].cfg.layer) for i in wanted}
    if len(kinds) > 1:
        raise ValueError(f"one batch mixes representations {sorted(kinds)}")
    texts = [model.query_text(examples[i]) for i in wanted]
    rep, layer = kinds.pop()
    return representations(model, texts, rep, route_rows(route, torch.tensor(wanted)), layer)


def test_mix(
    model: TaskModel,
    test: list[Example],
    rows: list[RowWeighting],
    batch_size: int,
    shared: torch.Tensor | None = None,
) -> Mix:
    """The (N,) mix of every test item (`mix_rows`, the function serving calls). `shared`: (N, H)
    representations of all of `test` when they are the same for every client."""
    wanted = [i for i, r in enumerate(rows) if r.needs_query]
    if not wanted:
        return mix_rows(rows, None)
    if shared is not None:
        return mix_rows(rows, shared[torch.tensor(wanted)])
    queries = [
        query_representations(model, [test[i] for i in idx], [rows[i] for i in idx])
        for idx in chunks(wanted, batch_size)
    ]
    return mix_rows(rows, torch.cat([q for q in queries if q is not None]))


def batch_order(model: TaskModel, test: list[Example], indices: list[int]) -> list[int]:
    """`indices` grouped by task, then by prompt length, longest first: a batch's rows pad
    little and, when generating, answer alike and stop together (generation runs until its
    batch's longest answer ends; a one-word label beside a paragraph decodes for nothing)."""
    return sorted(indices, key=lambda i: (test[i].task, -len(model.query_text(test[i]))))


@torch.no_grad()
def score_items(
    model: TaskModel,
    test: list[Example],
    weighting: WeightingConfig,
    client: ClientWeighting,
    run_seed: int,
    batch_size: int,
    *,
    global_scores: ItemScores | None = None,
    shared: torch.Tensor | None = None,
) -> ItemScores:
    """Per-item scores of `test` under the client's instance-wise weighting.

    `global_scores`: the global adapter's own scores of `test`: an item whose mix is the global
    adapter alone (w_local = 0 exactly) is that model, so its score is taken from there instead
    of being computed again. `shared`: (N, H) client-independent representations of `test`."""
    rows = [client.row(weighting, run_seed, model.query_text(e)) for e in test]
    mix = test_mix(model, test, rows, batch_size, shared)
    w_global, w_local = mix.as_rows(len(test))
    scores = [0.0] * len(test)
    todo = list(range(len(test)))
    if global_scores is not None:
        alone = {i for i in todo if w_local[i] == 0 and w_global[i] == 1}
        for i in alone:
            scores[i] = global_scores.scores[i]
        todo = [i for i in todo if i not in alone]
    for idx in chunks(batch_order(model, test, todo), batch_size):
        batch_scores, _ = model.score([test[i] for i in idx], mix.rows(torch.tensor(idx)))
        for i, score in zip(idx, batch_scores, strict=True):
            scores[i] = score
    return ItemScores(tuple(scores), tuple(w_global.tolist()))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(test: list[Example], items: ItemScores, own_tasks: set[str]) -> dict:
    """{'P', 'TTP', 'scores' (per test item), 'per_task': {task: score}, 'mean_global_weight',
    the mean local weight on own-task and other items, and their histograms} for one client."""
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
        "scores": [round(x, 6) for x in items.scores],  # per test item, for paired comparisons
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
