"""The server's screening and combining of one round's weight differences, in plain numpy.

No FLARE here (the FLARE component is :mod:`fedbrain.aggregation.aggregator`), so every rule is
unit-testable on hand-made updates.

Update guard (:func:`screen`), in this order, per update:

1. non-finite values (NaN/Inf) in any array -> refused;
2. a name the global model does not have -> refused ("wrong names"); a name the global model has
   but the update lacks is NOT wrong: personal heads are removed at the site (ExcludeVars);
3. a shape that differs from the global model's -> refused;
4. a norm far outside the round's: robust z-score of log(L2 norm) over the round's scored updates,
   ``z = 0.6745 * |log n - median(log n)| / max(MAD, MAD_FLOOR)``, refused when ``z > guard_z``.

Rule for few sites (the demo has 3): the norm rule needs at least 3 scored updates (trained, i.e.
NUM_STEPS > 0, norm > 0, passed 1-3). With 2 it cannot tell which one is the outlier (both are
equally far from their median) and refuses none; with 1 there is nothing to compare. With 3 the
MAD is the smaller of the two non-zero deviations and can be ~0 when two honest sites happen to
agree closely, which would refuse a third honest site for a tiny difference: hence the floor
``MAD_FLOOR`` (log units). With the default ``guard_z`` 3.5 and the MAD at its floor, an update is
refused when its norm is more than 10x (or less than 1/10 of) the round's median norm; in general
the ratio is ``10 ** (guard_z / 3.5)``. Log norms make the rule scale-free: a site with twice the
data (twice the steps, a larger update) is not an outlier.

Combining (:func:`combine`), per parameter name over the accepted updates that sent it, zero-step
updates (a site with no usable data or one withholding for privacy) taking no part:

- ``fedavg``: the NUM_STEPS-weighted mean (FLARE's FedAvg);
- ``median``: coordinate-wise median (unweighted);
- ``trimmed_mean``: coordinate-wise mean after cutting ``k = ceil(trim_fraction * n)`` values at
  each end (at most ``(n - 1) // 2``): with 3 sites and the default 0.2, k = 1 (the median);
- ``krum``: multi-Krum: each update scored by the summed squared distances to its
  ``max(1, n - f - 2)`` nearest others (over the names all of them share), the ``n - f`` best kept
  and NUM_STEPS-averaged (f = ``krum_byzantine``, at most n - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedbrain.updates import update_norm

#: Floor of the MAD of log norms: ln(10) * 0.6745 / 3.5, so that at the default guard_z 3.5 a norm
#: 10x the round's median is the least that is refused when the other sites agree closely.
MAD_FLOOR = math.log(10) * 0.6745 / 3.5
#: Fewest scored updates for which the norm rule can name an outlier.
MIN_SITES_FOR_NORM = 3


@dataclass
class Update:
    """One site's contribution to a round: weight differences by name, and its step count."""

    site: str
    params: dict  # name -> np.ndarray
    steps: float = 1.0


@dataclass
class Screening:
    accepted: list  # Updates that go into the combination
    refused: dict = field(default_factory=dict)  # site -> reason
    idle: list = field(default_factory=list)  # sites that sent nothing trained (0 steps / empty): no part, no refusal
    norms: dict = field(default_factory=dict)  # site -> L2 norm (finite updates only)
    z: dict = field(default_factory=dict)  # site -> robust z of its log norm (when scored)



def _non_finite(params: dict) -> list[str]:
    return [k for k, v in params.items() if np.asarray(v).dtype.kind in "fc" and not np.all(np.isfinite(v))]


def screen(updates: list[Update], reference: dict | None, guard_z: float, enabled: bool = True) -> Screening:
    """Split the round's updates into accepted / refused (with reasons) / idle.

    ``reference``: name -> shape of the global model (None: names and shapes are not checked).
    With ``enabled`` False only idle updates are set aside (nothing is refused).
    """
    out = Screening(accepted=[])
    candidates = []
    for u in updates:
        if not u.params or not (u.steps > 0):
            out.idle.append(u.site)
            continue
        if not enabled:  # nothing is refused; the norm is still recorded (what an unguarded server took in)
            out.norms[u.site] = update_norm(u.params) if not _non_finite(u.params) else float("nan")
            candidates.append(u)
            continue
        bad = _non_finite(u.params)
        if bad:
            out.refused[u.site] = f"non-finite values (NaN/Inf) in {len(bad)} arrays, e.g. {bad[0]}"
            continue
        if reference is not None:
            unknown = sorted(set(u.params) - set(reference))
            if unknown:
                out.refused[u.site] = (f"{len(unknown)} parameter names the global model does not have, "
                                       f"e.g. {unknown[0]}")
                continue
            wrong = [k for k, v in u.params.items() if tuple(np.shape(v)) != tuple(reference[k])]
            if wrong:
                k = wrong[0]
                out.refused[u.site] = (f"{len(wrong)} arrays shaped unlike the global model, e.g. {k}: "
                                       f"{tuple(np.shape(u.params[k]))} instead of {tuple(reference[k])}")
                continue
        out.norms[u.site] = update_norm(u.params)
        candidates.append(u)
    if enabled:
        scored = [u for u in candidates if out.norms.get(u.site, 0) > 0]
        if len(scored) >= MIN_SITES_FOR_NORM:
            logs = np.array([math.log(out.norms[u.site]) for u in scored])
            med = float(np.median(logs))
            mad = max(float(np.median(np.abs(logs - med))), MAD_FLOOR)
            median_norm = math.exp(med)
            for u, x in zip(scored, logs):
                z = 0.6745 * abs(x - med) / mad
                out.z[u.site] = z
                if z > guard_z:
                    ratio = out.norms[u.site] / median_norm
                    out.refused[u.site] = (f"update norm {out.norms[u.site]:.4g} is {ratio:.3g}x the round's median "
                                           f"{median_norm:.4g} (robust z {z:.1f} > guard_z {guard_z:g})")
    out.accepted = [u for u in candidates if u.site not in out.refused]
    return out


# ---------------------------------------------------------------------------------- combining
def _by_name(updates: list[Update]) -> dict[str, list[tuple[Update, np.ndarray]]]:
    names: dict[str, list] = {}
    for u in updates:
        for k, v in u.params.items():
            names.setdefault(k, []).append((u, np.asarray(v)))
    return names


def _out_dtype(a: np.ndarray):
    return a.dtype if a.dtype.kind == "f" else np.float32


def weighted_mean(updates: list[Update]) -> dict:
    out = {}
    for k, items in _by_name(updates).items():
        w = np.array([u.steps for u, _ in items], dtype=np.float64)
        stack = np.stack([a.astype(np.float64) for _, a in items])
        out[k] = (np.tensordot(w, stack, axes=1) / w.sum()).astype(_out_dtype(items[0][1]))
    return out


def coordinate_median(updates: list[Update]) -> dict:
    return {k: np.median(np.stack([a.astype(np.float64) for _, a in items]), axis=0).astype(_out_dtype(items[0][1]))
            for k, items in _by_name(updates).items()}


def trim_count(n: int, fraction: float) -> int:
    """Values cut at each end of a coordinate: ceil(fraction * n), at most (n - 1) // 2."""
    return min(math.ceil(fraction * n - 1e-9), (n - 1) // 2) if fraction > 0 else 0


def trimmed_mean(updates: list[Update], fraction: float) -> dict:
    out = {}
    for k, items in _by_name(updates).items():
        stack = np.sort(np.stack([a.astype(np.float64) for _, a in items]), axis=0)
        cut = trim_count(len(items), fraction)
        out[k] = stack[cut:len(items) - cut].mean(axis=0).astype(_out_dtype(items[0][1]))
    return out


def krum_select(updates: list[Update], byzantine: int) -> tuple[list[Update], dict[str, float]]:
    """Multi-Krum: the n - f updates with the lowest scores (and every update's score)."""
    n = len(updates)
    if n <= 2:
        return list(updates), {}
    f = min(max(byzantine, 0), n - 1)
    common = sorted(set.intersection(*(set(u.params) for u in updates)))
    flat = np.stack([np.concatenate([np.asarray(u.params[k], dtype=np.float64).ravel() for k in common])
                     if common else np.zeros(1) for u in updates])
    sq = np.sum(flat ** 2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)
    m = max(1, n - f - 2)
    scores = {}
    for i, u in enumerate(updates):
        others = np.sort(np.delete(dist[i], i))
        scores[u.site] = float(others[:m].sum())
    keep = sorted(updates, key=lambda u: scores[u.site])[:max(1, n - f)]
    return keep, scores


def combine(updates: list[Update], method: str, *, trim_fraction: float = 0.2, krum_byzantine: int = 1
            ) -> tuple[dict, dict]:
    """The round's aggregated weight difference, and what the method decided (e.g. Krum's picks)."""
    if not updates:
        return {}, {}
    if method == "fedavg":
        return weighted_mean(updates), {}
    if method == "median":
        return coordinate_median(updates), {}
    if method == "trimmed_mean":
        n = len(updates)
        return trimmed_mean(updates, trim_fraction), {"trimmed_per_end": trim_count(n, trim_fraction)}
    if method == "krum":
        keep, scores = krum_select(updates, krum_byzantine)
        return weighted_mean(keep), {"krum_selected": sorted(u.site for u in keep),
                                     "krum_scores": {s: round(v, 6) for s, v in scores.items()}}
    raise ValueError(f"unknown aggregation {method!r}")
