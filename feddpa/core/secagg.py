"""Secure aggregation by pairwise additive masks (Bonawitz et al., CCS 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", Sec. 3; the neighbour graph of SecAgg+, Bell
et al., CCS 2020). Client i of the round's participants P uploads

    y_i = enc(x_i) + Σ_{j ∈ N(i), j > i} PRG(s_ij) − Σ_{j ∈ N(i), j < i} PRG(s_ij)     (mod 2^64)

so Σ_{i ∈ P} y_i = Σ_{i ∈ P} enc(x_i) (mod 2^64) exactly: every mask is added once and subtracted
once. enc is fixed point, round(x · 2^b) as a two's-complement 64-bit integer; its error is at
most 2^-(b+1) per coordinate and client, so a sum of m clients decodes within m · 2^-(b+1).
s_ij = HKDF-SHA256(X25519(sk_i, pk_j), round, attempt) is the same for i and j and unknown to
anyone else; PRG is the ChaCha20 keystream under s_ij. N(i) is every other participant, or its k
ring neighbours (SecAgg+: k·m masks per round instead of m²).

A participant lost after it masked leaves masks in the others' uploads that nothing cancels: the
sum is then garbage, never silently accepted (the round's count coordinate, an exact 1 per client,
decodes to the number of uploads only if every mask cancelled; `feddpa.core.privacy`). The round
loop restarts the masking among the survivors instead (fresh keys, `attempt` + 1): no secret is
ever reconstructed, so a late upload of the lost client stays masked by pads nobody reveals.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RANGE_BITS = 62  # |enc(x)| < 2^62 per client: sums of up to 2 clients cannot wrap (checked)


def encode(x: np.ndarray, fractional_bits: int, participants: int = 1) -> np.ndarray:
    """(P,) float64 -> (P,) uint64 fixed point (two's complement). Refuses a value whose sum over
    `participants` clients could wrap around 2^64 (the error names the bound)."""
    scaled = np.rint(np.asarray(x, dtype=np.float64) * 2.0**fractional_bits)
    bound = 2.0 ** (63 - max(participants, 1).bit_length())
    if scaled.size and not np.all(np.abs(scaled) < min(bound, 2.0**RANGE_BITS)):
        worst = float(np.abs(x).max())
        raise OverflowError(
            f"secure aggregation: a value of magnitude {worst:.3g} does not fit "
            f"privacy.secure_aggregation.fractional_bits={fractional_bits} for {participants} "
            "clients: lower fractional_bits or clip the update (privacy.dp)"
        )
    return scaled.astype(np.int64).view(np.uint64)


def decode(v: np.ndarray, fractional_bits: int) -> np.ndarray:
    """(P,) uint64 sum -> (P,) float64 (exact for sums that did not wrap)."""
    return v.view(np.int64).astype(np.float64) / 2.0**fractional_bits


def new_key() -> X25519PrivateKey:
    """A fresh key pair from the OS's entropy. Masks cancel whatever the keys, so the sum (and a
    resumed run) does not depend on them."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def neighbours(participants: list[int], cid: int, k: int | None) -> list[int]:
    """The clients `cid` shares a mask with: all other participants, or its k nearest on the ring
    of sorted participants (symmetric: j ∈ N(i) ⇔ i ∈ N(j))."""
    ring = sorted(participants)
    others = [j for j in ring if j != cid]
    if k is None or k >= len(others):
        return others
    pos, n, half = ring.index(cid), len(ring), (k + 1) // 2
    near = {ring[(pos + d) % n] for d in range(1, half + 1)} | {
        ring[(pos - d) % n] for d in range(1, half + 1)
    }
    return sorted(near - {cid})


def pair_seed(key: X25519PrivateKey, peer: bytes, context: bytes) -> bytes:
    """s_ij: 32 bytes both ends derive from their own secret key and the other's public key."""
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """(n,) uint64 from the ChaCha20 keystream under `seed`."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * n)), dtype=np.uint64)


def context(step: int, attempt: int) -> bytes:
    return f"feddpa-secagg/round {step}/attempt {attempt}".encode()


def mask(
    encoded: np.ndarray,
    cid: int,
    key: X25519PrivateKey,
    public_keys: dict[int, bytes],
    ctx: bytes,
    k: int | None = None,
) -> np.ndarray:
    """y_i: client `cid`'s encoded vector plus its pairwise masks (`public_keys` of every
    participant of this attempt, its own included)."""
    out = encoded.copy()
    for j in neighbours(list(public_keys), cid, k):
        pad = prg(pair_seed(key, public_keys[j], ctx), out.size)
        if cid < j:
            out += pad  # uint64: wraps modulo 2^64
        else:
            out -= pad
    return out


class ModularSum:
    """Σ of uint64 vectors modulo 2^64, folded as they arrive: exact and order-free, so the sum
    is bit-identical however uploads arrive; memory is one vector."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.ids: list[int] = []

    def add(self, cid: int, v: np.ndarray) -> None:
        if v.dtype != np.uint64 or v.ndim != 1:
            raise ValueError(f"client {cid}: a sealed upload is a 1-D uint64 vector, got {v.dtype}")
        if cid in self.ids:
            raise ValueError(f"client {cid}: upload already folded this attempt")
        if self.total is None:
            self.total = v.copy()
        elif v.size != self.total.size:
            raise ValueError(f"client {cid}: upload of {v.size} values, earlier {self.total.size}")
        else:
            self.total += v
        self.ids.append(cid)
