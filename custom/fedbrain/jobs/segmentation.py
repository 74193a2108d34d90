"""The segmentation job: FedAvg over hospitals training a MONAI UNet (or SegResNet) on
BraTS-style MRI, every setting from :class:`~fedbrain.tasks.segmentation.SegmentationConfig`."""

from __future__ import annotations

from pathlib import Path

from fedbrain.jobs import bind_start, build_task_recipe, export_recipe, job_main
from fedbrain.tasks.segmentation import SegmentationConfig, SegmentationTrainer

SITE_SCRIPT = "segment_client.py"


def build_recipe(config: SegmentationConfig | None = None):
    return build_task_recipe(config or SegmentationConfig(), site_script=SITE_SCRIPT,
                             key_metric=SegmentationTrainer.key_metric)


def export(config: SegmentationConfig | None = None, export_dir: str | Path = ".", sites=None) -> Path:
    """The job folder; one app for every participant, or, carrying a start model, a server app of its own
    and one app for ``sites`` (the start goes to the server only)."""
    config, start = bind_start(config or SegmentationConfig())
    return export_recipe(build_recipe(config), export_dir, config.name, start, sites)


def main(argv=None, default_export_dir: str | Path = ".") -> Path:
    return job_main(SegmentationConfig, export, __doc__, argv, default_export_dir)
