"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field of 2**521 - 1.

Why our own: ~40 lines over Python integers, with no dependency to vet; a 521-bit Mersenne prime holds any
32-byte secret as one field element, so a secret is one polynomial. Shares are ``(x, y)`` with x = 1..n
(a participant's fixed index), y a field element; any t of them give the secret, t - 1 give nothing.
"""

from __future__ import annotations

import secrets

PRIME = 2 ** 521 - 1
SECRET_BYTES = 32


class ShamirError(ValueError):
    """Too few shares, a repeated x, or a result that is not a 32-byte secret."""


def split(secret: bytes, n: int, t: int) -> list[tuple[int, int]]:
    """Shares ``(x, y)`` for x = 1..n of ``secret``; any ``t`` of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= t <= n:
        raise ShamirError(f"threshold {t} must be between 1 and the number of shares {n}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: list[tuple[int, int]], t: int) -> bytes:
    """The secret from at least ``t`` shares (the first ``t`` distinct ones are used)."""
    distinct = {}
    for x, y in shares:
        distinct.setdefault(int(x), int(y))
    if len(distinct) < t:
        raise ShamirError(f"{len(distinct)} distinct shares, {t} needed")
    points = list(distinct.items())[:t]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("the shares do not belong to one secret")
    return secret.to_bytes(SECRET_BYTES, "big")
