"""fedbrain segmentation job (FLARE Job Recipe API): exports the folder admins submit.

    python jobs/segmentation/job.py                       # re-export jobs/segmentation/fedbrain_segmentation
    python jobs/segmentation/job.py --rounds 10 --lr 0.005 --export_dir /tmp/jobs
    python jobs/segmentation/job.py --help                # every setting, with its default

The definition lives in the package (fedbrain.jobs.segmentation); every flag is a field of
SegmentationConfig, the one place each setting and its default are declared. The job names
components and settings only; sites decide where their data lives.
"""

from pathlib import Path

from fedbrain.jobs.segmentation import main

if __name__ == "__main__":
    main(default_export_dir=Path(__file__).resolve().parent)
