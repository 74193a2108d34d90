"""fedbrain site script for the dual-stream MRI+CT grade classifier (FLARE Client API).

Glue only: receive the global trunks and fusion -> put this hospital's own head on them ->
validate -> train local epochs -> keep the head on disk -> send the weight difference.
With --personal the head never leaves the site: the job's per-site ExcludeVars filter removes
it from the update, and it lives in <site workspace>/personal/<store>/head.pt across rounds and
job restarts.
"""

import argparse
import copy
import logging
import math
import time

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.client.tracking import SummaryWriter

from fedbrain.site import load_site_cases
from fedbrain.training.classify import ClassificationConfig, ClassificationTrainer
from fedbrain.training.fl import SharedScaffold, state_dict_from_params, weight_diff
from fedbrain.training.personal import PersonalHeadStore

log = logging.getLogger("fedbrain")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--datalist", default=None, help="site datalist; default: the site's own settings")
    p.add_argument("--fusion", default="masked_mean", choices=["late", "masked_mean", "attention"])
    p.add_argument("--modality_dropout", type=float, default=0.3)
    p.add_argument("--local_epochs", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--fedprox_mu", type=float, default=0.0)
    p.add_argument("--personal", action="store_true", help="keep the classifier head at this site")
    p.add_argument("--scaffold", action="store_true", help="SCAFFOLD control variates (job built by ScaffoldRecipe)")
    p.add_argument("--store", default="fedbrain_classification", help="name of this site's personal-head store")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    flare.init()
    site = flare.get_site_name()
    settings, cases, site_error = load_site_cases(site, args.datalist)
    config = ClassificationConfig(
        fusion=args.fusion, modality_dropout=args.modality_dropout, batch_size=args.batch_size, lr=args.lr,
        fedprox_mu=args.fedprox_mu, epochs_per_round=args.local_epochs, max_steps=args.max_steps or None,
        seed=args.seed, num_threads=settings.num_threads, device=settings.device,
    )
    trainer = ClassificationTrainer(cases["training"], cases["validation"], config)
    model = trainer.build_model().to(trainer.device)
    heads = PersonalHeadStore.for_site(args.store) if args.personal else None
    # With a personal head its controls would leak its update: control only what is shared.
    scaffold = SharedScaffold(model, args.lr, exclude=("head",) if args.personal else ()) if args.scaffold else None
    writer = SummaryWriter()
    summary = {k: v for k, v in trainer.data_summary().items() if isinstance(v, (int, float))}
    summary["site_error"] = int(bool(site_error))
    log.info("site %s: %s; personal head: %s", site, summary, heads.path if heads else "no (shared)")

    first_round = None
    while flare.is_running():
        global_model = flare.receive()
        round_no = global_model.current_round or 0
        first_round = round_no if first_round is None else first_round
        model.load_state_dict(state_dict_from_params(global_model.params, model), strict=True)
        if heads is not None:
            origin = heads.load_into(model)  # this hospital's head, not the server's copy
            if origin and round_no == first_round:
                log.info("site %s: personal head loaded from %s (saved by job %s, round %s)",
                         site, heads.path, origin.get("job_id"), origin.get("round_no"))
            elif round_no == first_round:
                log.info("site %s: no personal head at %s yet; starting from the global initial head", site, heads.path)
        started = time.time()
        metrics = {k: v for k, v in trainer.validate(model).items() if not math.isnan(v)}
        metrics.update({k: float(v) for k, v in summary.items()})
        if flare.is_evaluate():
            flare.send(FLModel(metrics=metrics))
            continue

        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        global_params = {k: v.to(trainer.device) for k, v in before.items()}
        meta = {}
        if scaffold is not None:
            global_copy = copy.deepcopy(model)
            scaffold.begin_round(global_model.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL))
        on_step = scaffold.after_step if scaffold is not None else None
        stats = trainer.train(model, global_params=global_params, on_step=on_step) if summary["n_train"] else {"steps": 0}
        if scaffold is not None:
            meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = scaffold.end_round(global_copy)
        if heads is not None:
            heads.save_from(model, job_id=flare.get_job_id(), round_no=round_no)
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
                meta={"NUM_STEPS_CURRENT_ROUND": stats["steps"], **meta},
            )
        )


if __name__ == "__main__":
    main()
