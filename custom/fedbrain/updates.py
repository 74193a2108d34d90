"""The numbers a model update carries, one definition for every part that measures or changes them.

An update is a dict of named arrays (numpy on the wire, torch at the site). The sites' clip and
client-level DP (privacy), the server's audit (filters), the update guard (aggregation) and the
fault-injection filter all ask the same questions: which entries are weights, as numpy, and what is
the update's L2 norm. Answering them here keeps "the norm" one number across the product.
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["as_numpy", "is_float", "names_in_part", "update_norm"]


def is_float(v) -> bool:
    """True for a floating-point numpy array or torch tensor (weights); counters and ints are not."""
    if isinstance(v, np.ndarray):
        return np.issubdtype(v.dtype, np.floating)
    return hasattr(v, "is_floating_point") and v.is_floating_point()  # a torch tensor


def as_numpy(v) -> np.ndarray:
    """A torch tensor as numpy (detached, on the CPU); anything else through ``np.asarray``."""
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def update_norm(data: dict) -> float:
    """L2 norm over every float tensor of an update (numpy arrays or torch tensors)."""
    return math.sqrt(sum(float(np.sum(np.square(as_numpy(v), dtype=np.float64))) for v in data.values() if is_float(v)))


def names_in_part(names, patterns) -> list[str]:
    """Of ``names``, those a pattern of ``patterns`` (regular expressions) finds; all of them when ``patterns``
    is None. One rule for what trains and what a client-level DP filter releases."""
    if patterns is None:
        return list(names)
    compiled = [re.compile(p) for p in patterns]
    return [n for n in names if any(p.search(n) for p in compiled)]
