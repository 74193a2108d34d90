"""Load cases once, skip and record the bad ones, replay only the random tail per epoch.

Why not MONAI ``CacheDataset`` as is: a single truncated or missing NIfTI there aborts
the whole site. Real hospital exports contain such cases, and a federated site that
crashes takes its data out of the round. Here each case runs the deterministic prefix
of the transform inside its own try/except; failures become :class:`SkippedCase`
records (logged at WARNING on the ``fedbrain`` logger) that the caller can report.
Which cases are bad is decided by :func:`fedbrain.data.validate.case_problems`, the
validator ``fedbrain data check`` runs, so the check's verdict is what training does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
from monai.transforms import Compose, Transform
from monai.transforms.transform import RandomizableTrait, apply_transform
from torch.utils.data import Dataset

from fedbrain.contracts import CT_SERIES_KEY, LABEL_CONVENTION_KEY, MRI_CONTRAST_LABELS, case_id_of
from fedbrain.data.validate import case_problems, label_convention_of

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


def require_usable(case: dict, *, ct: bool = True) -> None:
    """The one validator ``fedbrain data check`` runs: a case it reports is skipped here, with
    the same reasons, and a case it passes is loaded. ``ct=False``: a job that does not read CT
    neither reads nor judges the case's CT (a broken CT does not cost an MRI-only job the case)."""
    problems = case_problems(case, ct=ct)
    if problems:
        raise CaseError("; ".join(problems))


def _check_item(item: dict, case: dict, channels: int = N_MODALITIES) -> None:
    """The transforms' output has the shapes the network expects (a guard on our own chain); a CT
    not yet appended to the image (the random tail does that) counts with its channels."""
    image, label = item["image"], item["label"]
    found = image.shape[0] + (item["ct"].shape[0] if "ct" in item else 0)
    if found != channels or label.shape[0] != 3 or image.shape[1:] != label.shape[1:]:
        raise CaseError(f"unexpected shapes image {tuple(image.shape)} label {tuple(label.shape)} ({case['image'][0]})")


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


#: Channels the dual-stream chain appends to the MRI (the two CT windows of fedbrain.data.multimodal).
CT_CHANNELS = 2


def _prepare_segmentation_case(case: dict, head: Compose, *, ct: bool = False) -> dict:
    require_usable(case, ct=ct)  # with ct: also the case's CT (series, coverage of the MRI brain) when it has one
    data = {"image": list(case["image"]), "label": case["label"], LABEL_CONVENTION_KEY: label_convention_of(case)}
    if ct:
        data.update({"ct": os.fspath(case["ct"]) if case.get("ct") else None, CT_SERIES_KEY: case.get(CT_SERIES_KEY)})
    item = apply_transform(head, data)
    _check_item(item, case, N_MODALITIES + (CT_CHANNELS if ct else 0))
    return {k: item[k] for k in ("image", "label", "ct") if k in item}


def load_cases(
    cases: Sequence[dict], transform: Compose, *, ct: bool = False, progress: bool = False
) -> tuple[CaseDataset, list[SkippedCase]]:
    """Segmentation cases through :func:`load_with_skips`.

    Only ``image``, ``label`` and ``case_id`` are kept, so optional datalist keys
    (``ct``, ``grade``) present on some cases only cannot break batch collation. With ``ct``
    (a transform built with ``ct=True``) each case's CT, if it has one, is read into the image's
    last two channels.
    """
    from functools import partial

    return load_with_skips(cases, transform, partial(_prepare_segmentation_case, ct=ct), progress=progress)
