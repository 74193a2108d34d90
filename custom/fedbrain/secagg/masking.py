"""Fixed-point updates in the ring of 32-bit integers, and the stream-cipher masks that hide them.

A site's (already clipped and, where its scope says, noised) update is clipped per value to ``VALUE_BOUND``,
multiplied by its aggregation weight (its step count, capped at ``WEIGHT_CAP``) and rounded stochastically
to fixed point with ``scale`` steps per unit, chosen so that the sum of ``n_sites`` such values cannot leave
the signed 32-bit range: the sum the server unmasks is exact modulo 2**32 and equals the float sum within one
step per site. The server divides by the total weight (the step counts are in the clear, as in plaintext
FedAvg) and holds the weighted average.
A mask is ChaCha20's key stream under a 32-byte seed, with the round number in the nonce, so every
round's mask is fresh while the seeds are agreed once per job.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

RING_BITS = 32
RING_DTYPE = np.uint32
#: Per-value clip of an update (a round's weight changes are far below it; clipped values are counted).
VALUE_BOUND = 4.0
#: Largest aggregation weight (steps in a round): a site that trained more steps weighs as this many.
WEIGHT_CAP = 256
DEFAULT_BOUND = VALUE_BOUND * WEIGHT_CAP


def scale_for(n_sites: int, bound: float = DEFAULT_BOUND) -> float:
    """Fixed-point steps per unit: the largest power of two with ``n_sites * bound * scale < 2**31``."""
    if n_sites < 1 or bound <= 0:
        raise ValueError(f"n_sites {n_sites} and bound {bound} must be positive")
    return float(2 ** math.floor(math.log2((2 ** (RING_BITS - 1) - 1) / (n_sites * bound))))


def quantize(values: np.ndarray, scale: float, bound: float = DEFAULT_BOUND,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """``values`` (float) as ring elements, rounded stochastically (unbiased); also how many were clipped."""
    rng = rng or np.random.default_rng()
    x = np.asarray(values, dtype=np.float64).ravel()
    clipped = int(np.count_nonzero(np.abs(x) > bound))
    x = np.clip(x, -bound, bound) * scale
    low = np.floor(x)
    q = low + (rng.random(x.shape) < (x - low))
    return q.astype(np.int64).astype(RING_DTYPE), clipped


def dequantize(ring: np.ndarray, scale: float) -> np.ndarray:
    """Ring elements (a sum of quantized values) back to float, read as signed 32-bit."""
    return np.asarray(ring, dtype=RING_DTYPE).view(np.int32).astype(np.float64) / scale


def prg(seed: bytes, round_no: int, n: int) -> np.ndarray:
    """``n`` pseudo-random ring elements from ``seed`` for round ``round_no`` (ChaCha20 key stream)."""
    if len(seed) != 32:
        raise ValueError(f"a mask seed is 32 bytes, got {len(seed)}")
    nonce = (0).to_bytes(4, "little") + int(round_no).to_bytes(8, "little") + b"fbsa"
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(4 * n))
    return np.frombuffer(stream, dtype="<u4").astype(RING_DTYPE, copy=False)


def flatten(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, list[list]]:
    """One float vector of ``arrays`` in name order, and the layout ``[[name, shape], ...]`` to rebuild them."""
    names = sorted(arrays)
    layout = [[name, list(np.shape(arrays[name]))] for name in names]
    if not names:
        return np.zeros(0), layout
    return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in names]), layout


def unflatten(vector: np.ndarray, layout: list[list]) -> dict[str, np.ndarray]:
    """The arrays of ``layout`` (float32) from one vector."""
    out, at = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape)) if shape else 1
        out[name] = np.asarray(vector[at:at + size], dtype=np.float32).reshape(shape)
        at += size
    if at != len(vector):
        raise ValueError(f"layout holds {at} values, the vector {len(vector)}")
    return out


def encode(update: np.ndarray, steps: float, n_sites: int, rng: np.random.Generator | None = None):
    """A site's update as ring elements weighted by its step count: (ring vector, weight used, values clipped)."""
    weight = float(min(max(float(steps), 0.0), WEIGHT_CAP))
    x = np.asarray(update, dtype=np.float64).ravel()
    clipped = int(np.count_nonzero(np.abs(x) > VALUE_BOUND))
    ring, _ = quantize(np.clip(x, -VALUE_BOUND, VALUE_BOUND) * weight, scale_for(n_sites), rng=rng)
    return ring, weight, clipped


def decode(ring_sum: np.ndarray, total_weight: float, n_sites: int) -> np.ndarray:
    """The weighted average from the unmasked sum of :func:`encode`'s vectors and the senders' total weight."""
    if not total_weight > 0:
        raise ValueError("no weight in the round: nothing trained")
    return dequantize(ring_sum, scale_for(n_sites)) / total_weight
