"""The one accountant both DP levels use (Opacus' RDP), and the numbers around it."""

from __future__ import annotations

#: Opacus' accountant name: RDP is deterministic and slightly conservative; its history is plain numbers.
ACCOUNTANT = "rdp"


def default_delta(n_train: int) -> float:
    """``min(1e-5, 1 / n^1.1)``: below 1/n (at which releasing one whole record would count as "private")
    by more than a constant factor, and never above the 1e-5 the field publishes with."""
    return min(1e-5, 1.0 / max(n_train, 1) ** 1.1)


def epsilon_of(history, delta: float) -> float:
    """Epsilon of an RDP accountant history ``[(noise, q, steps), ...]`` at ``delta`` (0 when empty)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta)) if acc.history else 0.0
