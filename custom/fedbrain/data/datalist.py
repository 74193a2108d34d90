"""Loading and validating a site's datalist (format: docs/CONTRACTS.md).

A malformed datalist should fail at load time with the file and item index in
the message, not three hours into a federated run when a DataLoader worker
trips over ``item["label"]``. Paths come back absolute so that every consumer
(training, checks, reports) agrees on what a case is, whatever the cwd.

Why not ``monai.data.load_decathlon_datalist``: it treats every key other than
``image``/``label`` as a path *if such a path happens to exist* relative to the
base dir, so a missing ``ct`` folder would stay relative (and a ``grade`` of
``"HGG"`` would turn into a path if a file of that name existed). We need the
opposite: every declared path resolved, so that a missing one can be reported.
The resolution rule is the same (``root / relative``; absolute paths kept).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedbrain.contracts import (
    CT_SERIES_KEY,
    DEFAULT_LABEL_CONVENTION,
    GRADES,
    LABEL_CONVENTION_KEY,
    LABEL_CONVENTIONS,
    MRI_CONTRAST_LABELS,
    SECTIONS,
    case_id_of,
)

__all__ = [
    "DatalistError",
    "GRADES",
    "MODALITIES",
    "SECTIONS",
    "load_datalist",
]

#: BraTS channel order of ``image`` (as named in messages).
MODALITIES = MRI_CONTRAST_LABELS


class DatalistError(ValueError):
    """The datalist file itself is unusable (as opposed to a bad case on disk)."""


def _resolve(root: Path, value: str) -> str:
    """Absolute, normalised path; relative paths are taken from the data root."""
    return os.path.normpath(os.path.join(root, os.path.expanduser(value)))


def _is_path_string(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _label_convention(value, where: str) -> str:
    if value not in LABEL_CONVENTIONS:
        raise DatalistError(f"{where}: {LABEL_CONVENTION_KEY} {value!r} is not one of {', '.join(LABEL_CONVENTIONS)} "
                            "(BraTS 2018-2021 labels 0/1/2/4, BraTS 2023 labels 0/1/2/3)")
    return value


def _parse_item(item, where: str, root: Path, convention: str = DEFAULT_LABEL_CONVENTION) -> dict:
    """Validate one item and return a copy with absolute paths, a case_id and its label convention
    (the item's own, else the datalist's)."""
    if not isinstance(item, dict):
        raise DatalistError(f"{where}: item must be an object, got {type(item).__name__}")
    images = item.get("image")
    if not isinstance(images, list) or len(images) != len(MODALITIES):
        got = f"{len(images)} entries" if isinstance(images, list) else repr(images)
        raise DatalistError(
            f"{where}: 'image' must list exactly {len(MODALITIES)} files "
            f"({', '.join(MODALITIES)}), got {got}"
        )
    for n, image in enumerate(images):
        if not _is_path_string(image):
            raise DatalistError(f"{where}: image[{n}] ({MODALITIES[n]}) must be a path string, got {image!r}")
    label = item.get("label")
    if not _is_path_string(label):
        raise DatalistError(f"{where}: 'label' is missing or not a path string (got {label!r})")

    parsed = dict(item)
    parsed["image"] = [_resolve(root, image) for image in images]
    for n, path in enumerate(parsed["image"]):
        first = parsed["image"].index(path)
        if first != n:  # one file cannot be two contrasts: a copy-paste slip, or a missing contrast papered over
            raise DatalistError(f"{where}: the same file is listed as {MODALITIES[first]} and {MODALITIES[n]}: {path}")
    parsed["label"] = _resolve(root, label)

    if "ct" in item and item["ct"] is not None:
        if not _is_path_string(item["ct"]):
            raise DatalistError(f"{where}: 'ct' must be a folder path string, got {item['ct']!r}")
        parsed["ct"] = _resolve(root, item["ct"])
    else:
        parsed.pop("ct", None)
    if item.get(CT_SERIES_KEY) is not None:
        if not _is_path_string(item[CT_SERIES_KEY]) or "ct" not in parsed:
            raise DatalistError(f"{where}: {CT_SERIES_KEY} must be a SeriesInstanceUID string next to a 'ct' folder, "
                                f"got {item[CT_SERIES_KEY]!r}")
        parsed[CT_SERIES_KEY] = item[CT_SERIES_KEY].strip()
    else:
        parsed.pop(CT_SERIES_KEY, None)
    parsed[LABEL_CONVENTION_KEY] = _label_convention(item.get(LABEL_CONVENTION_KEY) or convention, where)

    if "grade" in item and item["grade"] is not None:
        if item["grade"] not in GRADES:
            raise DatalistError(f"{where}: grade {item['grade']!r} is not one of {', '.join(GRADES)}")
    else:
        parsed.pop("grade", None)

    case_id = item.get("case_id")
    if case_id is None:
        case_id = case_id_of(parsed)
    if not _is_path_string(case_id):
        raise DatalistError(f"{where}: case_id must be a non-empty string, got {case_id!r}")
    parsed["case_id"] = case_id
    return parsed


def load_datalist(path, root=None, sections=SECTIONS) -> dict[str, list[dict]]:
    """Read a datalist and return ``{section: [item, ...]}`` for ``sections``.

    Every item has absolute ``image`` (4 paths, BraTS order), ``label``,
    optional ``ct`` (and ``ct_series_uid`` picking one series in it), a
    ``case_id`` (default: the label's folder name), a validated optional
    ``grade`` and its ``label_convention`` (the item's, else the datalist's
    top-level one, else ``brats2021``). Files are not opened here (that is
    ``fedbrain.data.check``'s job), so loading stays cheap.

    A missing section is an empty list, but a datalist with no case in any
    requested section is refused, as are malformed JSON, malformed items and
    a case_id used twice (a case in both training and validation leaks).
    """
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"{path}: datalist file not found")
    root = Path(root) if root is not None else path.parent
    root = Path(os.path.abspath(os.path.expanduser(root)))
    try:
        # utf-8-sig: a datalist saved by Windows Notepad starts with a byte-order mark
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DatalistError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatalistError(f"{path}: cannot read datalist: {exc}") from exc
    if not isinstance(raw, dict):
        raise DatalistError(f"{path}: top level must be a JSON object with sections, got {type(raw).__name__}")

    convention = _label_convention(raw.get(LABEL_CONVENTION_KEY) or DEFAULT_LABEL_CONVENTION, str(path))
    result: dict[str, list[dict]] = {}
    seen: dict[str, str] = {}
    for section in sections:
        items = raw.get(section, [])
        if items is None:
            items = []
        if not isinstance(items, list):
            raise DatalistError(f"{path}: section {section!r} must be a list, got {type(items).__name__}")
        parsed_items = []
        for index, item in enumerate(items):
            where = f"{path}: {section}[{index}]"
            parsed = _parse_item(item, where, root, convention)
            previous = seen.get(parsed["case_id"])
            if previous is not None:
                derived = "" if item.get("case_id") else (
                    f" (no case_id given: derived from the label's folder {Path(parsed['label']).parent.name!r};"
                    " give each case its own case_id)")
                raise DatalistError(f"{where}: case_id {parsed['case_id']!r} already used by {previous}{derived}")
            seen[parsed["case_id"]] = f"{section}[{index}]"
            parsed_items.append(parsed)
        result[section] = parsed_items

    if not any(result.values()):
        raise DatalistError(f"{path}: no cases in sections {', '.join(sections)}")
    return result
