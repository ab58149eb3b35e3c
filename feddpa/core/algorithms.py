"""The training variants as phase schedules (FedDPA, arXiv 2403.19211, Sec. 4; reference code).

- FedIT: each round, each client trains the global adapter alone; the server averages it.
- FedDPA-T: round 0 as FedIT; from round 1 the client first trains its local adapter with output
  a·ΔL + (1−a)·stopgrad(ΔG) against the global it received, then the global adapter alone, which it
  uploads. The global trajectory is FedIT's.
- FedDPA-F: FedIT rounds; then each client fine-tunes a copy of the final global adapter alone on
  its own data — that copy is its local adapter.
- Local: each client trains its local adapter alone every round; nothing is shared.
- Centralized: one client holding the pooled data trains the global adapter (FedIT with one client).

At evaluation FedIT and Centralized use the global adapter alone, Local the local adapter alone,
and FedDPA-T/F the instance-wise weighting.
"""

from __future__ import annotations

import hashlib

from feddpa.core.adapters import GLOBAL, GLOBAL_ONLY, LOCAL, LOCAL_ONLY, Mix
from feddpa.core.config import ExperimentConfig, WeightingConfig
from feddpa.core.training import Phase

FEDERATED = ("fedit", "feddpa_t", "feddpa_f", "centralized")


def round_phases(cfg: ExperimentConfig, round_idx: int) -> list[Phase]:
    """The phases a client runs in `round_idx` (0-based)."""
    t = cfg.train
    global_phase = Phase("global", GLOBAL, GLOBAL_ONLY, t.epochs)
    if cfg.method == "local":
        return [Phase("local", LOCAL, LOCAL_ONLY, t.local_epochs)]
    if cfg.method == "feddpa_t" and round_idx >= 1:
        mixed = Mix(global_w=1 - t.mix_a, local_w=t.mix_a)
        return [Phase("local", LOCAL, mixed, t.local_epochs), global_phase]
    return [global_phase]


def finetune_phases(cfg: ExperimentConfig) -> list[Phase]:
    """After the last round: FedDPA-F's local fine-tuning from a copy of the final global."""
    if cfg.method == "feddpa_f":
        return [Phase("finetune", LOCAL, LOCAL_ONLY, cfg.train.finetune_epochs)]
    return []


def uploads_global(cfg: ExperimentConfig) -> bool:
    return cfg.method in FEDERATED


def trains_local(cfg: ExperimentConfig) -> bool:
    return cfg.method in ("feddpa_t", "feddpa_f", "local")


def eval_weighting(cfg: ExperimentConfig) -> WeightingConfig:
    """The weighting a method is evaluated with."""
    if cfg.method in ("fedit", "centralized"):
        return cfg.weighting.model_copy(update={"mode": "global_only"})
    if cfg.method == "local":
        return cfg.weighting.model_copy(update={"mode": "local_only"})
    return cfg.weighting


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (independent of PYTHONHASHSEED and process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
