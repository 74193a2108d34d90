"""Load cases once, skip and record the bad ones, replay only the random tail per epoch.

Why not MONAI ``CacheDataset`` as is: a single truncated or missing NIfTI there aborts
the whole site. Real hospital exports contain such cases, and a federated site that
crashes takes its data out of the round. Here each case runs the deterministic prefix
of the transform inside its own try/except; failures become :class:`SkippedCase`
records (logged at WARNING on the ``fedbrain`` logger) that the caller can report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, Transform
from monai.transforms.transform import RandomizableTrait, apply_transform
from torch.utils.data import Dataset

from fedbrain.contracts import AFFINE_ATOL_MM, BRATS_LABELS, MRI_CONTRAST_LABELS, case_id_of

logger = logging.getLogger("fedbrain")

N_MODALITIES = len(MRI_CONTRAST_LABELS)


class CaseError(ValueError):
    """A case failed one of our own checks; the message already names the file."""


@dataclass(frozen=True)
class SkippedCase:
    """A case left out of training/validation, and why (the reason names the file)."""

    case_id: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class CaseDataset(Dataset):
    """Items already through the deterministic transforms; ``tail`` (random) runs per access.

    Each access deep-copies the cached item so random transforms never alter the cache.
    """

    def __init__(self, items: list[dict], case_ids: list[str], tail: Compose | None = None):
        self.items = items
        self.case_ids = case_ids
        self.transform = tail  # attribute name lets monai DataLoader seed the random transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if self.transform is None:
            return item
        return apply_transform(self.transform, deepcopy(item))


def split_transform(transform: Compose) -> tuple[Compose, Compose | None]:
    """Split at the first random (or non-MONAI) transform, as ``CacheDataset`` does."""
    flat = transform.flatten()
    first = flat.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    if first is None:
        return flat, None
    return Compose(flat.transforms[:first]), Compose(flat.transforms[first:])


def _files(case: dict) -> list[tuple[str, str]]:
    """(role, path) for every file of a case, in BraTS order then the label."""
    names = MRI_CONTRAST_LABELS
    images = case.get("image") or []
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    out = [(names[i] if i < len(names) else f"image[{i}]", os.fspath(p)) for i, p in enumerate(images)]
    if case.get("label") is not None:
        out.append(("label", os.fspath(case["label"])))
    return out


def _check_case(case: dict) -> None:
    """Cheap header-level checks that would otherwise fail late or silently.

    All five files must share one voxel grid (shape and affine), as BraTS ships them:
    a label on another grid would be cropped and padded out of register without error.
    """
    images = case.get("image")
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or len(images) != N_MODALITIES:
        raise CaseError(f"expected {N_MODALITIES} image files (T1, T1ce, T2, FLAIR), got {images!r}")
    if not case.get("label"):
        raise CaseError("no label file")
    ref = None
    for role, path in _files(case):
        if not os.path.isfile(path):
            raise CaseError(f"{role} file not found: {path}")
        try:
            header = nib.load(path)
        except Exception as exc:  # noqa: BLE001
            raise CaseError(f"{role} file unreadable: {path} ({type(exc).__name__}: {_first_line(exc)})") from exc
        if len(header.shape) != 3:
            raise CaseError(f"{role} file is not a 3D volume (shape {header.shape}): {path}")
        if ref is None:
            ref = (role, header.shape, header.affine)
        elif header.shape != ref[1] or not np.allclose(header.affine, ref[2], rtol=0, atol=AFFINE_ATOL_MM):
            raise CaseError(
                f"{role} file is not on the {ref[0]} voxel grid (shape {header.shape} vs {ref[1]}): {path}"
            )
        if role == "label":  # other values would silently become background in the TC/WT/ET channels
            bad = non_brats_label_values(header.dataobj)
            if bad.size:
                raise CaseError(label_values_problem(bad, path))


def non_brats_label_values(data) -> np.ndarray:
    """Distinct label values that are not BraTS 0/1/2/4 (fractions included): the one rule both
    ``fedbrain data check`` and loading for training apply."""
    values = np.unique(np.asarray(data))
    return values[~np.isin(values, BRATS_LABELS)]


def label_values_problem(bad: np.ndarray, name: str) -> str:
    shown = ", ".join(f"{v:g}" for v in bad[:8]) + (f", ... ({len(bad)} distinct)" if len(bad) > 8 else "")
    hint = " (BraTS 2023 writes enhancing tumour as 3: relabel 3 -> 4)" if 3 in bad else ""
    return f"label {name}: values outside {{0, 1, 2, 4}}: {shown}{hint}"


def _check_item(item: dict, case: dict) -> None:
    """Reject outputs that would poison training: empty brain, non-finite intensities."""
    image, label = item["image"], item["label"]
    files = dict(_files(case))
    if image.shape[0] != N_MODALITIES or label.shape[0] != 3 or image.shape[1:] != label.shape[1:]:
        raise CaseError(f"unexpected shapes image {tuple(image.shape)} label {tuple(label.shape)} ({files['T1']})")
    if not bool(image.any()):
        raise CaseError(f"no brain voxels: all four images are zero ({files['T1']} ...)")
    finite = torch.isfinite(torch.as_tensor(image)).flatten(1).all(1)
    if not bool(finite.all()):
        bad = [role for (role, _), ok in zip(_files(case), finite.tolist()) if not ok]
        raise CaseError(f"non-finite intensities in {', '.join(files[r] for r in bad)}")


def _root_cause(exc: BaseException) -> BaseException:
    """MONAI wraps errors in 'applying transform ...'; the useful message is the innermost."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _probe_files(case: dict) -> str | None:
    """Name the first missing or unreadable file, reading it fully (truncation shows only then)."""
    for role, path in _files(case):
        if not os.path.isfile(path):
            return f"{role} file not found: {path}"
        try:
            img = nib.load(path)
            np.asanyarray(img.dataobj)
        except Exception as exc:  # noqa: BLE001 - any reader error makes the file unusable
            return f"{role} file unreadable: {path} ({type(exc).__name__}: {_first_line(exc)})"
    return None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_failure(case: dict, exc: BaseException) -> str:
    """A one-line reason that names the offending file."""
    if isinstance(exc, CaseError):
        return str(exc)
    culprit = _probe_files(case)
    if culprit:
        return culprit
    root = _root_cause(exc)
    files = ", ".join(p for _, p in _files(case))
    return f"{type(root).__name__}: {_first_line(root)} (files: {files})"


def load_with_skips(
    cases: Sequence[dict],
    transform: Compose,
    prepare: Callable[[dict, Compose], dict],
    *,
    probe: Callable[[dict], dict] = lambda case: case,
    progress: bool = False,
) -> tuple[CaseDataset, list[SkippedCase]]:
    """Run ``prepare(case, head)`` once per case, where ``head`` is the deterministic part of
    ``transform``; a case that raises is skipped and recorded, never fatal.

    ``prepare`` returns the item to keep (the task decides which keys). ``probe(case)``
    picks the files :func:`describe_failure` checks to name the culprit. Returns
    ``(dataset, skipped)``; the dataset may be empty: the caller decides whether that is
    fatal (a site with no data should still answer the server).
    """
    head, tail = split_transform(transform)
    items, ids, skipped = [], [], []

    def one(index: int, case: dict) -> None:
        cid = case_id_of(case, index)
        try:
            item = prepare(case, head)
        except Exception as exc:  # noqa: BLE001 - a bad case must never stop the site
            reason = describe_failure(probe(case), exc)
            logger.warning("Skipping case %s: %s", cid, reason)
            logger.debug("Case %s failed with", cid, exc_info=exc)
            skipped.append(SkippedCase(cid, reason))
            return
        item["case_id"] = cid
        items.append(item)
        ids.append(cid)

    if progress and cases:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("Loading cases", total=len(cases))
            for i, case in enumerate(cases):
                one(i, case)
                bar.advance(task)
    else:
        for i, case in enumerate(cases):
            one(i, case)
    if cases:
        logger.info("Loaded %d of %d cases (%d skipped)", len(items), len(cases), len(skipped))
    return CaseDataset(items, ids, tail), skipped


def _prepare_segmentation_case(case: dict, head: Compose) -> dict:
    _check_case(case)
    item = apply_transform(head, {"image": list(case["image"]), "label": case["label"]})
    _check_item(item, case)
    return item


def load_cases(
    cases: Sequence[dict], transform: Compose, *, progress: bool = False
) -> tuple[CaseDataset, list[SkippedCase]]:
    """Segmentation cases through :func:`load_with_skips`.

    Only ``image``, ``label`` and ``case_id`` are kept, so optional datalist keys
    (``ct``, ``grade``) present on some cases only cannot break batch collation.
    """
    return load_with_skips(cases, transform, _prepare_segmentation_case, progress=progress)
