"""fedbrain classification job (FLARE Job Recipe API): exports the folder admins submit.

    python jobs/classification/job.py                          # re-export jobs/classification/fedbrain_classification
    python jobs/classification/job.py --algorithm fedavg       # shared head baseline
    python jobs/classification/job.py --algorithm fedprox --fedprox_mu 0.01
    python jobs/classification/job.py --algorithm scaffold
    python jobs/classification/job.py --help                   # every setting, with its default

The definition lives in the package (fedbrain.jobs.classification); every flag is a field of
ClassificationConfig, the one place each setting and its default are declared.
"""

from pathlib import Path

from fedbrain.jobs.classification import main

if __name__ == "__main__":
    main(default_export_dir=Path(__file__).resolve().parent)
