"""Privacy mechanisms without a model: secure-aggregation masks, clipping, noise, accounting, the
driver's aggregation, restarts after a lost participant, and the config that turns them on."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from scipy import stats

from feddpa.actors.host import ClientHost, FitResult
from feddpa.core import dp, secagg
from feddpa.core.config import ConfigError, ExperimentConfig, build_config
from feddpa.core.privacy import EXTRA, ClientTask, Privacy, privatize, resolve, seal, top_up
from feddpa.orchestrator.private_round import RoundRefused, fit_private

BITS = 24
P = 300  # payload size of the synthetic updates


def keyring(ids):
    keys = {i: secagg.new_key() for i in ids}
    return keys, {i: secagg.public_bytes(k) for i, k in keys.items()}


def updates(ids, size=P, scale=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.normal(0, scale, size) for i in ids}


def masked_round(x, k=None, step=3, attempt=0):
    """Every client of `x` encodes and masks; returns (masked uploads, clear encodings)."""
    keys, public = keyring(list(x))
    ctx = secagg.context(step, attempt)
    clear = {i: secagg.encode(v, BITS, len(x)) for i, v in x.items()}
    masked = {i: secagg.mask(clear[i], i, keys[i], public, ctx, k) for i in x}
    return masked, clear


def modsum(vectors):
    total = secagg.ModularSum()
    for cid, v in vectors.items():
        total.add(cid, v)
    return total.total


# --- secure aggregation ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 2])
def test_masks_cancel_to_the_exact_sum_for_every_client_subset(k):
    """For every subset of ≥ 2 of 6 clients (57 subsets): the masked sum is bit-for-bit the sum of
    the fixed-point encodings, and decodes within m · 2^-(b+1) of the float sum (the stated
    quantization error: round to nearest, per client and coordinate)."""
    x = updates(range(6))
    for m in range(2, 7):
        for subset in itertools.combinations(range(6), m):
            masked, clear = masked_round({i: x[i] for i in subset}, k)
            assert np.array_equal(modsum(masked), modsum(clear)), subset
            got = secagg.decode(modsum(masked), BITS)
            exact = np.sum([x[i] for i in subset], axis=0)
            assert np.abs(got - exact).max() <= m * 2.0 ** -(BITS + 1), subset


def test_the_driver_never_holds_a_clients_update_nor_a_partial_sum():
    """Each upload, and the running sum of every proper subset of uploads (what the driver holds
    while they arrive), differs from the matching clear value in almost every coordinate: the
    masks look uniform over 2^64, so a collision is a 2^-64 event per coordinate."""
    x = updates(range(5))
    masked, clear = masked_round(x)
    for i in x:
        assert np.mean(masked[i] == clear[i]) < 0.01
        for j in x:  # nor is any upload another client's update
            assert not np.array_equal(masked[i], clear[j])
    for m in range(1, 5):
        for subset in itertools.combinations(x, m):
            partial = modsum({i: masked[i] for i in subset})
            assert np.mean(partial == modsum({i: clear[i] for i in subset})) < 0.01, subset
            for j in x:
                assert np.mean(secagg.decode(partial, BITS) == secagg.decode(clear[j], BITS)) < 0.01


def test_neighbour_masks_are_symmetric_and_bounded():
    ids = list(range(0, 40, 3))
    for k in (2, 3, 4, 6):
        graph = {i: secagg.neighbours(ids, i, k) for i in ids}
        assert all(i in graph[j] for i in ids for j in graph[i])
        assert all(len(graph[i]) <= k + 1 for i in ids)
    assert secagg.neighbours(ids, 3, None) == [i for i in ids if i != 3]


def test_encoding_refuses_values_that_could_wrap():
    with pytest.raises(OverflowError, match="fractional_bits"):
        secagg.encode(np.array([1e12]), BITS, participants=8)


# --- clipping, noise --------------------------------------------------------------------------


def task(**kw) -> ClientTask:
    base = dict(
        step=0,
        attempt=0,
        clip=None,
        noise_std=0.0,
        count_noise_std=0.0,
        public_keys=None,
        neighbors=None,
        fractional_bits=BITS,
    )
    return ClientTask(**{**base, **kw})


def states(delta: np.ndarray):
    received = {"a": torch.zeros(len(delta) // 2), "b": torch.ones(len(delta) - len(delta) // 2)}
    upload = {
        "a": received["a"] + torch.from_numpy(delta[: len(delta) // 2]).float(),
        "b": received["b"] + torch.from_numpy(delta[len(delta) // 2 :]).float(),
    }
    return upload, received


def test_clipping_bounds_every_clients_update_and_counts_the_unclipped():
    rng = np.random.default_rng(1)
    for scale in (1e-4, 1e-2, 1.0, 100.0):
        delta = rng.normal(0, scale, P)
        upload, received = states(delta)
        held = privatize(upload, received, 7, task(clip=0.5))
        assert held is not None
        payload = held.vector[:-EXTRA]
        norm = np.linalg.norm(np.asarray(delta, np.float32).astype(np.float64))
        assert np.linalg.norm(payload) <= 0.5 * (1 + 1e-9)
        assert held.vector[-3:].tolist() == [1.0, float(norm <= 0.5), 1.0]  # weight 1 under DP
        if norm <= 0.5:  # below the bound: untouched
            assert np.allclose(payload, delta, atol=1e-6)
    nan = np.full(P, np.nan)
    assert privatize(*states(nan), 7, task(clip=0.5)) is None


def test_without_dp_an_update_is_weighted_by_its_examples():
    delta = np.linspace(-1, 1, P)
    held = privatize(*states(delta), 7, task())
    assert held is not None
    assert np.allclose(held.vector[:-EXTRA], 7 * delta, atol=1e-5)
    assert held.vector[-3] == 7.0


def chi2_std_ok(samples: np.ndarray, sigma: float, alpha: float = 1e-6) -> bool:
    """Two-sided χ² test of the variance: (n−1)s²/σ² ~ χ²(n−1). False-failure rate `alpha`
    (one in a million) for a correctly distributed sample."""
    n = samples.size
    stat = (n - 1) * samples.var(ddof=1) / sigma**2
    lo, hi = stats.chi2.ppf([alpha / 2, 1 - alpha / 2], n - 1)
    return bool(lo < stat < hi)


def test_client_noise_has_the_configured_std_and_a_restart_tops_it_up():
    zero = np.zeros(50_000)
    held = privatize(*states(zero), 1, task(clip=1.0))
    assert held is not None
    rng = np.random.default_rng(7)
    first = top_up(held, task(clip=1.0, noise_std=0.3), rng)
    assert chi2_std_ok(first.vector[:-EXTRA], 0.3)
    assert not chi2_std_ok(first.vector[:-EXTRA], 0.3 * 1.02)  # the test has power
    # a restart among fewer survivors asks for a larger share: only the difference is added
    second = top_up(first, task(clip=1.0, noise_std=0.5), rng)
    assert chi2_std_ok(second.vector[:-EXTRA], 0.5)
    assert np.array_equal(top_up(second, task(clip=1.0, noise_std=0.5), rng).vector, second.vector)


def dp_cfg(**dp_over) -> ExperimentConfig:
    over = {"enabled": True, "noise_multiplier": 2.0, "clip": 0.5, **dp_over}
    sa = over.pop("secure_aggregation", {})
    return build_config(
        {
            "method": "fedit",
            "federation": {"rounds": 5, "min_fit_clients": 2},
            "privacy": {"dp": over, "secure_aggregation": sa},
        }
    )


def received_state(size=P):
    return {"w": torch.zeros(size)}


def test_server_noise_on_the_sum_has_std_z_times_c():
    """All clients upload zero: the mean update is the noise / m, so m · mean ~ N(0, z²C²)."""
    cfg = dp_cfg()
    privacy = Privacy(cfg, population=8)
    size, m = 60_000, 8
    zero = np.zeros(size + EXTRA)
    zero[-1] = m  # the count coordinate
    total = secagg.encode(zero, BITS, m)
    new, record = privacy.aggregate(0, received_state(size), total, m)
    noise = new["w"].double().numpy() * m
    assert chi2_std_ok(noise, 2.0 * 0.5)
    assert record["uploads"] == m and record["epsilon"] > 0


def test_the_accountants_epsilon_is_the_librarys():
    cases = [
        (
            dp.Sampling("poisson", 1000, rate=0.05),
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        ),
        (dp.Sampling("fixed", 8, size=8), dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
        (dp.Sampling("fixed", 200, size=20), dp_accounting.NeighboringRelation.REPLACE_ONE),
    ]
    for sampling, relation in cases:
        z, rounds, delta = 1.3, 12, 1e-5
        acc = rdp.RdpAccountant(list(dp.ORDERS), relation)
        gaussian = dp_accounting.GaussianDpEvent
        if sampling.kind == "poisson":
            event = dp_accounting.PoissonSampledDpEvent(0.05, gaussian(z))
        elif sampling.size == sampling.population:
            event = gaussian(z)
        else:  # replace-one moves the clipped sum by up to 2C
            event = dp_accounting.SampledWithoutReplacementDpEvent(200, 20, gaussian(z / 2))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        ours = dp.Accountant(z, sampling, delta)
        for _ in range(rounds):
            ours = ours.spend()
        assert ours.epsilon == pytest.approx(acc.get_epsilon(delta), rel=1e-12), sampling
    # the calibrated noise spends the target, and no noise is no privacy
    full = dp.Sampling("fixed", 8, size=8)
    z = dp.calibrate_noise(3.0, 1e-5, 4, full)
    assert dp.epsilon(z, full, 4, 1e-5) == pytest.approx(3.0, rel=1e-4)
    assert dp.epsilon(z, full, 4, 1e-5) <= 3.0 * (1 + dp.TOLERANCE)
    assert dp.epsilon(0.0, full, 1, 1e-5) == math.inf


def test_the_accountant_and_clip_continue_from_the_saved_state():
    cfg = dp_cfg(adaptive=True, count_stddev=5.0)
    a = Privacy(cfg, population=8)
    zero = np.zeros(P + EXTRA)
    zero[-1] = 8
    zero[-2] = 8  # every update unclipped: C shrinks
    total = secagg.encode(zero, BITS, 8)
    records = [a.aggregate(step, received_state(), total, 8)[1] for step in range(3)]
    saved = a.state()
    assert saved["accountant"]["rounds"] == 3 and saved["clip"] < 0.5
    b = Privacy(cfg, population=8, state=saved)  # a resumed run
    assert b.clip == a.clip
    after = b.aggregate(3, received_state(), total, 8)[1]
    reference = dp.Accountant(a.accountant.noise_multiplier, a.sampling, 1e-5)
    for _ in range(4):
        reference = reference.spend()
    assert after["epsilon"] == reference.epsilon > records[-1]["epsilon"]
    assert after["clip"] == a.clip  # the adapted clip, not the configured one
    fresh = Privacy(cfg, population=8)  # what restarting the accountant would have said
    assert fresh.aggregate(3, received_state(), total, 8)[1]["epsilon"] < after["epsilon"]


def test_adaptive_clipping_moves_c_toward_the_quantile():
    assert dp.next_clip(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))
    assert dp.next_clip(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))
    assert dp.update_noise_multiplier(1.0, 10.0) == pytest.approx((1 - 1 / 400) ** -0.5)
    with pytest.raises(ValueError, match="count_stddev"):
        dp.update_noise_multiplier(2.0, 0.5)


# --- a round through the driver: fakes for the hosts -------------------------------------------


class FakeExecutor:
    """Hosts without a model: each client's update is fixed; `lose` clients answer their fit
    (they masked) but are lost before their upload arrives; `restarted` clients lose their key
    between advertising and sealing (a restarted host that still answers)."""

    def __init__(self, cfg, x, lose=(), lose_in_seal=(), restarted=()):
        self.host = object.__new__(ClientHost)  # the real sealing code, no model
        self.host.cfg, self.host.held, self.host.keys = cfg, {}, {}
        self.x, self.lose, self.lose_in_seal, self.restarted = (
            x,
            set(lose),
            set(lose_in_seal),
            set(restarted),
        )
        self.seen: list[np.ndarray] = []  # everything the driver received
        self.discarded: list[int] = []

    def advertise(self, step, ids, attempt):
        for cid in ids:
            yield cid, self.host.advertise(cid, step, attempt)

    def fit(self, step, ids, global_state, stage, task=None):
        for cid in ids:
            upload = {"w": global_state["w"] + torch.from_numpy(self.x[cid]).float()}
            held = privatize(upload, global_state, 10, task)
            self.host.held[cid] = held
            if cid in self.restarted:
                self.host.advertise(cid, step, task.attempt)  # a new key the others never saw
            sealed = self.host.seal(cid, task)
            if cid in self.lose:
                continue  # masked, then lost
            self.seen.append(sealed)
            yield FitResult(cid, 10, None, {"global": (0.1,)}, sealed=sealed)

    def seal(self, ids, task):
        for cid in ids:
            if cid in self.lose_in_seal:
                continue
            sealed = self.host.seal(cid, task)
            self.seen.append(sealed)
            yield cid, sealed

    def discard(self, ids):
        self.discarded += ids

    def round_stats(self):
        return {"failures": [], "transfer_s": 0.0}


class NoStage:
    def drop_unreported(self, reported):
        return None


def secure_cfg(**sa):
    return build_config(
        {
            "method": "fedit",
            "federation": {"rounds": 2, "min_fit_clients": 2},
            "privacy": {"secure_aggregation": {"enabled": True, **sa}},
        }
    )


def test_a_client_lost_after_masking_restarts_the_masking_among_the_survivors():
    cfg = secure_cfg()
    x = updates(range(5), seed=3)
    ex = FakeExecutor(cfg, x, lose={2})
    out = fit_private(cfg, 0, ex, list(x), received_state(), NoStage(), Privacy(cfg, 5))
    survivors = [0, 1, 3, 4]
    assert out["reported"] == set(survivors) and out["privacy"]["attempts"] == 2
    exact = np.mean([np.float32(x[i]).astype(np.float64) for i in survivors], axis=0)
    got = out["global_state"]["w"].double().numpy()
    assert np.abs(got - exact).max() < 1e-6  # FedAvg of the survivors (equal examples)
    clear = [secagg.encode(np.concatenate([10 * x[i], [10, 1, 1]]), BITS, 5) for i in x]
    assert not any(np.array_equal(s, c) for s in ex.seen for c in clear)


def test_the_round_is_refused_when_the_masking_attempts_run_out():
    cfg = secure_cfg(max_attempts=2)
    x = updates(range(4))
    ex = FakeExecutor(cfg, x, lose={1}, lose_in_seal={3})
    with pytest.raises(RoundRefused, match="max_attempts=2"):
        fit_private(cfg, 0, ex, list(x), received_state(), NoStage(), Privacy(cfg, 4))
    cfg = secure_cfg(max_attempts=1)
    with pytest.raises(RoundRefused, match="refused"):
        fit_private(
            cfg,
            0,
            FakeExecutor(cfg, x, lose={1}),
            list(x),
            received_state(),
            NoStage(),
            Privacy(cfg, 4),
        )


def test_a_client_that_masked_with_an_unknown_key_is_caught_not_summed():
    """A restarted host makes a new key the others never used: its masks cannot cancel. The
    host refuses to seal with a key that is not in the round's list."""
    cfg = secure_cfg()
    x = updates(range(3))
    with pytest.raises(RuntimeError, match="key list does not hold its key"):
        fit_private(
            cfg,
            0,
            FakeExecutor(cfg, x, restarted={1}),
            list(x),
            received_state(),
            NoStage(),
            Privacy(cfg, 3),
        )


def test_a_sum_whose_masks_did_not_cancel_is_refused():
    cfg = secure_cfg()
    x = updates(range(3))
    masked, _ = masked_round({i: np.concatenate([x[i], [1, 1, 1]]) for i in x})
    masked.pop(2)  # lost, but summed as if the others' masks with it had cancelled
    with pytest.raises(RuntimeError, match="masks did not cancel"):
        Privacy(cfg, 3).aggregate(0, received_state(), modsum(masked), 2)


def test_secure_aggregation_with_client_noise_gives_the_server_noise_std():
    """Distributed noise: m clients each add N(0, z²C²/m); the sum's noise is N(0, z²C²), also
    after a restart among fewer survivors (each survivor tops up its share)."""
    cfg = dp_cfg(noise="client", secure_aggregation={"enabled": True})
    size = 40_000
    x = {i: np.zeros(size) for i in range(6)}
    privacy = Privacy(cfg, 6)
    ex = FakeExecutor(cfg, x, lose={4})
    out = fit_private(cfg, 0, ex, list(x), received_state(size), NoStage(), privacy)
    assert out["privacy"]["attempts"] == 2 and out["privacy"]["uploads"] == 5
    noise_sum = out["global_state"]["w"].double().numpy() * 5
    assert chi2_std_ok(noise_sum, 2.0 * 0.5)


# --- configuration ----------------------------------------------------------------------------


def test_privacy_is_off_by_default_and_validated():
    cfg = ExperimentConfig()
    assert not cfg.privacy.dp.enabled and not cfg.privacy.secure_aggregation.enabled
    assert not cfg.privacy.active
    bad = [
        ({"dp": {"enabled": True}}, "noise_multiplier or target_epsilon"),
        ({"dp": {"enabled": True, "noise_multiplier": 1, "noise": "client"}}, "secure_aggregation"),
        ({"secure_aggregation": {"enabled": True}}, "min_fit_clients >= 2"),
        ({"dp": {"enabled": True, "noise_multiplier": 1, "clip": 0}}, "privacy.dp.clip"),
        ({"secure_aggregation": {"fractional_bits": 60}}, "fractional_bits"),
    ]
    for privacy, message in bad:
        with pytest.raises(ConfigError, match=message):
            build_config({"privacy": privacy})


def test_resolution_calibrates_the_noise_and_stops_at_the_budget():
    cfg = dp_cfg(noise_multiplier=None, target_epsilon=3.0)
    resolved, notes = resolve(cfg, 8)
    z = resolved.privacy.dp.noise_multiplier
    assert z is not None and notes
    full = dp.Sampling("fixed", 8, size=8)
    assert dp.epsilon(z, full, 5, 1e-5) == pytest.approx(3.0, rel=1e-4)
    assert resolve(resolved, 8)[0] == resolved  # idempotent: a resumed run keeps it
    capped, _ = resolve(dp_cfg(noise_multiplier=2.0, target_epsilon=3.0), 8)
    k = capped.federation.rounds
    assert 0 < k < 5
    assert dp.epsilon(2.0, full, k, 1e-5) <= 3.0 < dp.epsilon(2.0, full, k + 1, 1e-5)
    with pytest.raises(ValueError, match="already spends"):
        resolve(dp_cfg(noise_multiplier=0.1, target_epsilon=0.1), 8)
    with pytest.raises(ValueError, match="uploads the global adapter"):
        resolve(
            build_config(
                {"method": "local", "privacy": {"dp": {"enabled": True, "noise_multiplier": 1}}}
            ),
            8,
        )


def test_sealed_uploads_without_masks_are_the_plain_encoding():
    x = np.linspace(-0.1, 0.1, P)
    held = privatize(*states(x), 3, task(clip=10.0))
    assert held is not None
    assert np.array_equal(seal(held, 0, task(clip=10.0), None), secagg.encode(held.vector, BITS))
