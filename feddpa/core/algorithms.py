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
from typing import ClassVar

from feddpa.core.adapters import GLOBAL, GLOBAL_ONLY, LOCAL, LOCAL_ONLY, Mix
from feddpa.core.config import ExperimentConfig, WeightingConfig, WeightMode
from feddpa.core.training import Phase

POOLED = -1  # the Centralized baseline's single client holding every shard


class Method:
    """A training variant as a strategy: what each round trains, what a client uploads, how the
    run is evaluated, and whether FedIT can be read beside it. The round loop, the hosts and the
    serving engine ask the strategy; none of them compares method names."""

    name: ClassVar[str]
    uploads_global: ClassVar[bool] = True  # clients send their global adapter to be averaged
    trains_local: ClassVar[bool] = False  # clients keep a local adapter (and a bank)
    pooled: ClassVar[bool] = False  # one client holding every shard (Centralized)
    eval_mode: ClassVar[WeightMode | None] = None  # a fixed evaluation mode; None: the config's

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def _global_phase(self) -> Phase:
        return Phase("global", GLOBAL, GLOBAL_ONLY, self.cfg.train.epochs)

    def round_phases(self, round_idx: int) -> list[Phase]:
        """The phases a client runs in federated round `round_idx` (0-based)."""
        return [self._global_phase()]

    def finetune_phases(self) -> list[Phase]:
        """The phases of the one step after the last round (FedDPA-F); none for the others."""
        return []

    def phases(self, step: int) -> list[Phase]:
        """The phases of step `step`: a federated round, or the fine-tuning step after them."""
        return self.finetune_phases() if self.finetunes(step) else self.round_phases(step)

    def finetunes(self, step: int) -> bool:
        return step >= self.cfg.federation.rounds

    @property
    def total_steps(self) -> int:
        return self.cfg.federation.rounds + (1 if self.finetune_phases() else 0)

    def fit_clients(self, step: int, sampled: list[int]) -> list[int]:
        """Who trains in step `step` given the sampled federation clients."""
        return sampled

    def hosted_clients(self, client_ids: list[int]) -> list[int]:
        """The clients the hosts own."""
        return client_ids

    def eval_weighting(self) -> WeightingConfig:
        """The weighting the trained run is evaluated (and served) with."""
        if self.eval_mode is None:
            return self.cfg.weighting
        return self.cfg.weighting.model_copy(update={"mode": self.eval_mode})

    def step_weighting(self, step: int) -> WeightingConfig:
        """The weighting an evaluation after step `step` uses."""
        return self.eval_weighting()

    def fedit_beside(self, weighting: WeightingConfig) -> bool:
        """Whether this run's global adapter alone is FedIT, so FedIT is read from the same run
        beside the method (FedDPA-T/F: their global trajectory is FedIT's)."""
        return False


class FedIT(Method):
    name = "fedit"
    eval_mode = "global_only"


class Centralized(Method):
    name = "centralized"
    pooled = True
    eval_mode = "global_only"

    def fit_clients(self, step: int, sampled: list[int]) -> list[int]:
        return sampled if self.finetunes(step) else [POOLED]

    def hosted_clients(self, client_ids: list[int]) -> list[int]:
        return [POOLED]


class Local(Method):
    name = "local"
    uploads_global = False
    trains_local = True
    eval_mode = "local_only"

    def round_phases(self, round_idx: int) -> list[Phase]:
        return [Phase("local", LOCAL, LOCAL_ONLY, self.cfg.train.local_epochs)]


class FedDPAT(Method):
    name = "feddpa_t"
    trains_local = True

    def round_phases(self, round_idx: int) -> list[Phase]:
        if round_idx < 1:
            return [self._global_phase()]
        t = self.cfg.train
        mixed = Mix(global_w=1 - t.mix_a, local_w=t.mix_a)
        return [Phase("local", LOCAL, mixed, t.local_epochs), self._global_phase()]

    def fedit_beside(self, weighting: WeightingConfig) -> bool:
        return weighting.mode != "local_only"


class FedDPAF(Method):
    name = "feddpa_f"
    trains_local = True

    def finetune_phases(self) -> list[Phase]:
        return [Phase("finetune", LOCAL, LOCAL_ONLY, self.cfg.train.finetune_epochs)]

    def step_weighting(self, step: int) -> WeightingConfig:
        """Its rounds before the fine-tuning step are FedIT rounds: the global adapter alone."""
        if not self.finetunes(step):
            return self.cfg.weighting.model_copy(update={"mode": "global_only"})
        return self.eval_weighting()

    def fedit_beside(self, weighting: WeightingConfig) -> bool:
        return weighting.mode != "local_only"


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (FedIT, FedDPAT, FedDPAF, Local, Centralized)
}


def method_of(cfg: ExperimentConfig) -> Method:
    """The strategy of `cfg.method`."""
    return METHODS[cfg.method](cfg)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (independent of PYTHONHASHSEED and process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
