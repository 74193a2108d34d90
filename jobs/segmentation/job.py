"""fedbrain segmentation job: FedAvg over hospitals training a MONAI UNet (or SegResNet) on BraTS-style MRI.

    python jobs/segmentation/job.py                 # re-export jobs/segmentation/fedbrain_segmentation
    python jobs/segmentation/job.py --rounds 10 --export_dir /tmp/jobs

The exported folder is what admins submit (`submit_job jobs/segmentation/fedbrain_segmentation`).
The job names components and settings only; sites decide where their data lives.
"""

import argparse
import contextlib
from pathlib import Path

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.recipe.utils import add_experiment_tracking, add_final_global_evaluation

from fedbrain.models.segmentation import model_spec

HERE = Path(__file__).resolve().parent
APPS_DIR = HERE.parents[1] / "apps"
SITE_SCRIPT = "segment_client.py"  # relative, so the job carries it in custom/ with no machine path
JOB_NAME = "fedbrain_segmentation"


def build_recipe(
    *,
    rounds: int = 6,
    min_clients: int = 3,
    local_epochs: int = 4,
    max_steps: int = 0,
    arch: str = "unet",
    init_filters: int = 8,
    batch_size: int = 2,
    lr: float = 1e-2,
    roi: int = 64,
    name: str = JOB_NAME,
) -> FedAvgRecipe:
    train_args = (
        f"--arch {arch} --init_filters {init_filters} --local_epochs {local_epochs} --max_steps {max_steps} "
        f"--batch_size {batch_size} --lr {lr} --roi {roi}"
    )
    recipe = FedAvgRecipe(
        name=name,
        model=model_spec(arch, init_filters=init_filters),
        min_clients=min_clients,
        num_rounds=rounds,
        train_script=SITE_SCRIPT,
        train_args=train_args,
        key_metric="val_dice",
        key_metric_mode="max",
        server_expected_format=ExchangeFormat.PYTORCH,
        params_transfer_type=TransferType.DIFF,
    )
    add_experiment_tracking(recipe, "tensorboard")  # site metrics stream to the server's tb_events/
    add_final_global_evaluation(recipe)  # the last global model, validated at every site
    return recipe


def export(export_dir: str | Path = HERE, **settings) -> Path:
    """Build and export the job folder; returns it. The site script is resolved from apps/."""
    export_dir = Path(export_dir).resolve()
    with contextlib.chdir(APPS_DIR):
        build_recipe(**settings).export(str(export_dir))
    return export_dir / settings.get("name", JOB_NAME)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export_dir", default=str(HERE))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--min_clients", type=int, default=3)
    p.add_argument("--local_epochs", type=int, default=4)
    p.add_argument("--max_steps", type=int, default=0)
    p.add_argument("--arch", default="unet", choices=["unet", "segresnet"])
    p.add_argument("--init_filters", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    a = p.parse_args(argv)
    folder = export(
        a.export_dir, rounds=a.rounds, min_clients=a.min_clients, local_epochs=a.local_epochs,
        max_steps=a.max_steps, arch=a.arch, init_filters=a.init_filters, lr=a.lr,
    )
    print(folder)


if __name__ == "__main__":
    main()
