"""Client-level differential privacy of the global adapter: DP-FedAvg (McMahan et al., ICLR 2018,
"Learning Differentially Private Recurrent Language Models", Alg. 1) with adaptive clipping
(Andrew et al., NeurIPS 2021, "Differentially Private Learning with Adaptive Clipping", Alg. 1).

    Δ̃_i = Δ_i · min(1, C / ‖Δ_i‖₂)                          each client, Δ_i = uploaded − received
    Δ̄  = (Σ_{i ∈ S} Δ̃_i + N(0, z_Δ² C² I)) / |S|           (/ qN under Poisson sampling)
    b_i = 1[‖Δ_i‖₂ ≤ C],  b̄ = (Σ b_i + N(0, σ_b²)) / |S|,  C ← C · exp(−η_C (b̄ − γ))
    z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)                            (Andrew et al., Thm. 1)

so the pair (update sum, unclipped count) is as private as one Gaussian mechanism of noise
multiplier z, which is what the accountant composes each round. Accounting: the RDP accountant of
Google's `dp-accounting` library, one event per round, by the configured sampling:

- Poisson with rate q:               PoissonSampled(q, Gaussian(z)),   add-or-remove one client;
- every client each round:           Gaussian(z),                      add-or-remove one client;
- m of N without replacement:        SampledWithoutReplacement(N, m, Gaussian(z / 2)), replace one
                                     client (replacing one clipped update moves the sum by up to 2C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp

# RDP orders: fractional ones below 1.5 make the library's series fail to converge (and log it)
ORDERS = (1.5, 1.75, *range(2, 65), 80, 96, 128, 192, 256, 512, 1024)


TOLERANCE = 1e-6  # relative: a calibrated z spends the target within the calibration's tolerance


def clip(delta: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """(Δ · min(1, C/‖Δ‖₂), ‖Δ‖₂)."""
    norm = float(np.linalg.norm(delta))
    return (delta * (bound / norm) if norm > bound else delta), norm


def update_noise_multiplier(z: float, count_stddev: float | None) -> float:
    """z_Δ of the update sum when adaptive clipping spends part of z on the unclipped count."""
    if count_stddev is None or z == 0:
        return z
    if 2 * count_stddev <= z:
        raise ValueError(
            f"adaptive clipping: the count noise σ_b = {count_stddev:g} must exceed z/2 = {z / 2:g} "
            "(Andrew et al. 2021, Thm. 1): raise privacy.dp.count_stddev"
        )
    return (z**-2 - (2 * count_stddev) ** -2) ** -0.5


def next_clip(bound: float, unclipped_fraction: float, quantile: float, lr: float) -> float:
    """Geometric update of C toward the `quantile` of the clients' update norms."""
    return bound * math.exp(-lr * (unclipped_fraction - quantile))


@dataclass(frozen=True)
class Sampling:
    """How a round's clients are drawn: `poisson` with rate q, or `fixed` m of n."""

    kind: str  # "poisson" | "fixed"
    population: int
    size: int = 0  # fixed: m
    rate: float = 0.0  # poisson: q

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "population": self.population,
            "size": self.size,
            "rate": self.rate,
        }


def round_event(z: float, sampling: Sampling) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(z)
    if sampling.kind == "poisson":
        return dp_accounting.PoissonSampledDpEvent(sampling.rate, gaussian)
    if sampling.size >= sampling.population:
        return gaussian
    return dp_accounting.SampledWithoutReplacementDpEvent(
        sampling.population, sampling.size, dp_accounting.GaussianDpEvent(z / 2)
    )


def relation(sampling: Sampling) -> dp_accounting.NeighboringRelation:
    if sampling.kind == "fixed" and sampling.size < sampling.population:
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def fresh_accountant(sampling: Sampling) -> rdp.RdpAccountant:
    return rdp.RdpAccountant(list(ORDERS), relation(sampling))


def epsilon(z: float, sampling: Sampling, rounds: int, delta: float) -> float:
    """ε at δ after `rounds` rounds (∞ without noise, 0 before any round)."""
    if rounds == 0:
        return 0.0
    if z == 0:
        return math.inf
    acc = fresh_accountant(sampling)
    acc.compose(round_event(z, sampling), rounds)
    return float(acc.get_epsilon(delta))


def calibrate_noise(target: float, delta: float, rounds: int, sampling: Sampling) -> float:
    """The least z whose ε after `rounds` rounds is at most `target`."""
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: fresh_accountant(sampling),
            lambda z: dp_accounting.SelfComposedDpEvent(round_event(z, sampling), rounds),
            target,
            delta,
            dp_accounting.ExplicitBracketInterval(1e-3, 1e4),
            tol=1e-6,
        )
    )


def rounds_within(target: float, z: float, delta: float, rounds: int, sampling: Sampling) -> int:
    """How many of `rounds` rounds fit in the budget ε ≤ `target`."""
    lo, hi = 0, rounds  # ε grows with the rounds: bisect for the last one within the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon(z, sampling, mid, delta) <= target * (1 + TOLERANCE):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Accountant:
    """The privacy spent so far: `rounds` rounds of one event. Its state is part of every
    committed round (`state()` / `of_state`), so a resumed run continues it."""

    noise_multiplier: float
    sampling: Sampling
    delta: float
    rounds: int = 0

    def spend(self) -> Accountant:
        """After one more round."""
        return Accountant(self.noise_multiplier, self.sampling, self.delta, self.rounds + 1)

    @property
    def epsilon(self) -> float:
        return epsilon(self.noise_multiplier, self.sampling, self.rounds, self.delta)

    def state(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling": self.sampling.to_dict(),
            "delta": self.delta,
            "rounds": self.rounds,
        }

    @classmethod
    def of_state(cls, state: dict) -> Accountant:
        return cls(
            float(state["noise_multiplier"]),
            Sampling(**state["sampling"]),
            float(state["delta"]),
            int(state["rounds"]),
        )
