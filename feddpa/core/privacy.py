"""A round's private upload, from the client's update to the driver's new global adapter:
DP-FedAvg (`feddpa.core.dp`) and secure aggregation (`feddpa.core.secagg`), placed by threat model.

Client (`privatize`, then `top_up` + `seal` per masking attempt), on its host:

    Δ = uploaded global − received global;  x = [payload (P), weight, unclipped, count]
    no DP:  payload = n·Δ, weight = n          (FedAvg weighted by examples; Σ weight = Σ n)
    DP:     payload = clip(Δ, C), weight = 1, unclipped = 1[‖Δ‖ ≤ C]
            noise 'client': + N(0, z_Δ²C²/m) on the payload, N(0, σ_b²/m) on unclipped
    count = 1;  upload = enc(x) (+ pairwise masks under secure aggregation)

Driver (`Privacy.aggregate`): Σ uploads mod 2^64 → decode → check count = the uploads summed
(every mask cancelled) → noise 'server': + N(0, z_Δ²C²), N(0, σ_b²) → mean update (÷ m, or ÷ qN
under Poisson sampling; ÷ Σ weight without DP) → new global = received + mean update; adaptive C;
the accountant spends one round. Every upload is fixed point, so the sum is exact, order-free and a
resumed run bit-identical; with secure aggregation off it is the same sum of unmasked vectors.

What the driver sees: with secure aggregation, uniformly random uint64 vectors and their sum;
without it, each client's (clipped) update. The DP guarantee covers the global adapters the run
releases; the clients' training losses and evaluation scores it logs are diagnostics outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from feddpa.core import dp, secagg
from feddpa.core.algorithms import derive_seed, method_of
from feddpa.core.config import ExperimentConfig
from feddpa.core.fedavg import FlatState, State

EXTRA = 3  # weight, unclipped, count after the payload


@dataclass(frozen=True)
class ClientTask:
    """What every participant of one masking attempt is asked to do with its update."""

    step: int
    attempt: int
    clip: float | None  # None: no DP
    noise_std: float  # per-client payload noise std after this attempt (client-placed noise)
    count_noise_std: float  # per-client noise std on the unclipped indicator
    public_keys: dict[int, bytes] | None  # secure aggregation: every participant's key
    neighbors: int | None
    fractional_bits: int

    @property
    def participants(self) -> int:
        return len(self.public_keys) if self.public_keys is not None else 1


@dataclass(frozen=True)
class Held:
    """A client's privatized update in the clear, kept on its host until its round is summed
    (a lost participant makes the others mask it again)."""

    step: int
    vector: np.ndarray  # (P + EXTRA,) float64
    noise_var: float = 0.0
    count_noise_var: float = 0.0


def flat64(state: State | FlatState) -> np.ndarray:
    return FlatState.of(state).data.to(torch.float64).numpy()


def privatize(upload: State, received: State, num_examples: int, task: ClientTask) -> Held | None:
    """The client's update as `x` (clipped under DP); None if it is not finite."""
    delta = flat64(upload) - flat64(received)
    if not np.isfinite(delta).all():
        return None
    if task.clip is None:
        payload, weight, unclipped = delta * num_examples, float(num_examples), 1.0
    else:
        payload, norm = dp.clip(delta, task.clip)
        weight, unclipped = 1.0, float(norm <= task.clip)
    return Held(task.step, np.concatenate([payload, [weight, unclipped, 1.0]]))


def top_up(held: Held, task: ClientTask, rng: np.random.Generator) -> Held:
    """Add the noise that brings the held update to the task's per-client std (the first attempt:
    all of it; a restart among fewer survivors: the difference, so the sum's noise stays z·C)."""
    vec = held.vector.copy()
    extra = task.noise_std**2 - held.noise_var
    if extra > 0:
        vec[:-EXTRA] += rng.normal(0.0, math.sqrt(extra), vec.size - EXTRA)
    extra_count = task.count_noise_std**2 - held.count_noise_var
    if extra_count > 0:
        vec[-2] += rng.normal(0.0, math.sqrt(extra_count))
    var = max(held.noise_var, task.noise_std**2)
    count_var = max(held.count_noise_var, task.count_noise_std**2)
    return replace(held, vector=vec, noise_var=var, count_noise_var=count_var)


def seal(held: Held, cid: int, task: ClientTask, key: secagg.X25519PrivateKey | None) -> np.ndarray:
    """The upload: enc(x), masked when the task carries the participants' keys."""
    encoded = secagg.encode(held.vector, task.fractional_bits, task.participants)
    if task.public_keys is None:
        return encoded
    if key is None:
        raise ValueError(f"client {cid}: secure aggregation without a key")
    ctx = secagg.context(task.step, task.attempt)
    return secagg.mask(encoded, cid, key, task.public_keys, ctx, task.neighbors)


def sampling_of(cfg: ExperimentConfig, population: int) -> dp.Sampling:
    fed = cfg.federation
    if fed.sampling == "poisson":
        return dp.Sampling("poisson", population, rate=fed.fraction_fit)
    size = min(population, max(fed.min_fit_clients, math.ceil(fed.fraction_fit * population)))
    return dp.Sampling("fixed", population, size=size)


def expected_participants(sampling: dp.Sampling) -> float:
    return sampling.rate * sampling.population if sampling.kind == "poisson" else sampling.size


def resolve(cfg: ExperimentConfig, population: int) -> tuple[ExperimentConfig, list[str]]:
    """The run's privacy settings made explicit: the calibrated noise multiplier, σ_b, and the
    rounds the ε budget allows. Idempotent (a resumed run resolves to its own config).
    Returns (config, what was resolved, for the log)."""
    p = cfg.privacy
    if not p.active:
        return cfg, []
    method = method_of(cfg)
    if not method.uploads_global or method.pooled:
        raise ValueError(
            f"privacy needs a federated method that uploads the global adapter; {cfg.method!r} "
            "does not (Local shares nothing; Centralized pools the data)"
        )
    d, notes = p.dp, list[str]()
    if not d.enabled:
        return cfg, notes
    sampling, fed = sampling_of(cfg, population), cfg.federation
    z, rounds, count_std = d.noise_multiplier, fed.rounds, d.count_stddev
    if z is None:
        assert d.target_epsilon is not None  # the config validator asks for one of them
        z = dp.calibrate_noise(d.target_epsilon, d.delta, rounds, sampling)
        notes.append(f"noise multiplier {z:.4f} spends ε = {d.target_epsilon} in {rounds} rounds")
    elif d.target_epsilon is not None:
        rounds = dp.rounds_within(d.target_epsilon, z, d.delta, fed.rounds, sampling)
        if rounds == 0:
            raise ValueError(
                f"privacy.dp: one round at noise multiplier {z} already spends more than "
                f"target_epsilon {d.target_epsilon}: raise the noise multiplier or the target"
            )
        if rounds < fed.rounds:
            notes.append(f"ε budget {d.target_epsilon} allows {rounds} of {fed.rounds} rounds")
    if d.adaptive and count_std is None:
        count_std = max(expected_participants(sampling), 1.0) / 20  # Andrew et al.'s default
        notes.append(f"adaptive clipping: count noise σ_b = {count_std:g}")
    if d.adaptive:
        dp.update_noise_multiplier(z, count_std)  # raises when σ_b is too small for z
    new_dp = d.model_copy(update={"noise_multiplier": z, "count_stddev": count_std})
    update = {
        "privacy": p.model_copy(update={"dp": new_dp}),
        "federation": fed.model_copy(update={"rounds": rounds}),
    }
    return cfg.model_copy(update=update), notes


class Privacy:
    """The driver's side: what each attempt asks of the clients, and the round's aggregation
    (noise, mean, adaptive clip, accounting). Its `state()` is saved in every committed round."""

    def __init__(self, cfg: ExperimentConfig, population: int, state: dict | None = None) -> None:
        self.cfg = cfg
        self.dp, self.sa = cfg.privacy.dp, cfg.privacy.secure_aggregation
        self.sampling = sampling_of(cfg, population)
        z = self.dp.noise_multiplier or 0.0
        self.update_z = dp.update_noise_multiplier(
            z, self.dp.count_stddev if self.dp.adaptive else None
        )
        if state is None:
            self.clip = self.dp.clip
            self.accountant = dp.Accountant(z, self.sampling, self.dp.delta)
        else:
            self.clip = float(state["clip"])
            self.accountant = dp.Accountant.of_state(state["accountant"])

    @property
    def secure(self) -> bool:
        return self.sa.enabled

    @property
    def count_std(self) -> float:
        return (self.dp.count_stddev or 0.0) if self.dp.enabled and self.dp.adaptive else 0.0

    def state(self) -> dict:
        return {"clip": self.clip, "accountant": self.accountant.state()}

    def task(self, step: int, attempt: int, participants: int, keys: dict | None) -> ClientTask:
        client_noise = self.dp.enabled and self.dp.noise == "client"
        share = 1 / math.sqrt(max(participants, 1))
        return ClientTask(
            step=step,
            attempt=attempt,
            clip=self.clip if self.dp.enabled else None,
            noise_std=self.update_z * self.clip * share if client_noise else 0.0,
            count_noise_std=self.count_std * share if client_noise else 0.0,
            public_keys=keys,
            neighbors=self.sa.neighbors,
            fractional_bits=self.sa.fractional_bits,
        )

    def aggregate(
        self, step: int, received: State, total: np.ndarray | None, uploads: int
    ) -> tuple[State, dict]:
        """(new global, the round's privacy record) from the modular sum of `uploads` uploads."""
        flat = FlatState.of(received)
        size = flat.data.numel()
        summed = (
            secagg.decode(total, self.sa.fractional_bits)
            if total is not None
            else np.zeros(size + EXTRA)
        )
        if summed.size != size + EXTRA:
            raise ValueError(
                f"round {step}: uploads of {summed.size - EXTRA} values, adapter {size}"
            )
        payload, weight, unclipped, count = summed[:-EXTRA], summed[-3], summed[-2], summed[-1]
        if abs(count - uploads) > 0.5:  # exact integers when every mask cancelled
            raise RuntimeError(
                f"round {step}: the uploads' count coordinate sums to {count:.6g}, not {uploads}: "
                "masks did not cancel (a client masked with a key the others did not use); the "
                "round is refused, nothing was committed"
            )
        record: dict = {"uploads": uploads, "secure_aggregation": self.secure}
        if not self.dp.enabled:
            mean = payload / weight if uploads else np.zeros(size)
        else:
            mean, record = self._dp_mean(step, payload, unclipped, uploads, record)
        new = torch.from_numpy(flat64(flat) + mean).to(flat.data.dtype)
        return FlatState(flat.layout, new).state(), record

    def _dp_mean(
        self, step: int, payload: np.ndarray, unclipped: float, uploads: int, record: dict
    ) -> tuple[np.ndarray, dict]:
        if self.dp.noise == "server":
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "dp-server-noise", step))
            payload = payload + rng.normal(0.0, self.update_z * self.clip, payload.size)
            unclipped += rng.normal(0.0, self.count_std) if self.count_std else 0.0
        poisson = self.sampling.kind == "poisson"
        denom = expected_participants(self.sampling) if poisson else max(uploads, 1)
        clip, fraction = self.clip, unclipped / denom
        if self.dp.adaptive:
            self.clip = dp.next_clip(clip, fraction, self.dp.target_quantile, self.dp.clip_lr)
        self.accountant = self.accountant.spend()
        eps = self.accountant.epsilon
        target = self.dp.target_epsilon
        if target is not None and eps > target * (1 + dp.TOLERANCE):
            raise RuntimeError(f"round {step}: ε {eps:.4f} would exceed target_epsilon {target}")
        record.update(
            epsilon=eps,
            delta=self.dp.delta,
            noise_multiplier=self.accountant.noise_multiplier,
            noise=self.dp.noise,
            clip=clip,
            next_clip=self.clip,
            rounds_accounted=self.accountant.rounds,
        )
        if self.dp.adaptive:  # noised; without adaptive clipping the exact count is not released
            record["unclipped_fraction"] = fraction
        return payload / denom, record

    def untouched(self) -> dict:
        """The record of a step without uploads (FedDPA-F's fine-tuning): nothing spent."""
        record: dict = {"uploads": 0, "secure_aggregation": self.secure}
        if self.dp.enabled:
            record.update(
                epsilon=self.accountant.epsilon,
                delta=self.dp.delta,
                noise_multiplier=self.accountant.noise_multiplier,
                noise=self.dp.noise,
                clip=self.clip,
                rounds_accounted=self.accountant.rounds,
            )
        return record
