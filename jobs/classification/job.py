"""fedbrain classification job: dual-stream MRI+CT grade classifier (healthy / LGG / HGG).

    python jobs/classification/job.py                          # re-export jobs/classification/fedbrain_classification
    python jobs/classification/job.py --algorithm fedavg       # shared head baseline
    python jobs/classification/job.py --algorithm fedprox --mu 0.01
    python jobs/classification/job.py --algorithm scaffold

Algorithms: `personal` (default: trunks + fusion are federated, each hospital's head stays on site,
removed from every update by a per-site ExcludeVars filter), `fedavg` (everything shared),
`fedprox` (personal heads + a proximal term on the shared part), `scaffold` (personal heads +
SCAFFOLD control variates on the shared part, FLARE's ScaffoldRecipe and PTScaffoldHelper).
"""

import argparse
import contextlib
from pathlib import Path

from nvflare.app_common.filters.exclude_vars import ExcludeVars
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.app_opt.pt.recipes.scaffold import ScaffoldRecipe
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.recipe.utils import add_experiment_tracking, add_final_global_evaluation, set_per_site_config

from fedbrain.filters.audit import ReceivedUpdateAudit
from fedbrain.models.classifier import build_classifier, head_parameter_names, model_spec

HERE = Path(__file__).resolve().parent
APPS_DIR = HERE.parents[1] / "apps"
SITE_SCRIPT = "classify_client.py"
JOB_NAME = "fedbrain_classification"
SITES = ["hospital-a", "hospital-b", "hospital-c"]
ALGORITHMS = ("personal", "fedavg", "fedprox", "scaffold")


def build_recipe(
    *,
    algorithm: str = "personal",
    mu: float = 0.01,
    rounds: int = 8,
    sites: list[str] = SITES,
    local_epochs: int = 2,
    max_steps: int = 0,
    fusion: str = "masked_mean",
    modality_dropout: float = 0.3,
    lr: float = 3e-4,
    seed: int = 0,
    name: str = JOB_NAME,
) -> FedAvgRecipe | ScaffoldRecipe:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}")
    personal = algorithm != "fedavg"
    spec = model_spec(fusion=fusion, modality_dropout=modality_dropout, init_seed=seed)  # same start every run
    train_args = (
        f"--fusion {fusion} --modality_dropout {modality_dropout} --local_epochs {local_epochs} "
        f"--max_steps {max_steps} --lr {lr} --fedprox_mu {mu if algorithm == 'fedprox' else 0.0} --store {name} --seed {seed}"
        + (" --personal" if personal else "") + (" --scaffold" if algorithm == "scaffold" else "")
    )
    common = dict(name=name, model=spec, min_clients=len(sites), num_rounds=rounds, train_script=SITE_SCRIPT,
                  train_args=train_args, server_expected_format=ExchangeFormat.PYTORCH,
                  params_transfer_type=TransferType.DIFF)
    if algorithm == "scaffold":
        # ScaffoldRecipe has one client app for all sites (no per-site config); it keeps the last model.
        recipe = ScaffoldRecipe(**common)
        per_site = [None]
    else:
        recipe = FedAvgRecipe(**common, key_metric="val_bacc", key_metric_mode="max")
        set_per_site_config(recipe, {site: {} for site in sites})  # one app per hospital: per-site filters
        per_site = [[site] for site in sites]
    if personal:
        head = head_parameter_names(build_classifier(**{k: v for k, v in spec["args"].items()}))
        for clients in per_site:
            recipe.add_client_output_filter(ExcludeVars(exclude_vars=head), tasks=["train"], clients=clients)
    recipe.add_server_input_filter(ReceivedUpdateAudit(), tasks=["train"])  # what actually arrived
    add_experiment_tracking(recipe, "tensorboard")
    if algorithm != "scaffold":  # ScaffoldRecipe exposes no persistor id to evaluate: the report
        add_final_global_evaluation(recipe)  # then uses the last round. Final trunk + each site's own head.
    return recipe


def export(export_dir: str | Path = HERE, **settings) -> Path:
    export_dir = Path(export_dir).resolve()
    with contextlib.chdir(APPS_DIR):
        build_recipe(**settings).export(str(export_dir))
    return export_dir / settings.get("name", JOB_NAME)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export_dir", default=str(HERE))
    p.add_argument("--algorithm", default="personal", choices=ALGORITHMS)
    p.add_argument("--mu", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local_epochs", type=int, default=2)
    p.add_argument("--fusion", default="masked_mean", choices=["late", "masked_mean", "attention"])
    p.add_argument("--sites", nargs="+", default=SITES)
    p.add_argument("--seed", type=int, default=0, help="initial weights (init_seed) and site-side shuffling")
    a = p.parse_args(argv)
    print(export(a.export_dir, algorithm=a.algorithm, mu=a.mu, rounds=a.rounds, local_epochs=a.local_epochs,
                 fusion=a.fusion, sites=a.sites, seed=a.seed))


if __name__ == "__main__":
    main()
