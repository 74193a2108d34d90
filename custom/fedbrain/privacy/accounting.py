"""The one accountant both DP levels use (Opacus' RDP), and the numbers around it."""

from __future__ import annotations

#: Opacus' accountant name: RDP is deterministic and slightly conservative; its history is plain numbers.
ACCOUNTANT = "rdp"


def default_delta(n_train: int) -> float:
    """``1 / (10 n)``: well below the 1/n at which releasing one whole record would be "private"."""
    return 1.0 / (10 * max(n_train, 1))


def epsilon_of(history, delta: float) -> float:
    """Epsilon of an RDP accountant history ``[(noise, q, steps), ...]`` at ``delta`` (0 when empty)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta)) if acc.history else 0.0
