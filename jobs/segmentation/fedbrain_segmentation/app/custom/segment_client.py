"""fedbrain site script for brain-tumour segmentation (FLARE Client API).

Glue only: receive the global model -> validate it on this site's validation cases ->
train local epochs -> send the weight difference and the number of steps. Data, model and the
training loop live in the fedbrain library, so the same code runs centralized.
"""

import argparse
import logging
import math
import time

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.client.tracking import SummaryWriter

from fedbrain.site import load_site_cases
from fedbrain.training.segment import SegmentationConfig, SegmentationTrainer
from fedbrain.training.fl import weight_diff, state_dict_from_params

log = logging.getLogger("fedbrain")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--datalist", default=None, help="site datalist; default: the site's own settings")
    p.add_argument("--arch", default="unet")
    p.add_argument("--init_filters", type=int, default=8)
    p.add_argument("--local_epochs", type=int, default=4)
    p.add_argument("--max_steps", type=int, default=0, help="cap on optimizer steps per round (0: no cap)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    flare.init()
    site = flare.get_site_name()
    settings, cases, site_error = load_site_cases(site, args.datalist)
    config = SegmentationConfig(
        arch=args.arch,
        init_filters=args.init_filters,
        batch_size=args.batch_size,
        lr=args.lr,
        roi_size=(args.roi,) * 3,
        spacing=(args.spacing,) * 3,
        seed=args.seed,
        epochs_per_round=args.local_epochs,
        max_steps=args.max_steps or None,
        num_threads=settings.num_threads,
        device=settings.device,
    )
    trainer = SegmentationTrainer(cases["training"], cases["validation"], config)
    model = trainer.build_model().to(trainer.device)
    writer = SummaryWriter()
    summary = trainer.data_summary()
    summary["site_error"] = int(bool(site_error))
    log.info("site %s: data from %s (%s): %s", site, settings.datalist, settings.source, summary)
    for case in trainer.skipped:
        log.warning("site %s: skipped case %s: %s", site, case.case_id, case.reason)

    while flare.is_running():
        global_model = flare.receive()
        round_no = global_model.current_round or 0
        model.load_state_dict(state_dict_from_params(global_model.params, model), strict=True)
        started = time.time()
        metrics = {k: v for k, v in trainer.validate(model).items() if not math.isnan(v)}  # no val case: no Dice
        metrics.update({k: float(v) for k, v in summary.items()})
        if flare.is_evaluate():
            flare.send(FLModel(metrics=metrics))
            continue

        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if summary["n_train"] > 0:
            stats = trainer.train(model)
        else:  # nothing usable here: contribute zero weight rather than take the federation down
            log.error("site %s: no usable training case (%d skipped); sending an empty update", site, summary["n_skipped"])
            stats = {"train_loss": float("nan"), "steps": 0}
        if stats["steps"]:
            metrics["train_loss"] = stats["train_loss"]
        metrics["train_steps"] = stats["steps"]
        metrics["round_seconds"] = time.time() - started
        for key, value in metrics.items():
            writer.add_scalar(key, value, round_no)
        flare.send(
            FLModel(
                params=weight_diff(model.state_dict(), before),
                params_type=ParamsType.DIFF,
                metrics=metrics,
                meta={"NUM_STEPS_CURRENT_ROUND": stats["steps"]},
            )
        )


if __name__ == "__main__":
    main()
