"""Non-IID partitions of a pooled cohort into sites, for controlled FL benchmarks.

The synthetic consortium already differs per site, but a benchmark needs a knob: how
non-IID? The standard one is Dirichlet label skew (Hsu et al. 2019): for every class,
the share of its cases going to each site is drawn from Dirichlet(alpha). Small alpha
(0.1) gives sites dominated by one grade; large alpha (100) approaches IID.

Datalists written here use **absolute paths**: the pooled cases come from several
source folders, and relative paths would have to climb out of the new site folder
(``../../hospital-a/cases/...``), which breaks as soon as either folder moves.
``fedbrain.data.datalist.load_datalist`` keeps absolute paths as they are.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedbrain.contracts import GRADES as CLASS_NAMES

__all__ = ["dirichlet_partition", "write_partitioned_datalists", "class_entropy"]


def dirichlet_partition(
    labels: Sequence[int],
    n_sites: int,
    alpha: float,
    seed: int,
    *,
    min_per_site: int = 4,
    min_per_class: int = 0,
    quantity_skew: bool = True,
) -> list[list[int]]:
    """Split indices ``0..len(labels)-1`` over ``n_sites`` with Dirichlet(alpha) label skew.

    * Per class, site shares ~ Dirichlet(alpha); with ``quantity_skew`` they are also
      weighted by a per-site size factor (log-normal, sigma 0.5), so sites differ in
      size as real hospitals do. Without it, a site that already holds its fair share
      (N / n_sites) receives no more cases (the NIID-Bench rule), giving near-equal sizes.
    * With ``min_per_class``, every site first holds at least that many cases of every class
      (taken from the site holding the most of it): skewed, but no hospital that sees only one
      grade. Such a site validates trivially (balanced accuracy over one class) and gives the
      shared layers nothing to tell grades apart by.
    * Every site then gets at least ``min_per_site`` cases: the smallest site takes a
      case from the largest, of the class the small site is most skewed towards (keeping
      the donor's per-class floor where it can), so the repair disturbs the label skew as
      little as possible.

    Same ``seed`` (and inputs) -> same partition. Each index appears exactly once;
    each site's list is sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n_sites < 1:
        raise ValueError("n_sites must be >= 1")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if n < n_sites * min_per_site:
        raise ValueError(f"{n} cases cannot give {n_sites} sites at least {min_per_site} each")
    short = {int(c): int(k) for c, k in zip(*np.unique(labels, return_counts=True)) if k < n_sites * min_per_class}
    if short:
        raise ValueError(f"min_per_class={min_per_class} needs {n_sites * min_per_class} cases of every class; "
                         f"class counts {short} are too few")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    # shares[c, s]: the fraction of class c that site s is meant to receive.
    shares = rng.dirichlet(np.full(n_sites, float(alpha)), size=len(classes))
    if quantity_skew:
        size = rng.lognormal(0.0, 0.5, n_sites)
        shares = shares * size
        shares /= shares.sum(1, keepdims=True)

    sites: list[list[int]] = [[] for _ in range(n_sites)]
    fair = n / n_sites
    for ci, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = shares[ci].copy()
        if not quantity_skew:
            full = np.array([len(s) >= fair for s in sites])
            if not full.all():
                p[full] = 0.0
            p = p / p.sum() if p.sum() > 0 else np.full(n_sites, 1.0 / n_sites)
        cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
        for s, part in enumerate(np.split(idx, cuts)):
            sites[s].extend(int(i) for i in part)

    # Repair: every site holds min_per_class of every class, taken from the site holding the most of it...
    for c in classes if min_per_class else ():
        while True:
            held = np.array([int((labels[s] == c).sum()) if s else 0 for s in sites])
            needy = int(np.argmin(held))
            if held[needy] >= min_per_class:
                break
            _move_one(sites, labels, c, int(np.argmax(held)), needy, rng)
    # ...then every site reaches min_per_site, taking from the currently largest site.
    class_pos = {c: i for i, c in enumerate(classes)}
    while True:
        sizes = np.array([len(s) for s in sites])
        small = int(np.argmin(sizes))
        if sizes[small] >= min_per_site:
            break
        donor = int(np.argmax(sizes))
        held = Counter(labels[i] for i in sites[donor])
        spare = {k: v for k, v in held.items() if v > min_per_class}  # keep the per-class floor where it can be
        held = spare or held
        # the donor's class that the small site is most skewed towards
        c = max(held, key=lambda k: (shares[class_pos[k], small], held[k]))
        _move_one(sites, labels, c, donor, small, rng)
    return [sorted(s) for s in sites]


def _move_one(sites: list[list[int]], labels: np.ndarray, c, donor: int, to: int, rng: np.random.Generator) -> None:
    """Move one randomly chosen case of class ``c`` from site ``donor`` to site ``to`` (the repairs' one step)."""
    candidates = [i for i in sites[donor] if labels[i] == c]
    pick = candidates[int(rng.integers(len(candidates)))]
    sites[donor].remove(pick)
    sites[to].append(pick)


def class_entropy(labels: Sequence[int], partition: Sequence[Sequence[int]]) -> float:
    """Mean over sites of the Shannon entropy (bits) of the site's class mix: low = skewed."""
    labels = np.asarray(labels)
    values = []
    for site in partition:
        if not len(site):
            continue
        counts = np.array(list(Counter(labels[list(site)].tolist()).values()), float)
        p = counts / counts.sum()
        values.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(values)) if values else float("nan")


def _stratified_validation(labels: list[int], val_fraction: float, rng: np.random.Generator) -> set[int]:
    """Positions (into ``labels``) for validation: per class round(f * n), at least one
    when the class has >= 2 cases (so it is also in training), none for a singleton."""
    val: set[int] = set()
    for c in sorted(set(labels)):
        pos = [i for i, lab in enumerate(labels) if lab == c]
        if len(pos) < 2:
            continue
        k = min(max(1, int(round(val_fraction * len(pos)))), len(pos) - 1)
        val.update(int(i) for i in rng.permutation(pos)[:k])
    if not val and len(labels) >= 2:  # only singletons: still validate on something
        val.add(int(rng.integers(len(labels))))
    return val


def _absolute(item: dict) -> dict:
    out = dict(item)
    out["image"] = [os.path.abspath(p) for p in item["image"]]
    for key in ("label", "ct"):
        if item.get(key):
            out[key] = os.path.abspath(item[key])
    return out


def write_partitioned_datalists(
    cases: Sequence[dict],
    out_dir,
    site_names: Sequence[str],
    alpha: float,
    seed: int,
    val_fraction: float = 0.25,
    *,
    min_per_site: int = 4,
    min_per_class: int = 0,
    quantity_skew: bool = True,
) -> dict[str, Path]:
    """Partition pooled datalist items by grade and write ``out_dir/<site>/datalist.json``.

    ``cases`` are datalist items (e.g. every section of every site of a synthetic
    consortium, as ``load_datalist`` returns them); each needs a ``grade``. Paths are
    written absolute (see the module docstring). Validation is stratified per site:
    every class the site holds with >= 2 cases appears in both training and
    validation. ``out_dir/partition.json`` records alpha, seed and the per-site counts.
    Returns ``{site: datalist path}``.
    """
    site_names = list(site_names)
    if len(set(site_names)) != len(site_names):
        raise ValueError(f"site names must be distinct: {site_names}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    missing = [c.get("case_id", i) for i, c in enumerate(cases) if c.get("grade") not in CLASS_NAMES]
    if missing:
        raise ValueError(f"cases without a valid grade cannot be label-partitioned: {missing}")
    ids = [c.get("case_id") for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("case_id values must be unique across the pooled cases")
    labels = [CLASS_NAMES.index(c["grade"]) for c in cases]
    parts = dirichlet_partition(labels, len(site_names), alpha, seed, min_per_site=min_per_site,
                                min_per_class=min_per_class, quantity_skew=quantity_skew)
    rng = np.random.default_rng([seed, 0x5A1])
    out = Path(out_dir)
    written: dict[str, Path] = {}
    summary = {"alpha": alpha, "seed": seed, "val_fraction": val_fraction, "quantity_skew": quantity_skew,
               "min_per_site": min_per_site, "min_per_class": min_per_class, "sites": {}}
    for name, part in zip(site_names, parts):
        site_labels = [labels[i] for i in part]
        val = _stratified_validation(site_labels, val_fraction, rng)
        training = [_absolute(cases[i]) for k, i in enumerate(part) if k not in val]
        validation = [_absolute(cases[i]) for k, i in enumerate(part) if k in val]
        counts = {g: site_labels.count(i) for i, g in enumerate(CLASS_NAMES)}
        datalist = {
            "site": name,
            "description": (f"Dirichlet(alpha={alpha}) label-skew partition, seed {seed}: "
                            + ", ".join(f"{g} {n}" for g, n in counts.items())),
            "training": training,
            "validation": validation,
        }
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "datalist.json"
        path.write_text(json.dumps(datalist, indent=2) + "\n")
        written[name] = path
        summary["sites"][name] = {"n_cases": len(part), "n_training": len(training),
                                  "n_validation": len(validation), "grade_counts": counts}
    summary["class_entropy_bits"] = round(class_entropy(labels, parts), 4)
    (out / "partition.json").write_text(json.dumps(summary, indent=2) + "\n")
    return written
