"""fedbrain site script for the dual-stream MRI+CT grade classifier (FLARE Client API): the
one site loop with the classification task. With a personal algorithm the head never leaves
the site: the job's per-site ExcludeVars filter removes it from every update, and it lives in
<site workspace>/personal/<job name>/head.pt (head_correction.pt under algorithm mixed) across rounds and jobs."""

from fedbrain.fl.site_loop import run_site
from fedbrain.tasks.classification import ClassificationConfig, ClassificationTrainer

if __name__ == "__main__":
    run_site(ClassificationConfig, ClassificationTrainer)
