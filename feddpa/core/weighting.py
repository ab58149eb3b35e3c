"""Instance-wise adapter weighting (FedDPA, arXiv 2403.19211, Sec. 4.3, Eq. 7).

    w(x) = λ · mean_k cos(e(x), e(x_k))

e(·) is the representation of a prompt computed with the local adapter only (the last prompt
token's final hidden state for causal LMs; the mean-pooled final hidden state for encoders);
x_k are reference instances from the client's own training data. The client's representation bank
holds e(x) for all its training prompts, computed once per local adapter, so every mode below is a
choice of references among the bank's rows:

- `sample`: K random rows per instance (seeded) — the reference code's estimator;
- `bank`: all rows (mean cosine), or the mean of the top-k cosines;
- `fixed`: a constant w; `global_only` / `local_only`: w = 1 / w = 0 on the global adapter.

`weight_on` says which adapter w multiplies: `global` (the reference code: h = w·ΔG + (1−w)·ΔL)
or `local` (h = (1−w)·ΔG + w·ΔL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from feddpa.core.adapters import GLOBAL_ONLY, LOCAL_ONLY, Mix
from feddpa.core.config import WeightingConfig


def cosine_matrix(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, H) x (N, H) -> (B, N) cosine similarities."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T


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
        sims = cos.topk(min(cfg.topk, cos.shape[1]), dim=1).values.mean(dim=1)
    else:
        sims = cos.mean(dim=1)
    return cfg.lam * sims


def mix_for_weight(w: float | torch.Tensor, weight_on: str) -> Mix:
    """The adapter mix for weight w placed on `weight_on`."""
    if weight_on == "global":
        return Mix(w, 1 - w)
    return Mix(1 - w, w)


def needs_bank(cfg: WeightingConfig) -> bool:
    return cfg.mode in ("sample", "bank")


def instance_mix(
    queries: torch.Tensor | None,
    bank: torch.Tensor | None,
    cfg: WeightingConfig,
    generator: torch.Generator | None = None,
) -> Mix:
    """The per-row mix for a batch whose local-only representations are `queries` (B, H)."""
    if cfg.mode == "global_only":
        return GLOBAL_ONLY
    if cfg.mode == "local_only":
        return LOCAL_ONLY
    if cfg.mode == "fixed":
        return mix_for_weight(cfg.fixed, cfg.weight_on)
    if queries is None or bank is None or len(bank) == 0:
        raise ValueError(f"weighting mode {cfg.mode!r} needs query representations and a bank")
    return mix_for_weight(similarity_weights(queries, bank, cfg, generator), cfg.weight_on)
