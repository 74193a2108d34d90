"""fedbrain site script for brain-tumour segmentation (FLARE Client API): the one site loop
with the segmentation task. Settings arrive whole as ``--config`` (written by the job)."""

from fedbrain.fl.site_loop import run_site
from fedbrain.tasks.segmentation import SegmentationConfig, SegmentationTrainer

if __name__ == "__main__":
    run_site(SegmentationConfig, SegmentationTrainer)
