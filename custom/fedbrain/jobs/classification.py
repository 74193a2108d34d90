"""The classification job: the dual-stream MRI+CT grade classifier (healthy / LGG / HGG),
every setting from :class:`~fedbrain.tasks.classification.ClassificationConfig`.

Algorithms: ``personal`` (trunks + fusion federated; each hospital's head stays on site,
removed from every update by a per-site ExcludeVars filter), ``fedavg`` (everything shared),
``fedprox`` (personal heads + a proximal term on the shared part), ``scaffold`` (personal
heads + SCAFFOLD control variates on the shared part: FLARE's ScaffoldRecipe), ``mixed`` (personal
heads that correct a federated ``shared_head``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedbrain.jobs import DEFAULT_SITES, bind_start, build_task_recipe, export_recipe, job_main
from fedbrain.models.classifier import head_parameter_names
from fedbrain.tasks.classification import ClassificationConfig, ClassificationTrainer

SITE_SCRIPT = "classify_client.py"


def build_recipe(config: ClassificationConfig | None = None, sites: Sequence[str] = DEFAULT_SITES):
    config = config or ClassificationConfig()
    head = head_parameter_names(config.build_model()) if config.personal else []
    return build_task_recipe(config, site_script=SITE_SCRIPT, key_metric=ClassificationTrainer.key_metric, personal_names=head,
                             sites=list(sites))


def export(config: ClassificationConfig | None = None, export_dir: str | Path = ".",
           sites: Sequence[str] = DEFAULT_SITES) -> Path:
    config, start = bind_start(config or ClassificationConfig())
    return export_recipe(build_recipe(config, sites), export_dir, config.name, start, sites)


def export_notes(config: ClassificationConfig) -> list[str]:
    """What an admin exporting this job should know before submitting it (printed by ``fedbrain job export-classify``)."""
    if config.algorithm != "fedavg":
        return []
    return ["note: every privacy scope `fedbrain provision` writes removes `head.*` from what a site sends, so under "
            "--algorithm fedavg the grade head never reaches the server: each such site keeps and trains its own head "
            "(as under personal) and says so in the report; --algorithm mixed federates a shared head (`shared_head.*`) "
            "beside each site's own"]


def main(argv=None, default_export_dir: str | Path = ".") -> Path:
    return job_main(ClassificationConfig, export, __doc__, argv, default_export_dir)
