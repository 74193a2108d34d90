"""MONAI preprocessing for BraTS-style four-modality segmentation.

One definition is shared by the centralized baseline and every federated site, so
both see identical inputs. The chain is ordered so that everything up to the first
random transform is deterministic: `fedbrain.data.dataset.load_cases` runs that
prefix once per case (and catches bad cases there) and replays only the random
tail every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    MapTransform,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)

from fedbrain.contracts import DEFAULT_LABEL_CONVENTION, LABEL_CONVENTION_KEY, LABEL_CONVENTIONS, MRI_CONTRASTS

#: Order of the four MRI channels (BraTS order, see docs/CONTRACTS.md).
MODALITIES = MRI_CONTRASTS


KEYS = ("image", "label")


class ToBratsLabelsd(MapTransform):
    """Relabel a segmentation from the item's label convention (``label_convention``, default
    BraTS 2018-2021) to BraTS 2018-2021 values, whose 1/2/4 MONAI's region conversion reads:
    BraTS 2023's enhancing tumour 3 becomes 4. Values were validated before (data.validate).
    The convention key is removed: later MONAI transforms expect only arrays in the item."""

    def __call__(self, data):
        d = dict(data)
        source = LABEL_CONVENTIONS[d.pop(LABEL_CONVENTION_KEY, None) or DEFAULT_LABEL_CONVENTION]
        target = LABEL_CONVENTIONS[DEFAULT_LABEL_CONVENTION]
        if source != target:
            for key in self.key_iterator(d):
                label = d[key]
                out = label.clone() if hasattr(label, "clone") else label.copy()
                for old, new in zip(source, target):
                    if old != new:
                        out[label == old] = new
                d[key] = out
        return d


def _triple(value: float | Sequence[float], name: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * 3
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values (x, y, z), got {value!r}")
    return values


def segmentation_transforms(
    train: bool,
    *,
    spacing: float | Sequence[float] = (3.0, 3.0, 3.0),
    roi_size: int | Sequence[int] = (64, 64, 64),
    k_divisible: int = 16,
    ct: bool = False,
) -> Compose:
    """Dict transform for items ``{"image": [t1, t1ce, t2, flair], "label": seg}`` (plus the
    optional ``label_convention`` of the case's datalist; with ``ct`` also ``"ct"``: the CT series
    folder, or None for a case without CT).

    Output: ``image`` float32 (4, X, Y, Z) z-scored per channel inside the brain, and
    ``label`` float32 (3, X, Y, Z) holding TC / WT / ET.

    * ``train=True`` pads to ``roi_size`` and takes one random ``roi_size`` crop with
      light flips and intensity jitter, so batches have a fixed shape.
    * ``train=False`` keeps the whole (brain-cropped) volume and pads it to a multiple of
      ``k_divisible`` (16 suits both SegResNet and the 4-level UNet), so validation can
      run sliding-window or whole-volume inference.

    Resampling to a common ``spacing`` is what lets sites with different scanners share
    one model; cropping to the brain removes empty air so CPU time goes to tissue.

    With ``ct`` (dual-stream segmentation) the CT is put onto the MRI grid as two windowed
    channels masked to the brain (:func:`fedbrain.data.multimodal.ct_onto_mri`, the classifier's
    definition), follows every spatial step of the MRI, and is appended last: ``image`` then has
    6 channels (T1, T1ce, T2, FLAIR, CT brain window, CT calcification window), the CT ones all
    zero for a case without CT.
    """
    spacing = _triple(spacing, "spacing")
    roi_size = tuple(int(r) for r in _triple(roi_size, "roi_size"))
    keys = list(KEYS)
    spatial = keys + ["ct"] if ct else keys
    ct_steps = []
    if ct:
        from fedbrain.data.multimodal import ct_onto_mri

        ct_steps = ct_onto_mri("image")
    steps = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),  # the 4 image files are stacked as 4 channels
        ToBratsLabelsd(keys="label"),  # consumes the item's label_convention
        # labels=None: use the MetaTensor's own space (RAS for NIfTI), MONAI's new default.
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=spacing, mode=("bilinear", "nearest")),
        *ct_steps,
        # BraTS 1/2/4 -> TC (1|4), WT (1|2|4), ET (4); overlapping regions need sigmoid outputs.
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        # The brain is everything non-zero in any modality (images are skull-stripped).
        CropForegroundd(
            keys=spatial, source_key="image", allow_smaller=True, start_coord_key=None, end_coord_key=None
        ),
        # nonzero=True keeps the background at exactly 0 and out of the statistics.
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        EnsureTyped(keys=spatial, dtype=torch.float32, track_meta=True),
    ]
    if train:
        steps += [
            SpatialPadd(keys=spatial, spatial_size=roi_size),  # small brains still give a full roi
            RandSpatialCropd(keys=spatial, roi_size=roi_size, random_size=False),
            RandFlipd(keys=spatial, prob=0.5, spatial_axis=0),
            RandFlipd(keys=spatial, prob=0.5, spatial_axis=1),
            RandFlipd(keys=spatial, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),  # MRI only: CT is calibrated in HU
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    else:
        steps.append(DivisiblePadd(keys=spatial, k=k_divisible))
    if ct:
        steps += [ConcatItemsd(keys=["image", "ct"], name="image"), DeleteItemsd(keys="ct")]
    return Compose(steps)
