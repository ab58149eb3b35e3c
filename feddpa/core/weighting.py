"""Instance-wise adapter weighting (FedDPA, arXiv 2403.19211, Sec. 4.3, Eq. 7), and our calibrated
gate. `mix_rows` is the one function evaluation and serving call to turn a batch into its `Mix`.

The paper's weight (the reference code's estimator):

    w(x) = λ · mean_k cos(e(x), e(x_k))

e(·) is the representation of a prompt computed with the local adapter only (the last prompt
token's final hidden state for causal LMs; the mean-pooled final hidden state for encoders);
x_k are reference instances from the client's own training data. The client's `ClientBank` holds
e(x) for all its training prompts, computed once per local adapter. Modes:

- `gate` (ours, the default): a calibrated gate on the local adapter. The score of x is its kNN
  similarity s(x) = mean of the top-k cosines to the bank. The bank's leave-one-out scores (each
  training prompt against the others) are the client's in-distribution score distribution; with
  τ = their q-quantile and ω = width · (median − τ),

      w_local(x) = t · [floor + (ceiling − floor) · σ((s(x) − τ) / ω)],   w_global = 1 − w_local,

  with σ within `gate_snap` of 0 or 1 set to 0 or 1 exactly, and t the client's trust in its
  local adapter (`weighting.trust`): 1, or the local weight with the lowest loss on the client's
  own validation slice (`feddpa.core.trust`) — 0 when the local adapter does not beat the global
  there, so the client is served by the global adapter alone and loses nothing to FedIT,

  so own-task inputs lean local and unfamiliar ones lean global, per client, whatever the level
  of its cosines. It uses the client's own bank only; `weight_on` does not apply to it.
- `sample`: K random rows per instance, seeded per (client, prompt) — the reference code;
- `bank`: all rows (mean cosine), or the mean of the top-k cosines;
- `fixed`: a constant w; `global_only` / `local_only`: w = 1 / w = 0 on the global adapter.

`weight_on` says which adapter w of the reference modes multiplies: `global` (the reference code:
h = w·ΔG + (1−w)·ΔL) or `local` (h = (1−w)·ΔG + w·ΔL).

A client that never trained a local adapter is served by the global adapter alone, in every mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from feddpa.core.adapters import GLOBAL_ONLY, LOCAL_ONLY, Mix
from feddpa.core.config import WeightingConfig

MIN_GATE_WIDTH = 1e-4  # ω for a bank whose leave-one-out scores are all equal (a hard step)


def cosine_matrix(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, H) x (N, H) -> (B, N) cosine similarities."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T


def knn_scores(cos: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) cosines -> (B,) mean of each row's k largest (all of them if k >= N)."""
    return cos.topk(min(k, cos.shape[1]), dim=1).values.mean(dim=1)


def leave_one_out_scores(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """(N, H) -> (N,) kNN score of every row against the other rows (itself excluded)."""
    cos = cosine_matrix(vectors, vectors)
    if len(vectors) == 1:
        return cos[0]  # nothing to leave out against: a lone prompt is as familiar as it gets
    cos.fill_diagonal_(float("-inf"))
    return knn_scores(cos, min(k, len(vectors) - 1))


@dataclass(frozen=True)
class ClientBank:
    """A client's references: (N, H) representations of its training prompts, the gate's
    calibration, (N,) leave-one-out kNN scores with `topk` neighbours, and the client's trust in
    its local adapter (the gate's local weight is scaled by it)."""

    vectors: torch.Tensor
    loo: torch.Tensor
    topk: int
    representation: str = "local"  # weighting.representation the vectors were computed with
    trust: float = 1.0
    layer: float = 1.0  # weighting.layer the vectors were computed at

    @classmethod
    def build(
        cls,
        vectors: torch.Tensor,
        topk: int,
        representation: str = "local",
        trust: float = 1.0,
        layer: float = 1.0,
    ) -> ClientBank:
        vectors = vectors.float()
        loo = leave_one_out_scores(vectors, topk)
        return cls(vectors, loo, topk, representation, trust, layer)

    def calibrated(self, topk: int) -> ClientBank:
        """This bank calibrated for `topk` neighbours (recomputed only if it differs)."""
        if topk == self.topk:
            return self
        return ClientBank.build(self.vectors, topk, self.representation, self.trust, self.layer)

    def __len__(self) -> int:
        return len(self.vectors)


def gate_calibration(loo: torch.Tensor, cfg: WeightingConfig) -> tuple[float, float]:
    """(τ, ω): the threshold and width of the gate's sigmoid from the leave-one-out scores."""
    tau = float(torch.quantile(loo, cfg.gate_quantile))
    spread = float(torch.quantile(loo, 0.5)) - tau
    return tau, max(cfg.gate_width * spread, MIN_GATE_WIDTH)


def gate_local_weights(
    scores: torch.Tensor, bank: ClientBank, cfg: WeightingConfig
) -> torch.Tensor:
    """(B,) kNN scores -> (B,) local weights in trust · [floor, ceiling], monotone in the score."""
    tau, width = gate_calibration(bank.calibrated(cfg.gate_topk).loo, cfg)
    unit = torch.sigmoid((scores - tau) / width)
    # saturated rows become exactly one adapter: the same numbers as that adapter alone, and
    # rows without local weight share their computation across clients in a serving batch
    unit = torch.where(unit < cfg.gate_snap, 0.0, torch.where(unit > 1 - cfg.gate_snap, 1.0, unit))
    trust = bank.trust if cfg.trust == "validation" else 1.0
    return trust * (cfg.gate_floor + (cfg.gate_ceiling - cfg.gate_floor) * unit)


def sample_references(
    batch: int, bank_size: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """(B, K) row indices into the bank, K distinct rows per instance (all rows if K >= N)."""
    k = min(k, bank_size)
    return torch.stack([torch.randperm(bank_size, generator=generator)[:k] for _ in range(batch)])


def similarity_weights(
    queries: torch.Tensor,
    bank: torch.Tensor,
    cfg: WeightingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """w (B,) = λ · mean cosine to the chosen references; queries (B, H), bank (N, H)."""
    cos = cosine_matrix(queries, bank)  # (B, N)
    if cfg.mode == "sample":
        if generator is None:
            raise ValueError("weighting mode 'sample' needs a seeded generator")
        refs = sample_references(cos.shape[0], cos.shape[1], cfg.k, generator)
        sims = cos.gather(1, refs).mean(dim=1)
    elif cfg.topk is not None:
        sims = knn_scores(cos, cfg.topk)
    else:
        sims = cos.mean(dim=1)
    return cfg.lam * sims


def mix_for_weight(w: float | torch.Tensor, weight_on: str) -> Mix:
    """The adapter mix for weight w placed on `weight_on`."""
    if weight_on == "global":
        return Mix(w, 1 - w)
    return Mix(1 - w, w)


def needs_bank(cfg: WeightingConfig) -> bool:
    return cfg.mode in ("sample", "bank", "gate")


def instance_mix(
    queries: torch.Tensor | None,
    bank: ClientBank | None,
    cfg: WeightingConfig,
    generator: torch.Generator | None = None,
) -> Mix:
    """The per-row mix of one client's rows whose local-only representations are `queries` (B, H)."""
    if cfg.mode == "global_only":
        return GLOBAL_ONLY
    if cfg.mode == "local_only":
        return LOCAL_ONLY
    if cfg.mode == "fixed":
        return mix_for_weight(cfg.fixed, cfg.weight_on)
    if queries is None or bank is None or len(bank) == 0:
        raise ValueError(f"weighting mode {cfg.mode!r} needs query representations and a bank")
    if (bank.representation, bank.layer) != (cfg.representation, cfg.layer):
        raise ValueError(
            f"the client's bank holds {bank.representation!r} representations at layer "
            f"{bank.layer} but weighting.representation is {cfg.representation!r} at layer "
            f"{cfg.layer}: rebuild the bank or set weighting.representation="
            f"{bank.representation} weighting.layer={bank.layer}"
        )
    if cfg.mode == "gate":
        scores = knn_scores(cosine_matrix(queries, bank.vectors), cfg.gate_topk)
        w_local = gate_local_weights(scores, bank, cfg)
        return Mix(1 - w_local, w_local)
    return mix_for_weight(similarity_weights(queries, bank.vectors, cfg, generator), cfg.weight_on)


@dataclass(frozen=True)
class RowWeighting:
    """What decides one row's mix: the weighting, the row's client state, and the seed of its
    reference sample (`sample` mode; derived from the client and the prompt, so evaluation and
    serving draw the same references for the same item)."""

    cfg: WeightingConfig
    bank: ClientBank | None
    has_local: bool
    seed: int = 0

    @property
    def needs_query(self) -> bool:
        return self.has_local and needs_bank(self.cfg)


def mix_rows(rows: Sequence[RowWeighting], queries: torch.Tensor | None) -> Mix:
    """The batch's per-row Mix (weights of shape (B,)). `queries`: the local-only representations
    of the rows that need one (`row.needs_query`), in row order, (B_q, H)."""
    wanted = sum(r.needs_query for r in rows)
    if wanted and (queries is None or len(queries) != wanted):
        raise ValueError(f"{wanted} rows need a query representation, got {queries!r:.40}")
    wg, wl = torch.ones(len(rows)), torch.zeros(len(rows))
    q = 0
    for i, row in enumerate(rows):
        if not row.has_local:
            continue  # never trained a local adapter: the global adapter alone
        query = None
        if row.needs_query:
            assert queries is not None
            query, q = queries[q : q + 1], q + 1
        gen = torch.Generator().manual_seed(row.seed)
        g, loc = instance_mix(query, row.bank, row.cfg, gen).as_rows(1)
        wg[i], wl[i] = g[0], loc[0]
    return Mix(wg, wl)
