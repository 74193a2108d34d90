"""The one site loop (FLARE Client API) both tasks' site scripts run:

receive the global model -> put this site's personal part back -> validate -> train ->
keep the personal part on disk -> send the weight difference, the step count and metrics.

The task config arrives whole (``--config``, one JSON argument written by job.py) and is
rebuilt exactly; the hospital's own local settings (data, threads, device) come from its
site workspace, never from the job. A site whose data cannot be read stays in the
federation with empty, zero-weight updates and says why (``site_error``); so does a site
whose privacy budget is spent or that requires DP of a job without it (``dp_withheld``,
:class:`fedbrain.privacy.budget.SitePrivacy`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import time

from fedbrain.contracts import (NUM_STEPS_META, ROUND_SECONDS, SITE_ERROR, SITE_NOTES_META, TRAIN_LOSS, TRAIN_STEPS,
                                TRAINED_SITES_META)
from fedbrain.fl.housekeeping import collect_round_garbage
from fedbrain.fl.timing import collect_exchange_times
from fedbrain.fl.exchange import SharedScaffold, state_dict_from_params, weight_diff
from fedbrain.fl.personal import PersonalHeadStore
from fedbrain.fl.site import kept_at_site, load_site_cases
from fedbrain.privacy.budget import SitePrivacy
from fedbrain.privacy.releases import job_refused

log = logging.getLogger("fedbrain")
#: A path, with spaces, up to the next colon or quote (over-redacting is the safe side).
PATH = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^:'\",;()\n]*[^\s:'\",;()\n])?")


def parse_site_args(config_cls, argv=None, ignored: list | None = None):
    """The task config from the site script's command line (what the job wrote).

    It is the only argument: a job cannot point a site at data, which the hospital alone
    configures (local/fedbrain_site.json, or the site's own environment). Any other argument is
    ignored, never used; ``ignored`` (a list) receives their names.
    """
    p = argparse.ArgumentParser(description="fedbrain site script (FLARE Client API)")
    p.add_argument("--config", required=True, help="the task config as JSON (written by job.py)")
    known, extra = p.parse_known_args(argv)
    if ignored is not None:
        ignored.extend(a for a in extra if a.startswith("-"))
    config = config_cls.from_json(known.config)
    if config.start_model is not None and not config.start_model.startswith("sha256:"):
        # A job names its start by hash (the server carries the file); a path would make the site open a file
        # the job chose. The site never loads a start: the server's first global model carries its weights.
        logging.getLogger("fedbrain").warning("the job names its start model by a path, not a hash: the site "
                                              "ignores it (a job never names a file at the site)")
        config = config.replace(start_model="sha256:" + "0" * 64)
    return config


def redact_paths(text: str) -> str:
    """``text`` with anything that looks like a file path replaced by ``<site path>``: what a site tells the
    admin about its own setup must not carry its folder layout."""
    return PATH.sub("<site path>", text)


def run_site(config_cls, trainer_cls, argv=None) -> None:
    """Run this site's part of a job until the server ends it."""
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.app_constant import AlgorithmConstants
    from nvflare.client.tracking import SummaryWriter

    ignored: list[str] = []
    config = parse_site_args(config_cls, argv, ignored)
    flare.init()
    site = flare.get_site_name()
    settings, cases, site_error = load_site_cases(site, task=config_cls.TASK)
    notes = []  # for the admin, without this site's paths
    if ignored:
        notes.append(f"ignored the job's arguments {', '.join(ignored)}: this site takes only --config and reads "
                     f"its data from its own settings")
        log.warning("site %s: %s", site, notes[-1])
    if site_error:
        notes.append(f"cannot use its data: {redact_paths(site_error)}")
    local = {k: v for k, v in (("num_threads", settings.num_threads), ("device", settings.device)) if v is not None}
    config = config.replace(**local)  # the hospital decides its compute
    trainer = trainer_cls(cases["training"], cases["validation"], config)
    model = trainer.build_model().to(trainer.device)
    personal = trainer.personal_parameter_names(model)
    kept = kept_at_site(settings.workspace)
    if not personal and kept:
        personal = [name for name in model.state_dict() if re.search(kept, name)]
        if personal:
            notes.append(f"kept {len(personal)} parameters ({', '.join(personal[:2])}, ...) at this site and trained "
                         f"them as its own: its privacy scope never sends them, so under algorithm {config.algorithm} "
                         f"the server's copy would stay untrained")
            log.warning("site %s: %s", site, notes[-1])
    privacy = SitePrivacy(trainer, settings, site)
    store = PersonalHeadStore.for_site(config.name, correction=config.shared_head) if personal else None
    # SCAFFOLD's control difference is the local update in disguise and rides in meta, which
    # ExcludeVars does not filter: control only the modules that are federated anyway.
    scaffold = None
    if config.algorithm == "scaffold":
        scaffold = SharedScaffold(model, config.lr, exclude=("head",) if personal else ())
    writer = SummaryWriter()
    summary = {k: float(v) for k, v in trainer.data_summary().items() if isinstance(v, (int, float))}
    summary[SITE_ERROR] = float(bool(site_error))
    log.info("site %s: data from %s (%s): %s; personal part: %s; privacy: %s", site, settings.datalist,
             settings.source, summary, store.path if store else "none", privacy.describe())
    for case in trainer.skipped:
        log.warning("site %s: skipped case %s: %s", site, case.case_id, case.reason)

    def shared(metrics: dict, round_no: int) -> dict:
        """What of this round's metrics leaves (the hospital's rules, local/fedbrain_site.json); the rest is logged here."""
        out = settings.budget.shared_metrics(metrics, n_val=int(summary["n_val"]), dp_sgd=config.dp)
        kept = {k: v for k, v in metrics.items() if k not in out}
        if kept:
            log.info("site %s round %s: kept at this site (not sent): %s", site, round_no, kept)
        return out

    first_round = None
    while flare.is_running():
        global_model = flare.receive()
        round_no = global_model.current_round or 0
        first_round = round_no if first_round is None else first_round
        model.load_state_dict(state_dict_from_params(global_model.params, model), strict=True)
        if store is not None:
            origin = store.load_into(model)  # this hospital's head, not the server's copy
            if round_no == first_round:
                log.info("site %s: personal head %s", site,
                         f"loaded from {store.path} (saved by job {origin.get('job_id')}, round {origin.get('round_no')})"
                         if origin else f"not at {store.path} yet; starting from the global initial head")
        started = time.time()
        metrics = {k: v for k, v in trainer.validate(model).items() if not math.isnan(v)}  # no val case: no metric
        metrics.update(summary)
        metrics.update(collect_exchange_times())  # e.g. decrypting what the server sent
        if flare.is_evaluate():
            flare.send(FLModel(metrics=shared(metrics, round_no)))
            continue

        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        hooks, meta = [], {}
        if scaffold is not None:
            global_copy = copy.deepcopy(model)
            scaffold.begin_round(global_model.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL))
            hooks.append(scaffold)
        withheld = privacy.withhold(global_model.meta.get(TRAINED_SITES_META) if global_model.meta else None)
        refused = job_refused(flare.get_job_id())  # the site's final check refused this job: no more training
        if summary["n_train"] > 0 and not withheld and not refused:
            stats = trainer.train(model, global_params=before, hooks=hooks)
        else:  # nothing usable or nothing more to release: contribute zero weight, the federation goes on
            if not withheld and not refused:
                log.error("site %s: no usable training case (%d skipped); sending an empty update",
                          site, summary["n_skipped"])
            stats = {TRAIN_LOSS: math.nan, "steps": 0}
        metrics.update(privacy.after_round(flare.get_job_id(), round_no, withheld))  # before anything leaves
        if scaffold is not None:
            meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = scaffold.end_round(global_copy)
        if store is not None:
            store.save_from(model, job_id=flare.get_job_id(), round_no=round_no)
        if stats["steps"]:
            metrics[TRAIN_LOSS] = stats[TRAIN_LOSS]
        metrics[TRAIN_STEPS] = stats["steps"]
        metrics[ROUND_SECONDS] = time.time() - started
        metrics = shared(metrics, round_no)
        for key, value in metrics.items():
            writer.add_scalar(key, value, round_no)
        if notes and settings.budget.share_metrics != "minimal":
            meta[SITE_NOTES_META] = list(notes)
        flare.send(FLModel(params=weight_diff(model.state_dict(), before), params_type=ParamsType.DIFF,
                           metrics=metrics, meta={NUM_STEPS_META: stats["steps"], **meta}))
        collect_round_garbage()  # fedbrain.fl.housekeeping: what this round left in cycles
