"""Job definitions (FLARE Job Recipe API), built from a task config and shipped in the package.

``build_recipe(config)`` is the one definition of a task's job: the server's initial model
is ``config.model_spec()``, and the whole config reaches every site as one JSON argument
of the site script (``--config``), which rebuilds it exactly. The site scripts live in
``fedbrain/jobs/sites/`` (package data). A job carries no code: each site runs the script
of the fedbrain it installed (:class:`fedbrain.fl.executor.InstalledScriptExecutor`), so the
exported job has no ``custom/`` folder and FLARE treats it as code-free, not BYOC.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from fedbrain.fl.flare_private import (deployed_apps, job_of, persistor_id_of, script_settings, server_workflows,
                                       set_task_check_period, set_validation_timeout)
from fedbrain.tasks.config import TaskConfig

SITES_DIR = Path(__file__).resolve().parent / "sites"
#: The POC hospitals; a production job names the consortium's own sites.
DEFAULT_SITES = ("hospital-a", "hospital-b", "hospital-c")
#: Python packages the sites and server have installed: never copied into a job's custom/.
INSTALLED_PACKAGES = ["fedbrain"]


def build_task_recipe(config: TaskConfig, *, site_script: str, key_metric: str,
                      personal_names: list[str] = (), sites=None):
    """See :func:`_build`; runs in the sites/ folder so the script is named relative to it."""
    if sites and config.min_clients > len(sites):
        raise ValueError(f"min_clients {config.min_clients} is more than the {len(sites)} sites given "
                         f"({', '.join(sites)}): set min_clients to at most {len(sites)}")
    if config.min_trained_sites == 2:
        logging.getLogger("fedbrain").warning(
            "min_trained_sites 2: a round trained by two sites is published, and each of the two can then "
            "read the other's update from the global model (3, the default, avoids that)")
    if sites and config.min_trained_sites > len(sites):
        logging.getLogger("fedbrain").warning(
            f"min_trained_sites {config.min_trained_sites} is more than the {len(sites)} sites given: "
            f"no round of this job can be published")
    with _in_sites_dir():
        return _build(config, site_script=site_script, key_metric=key_metric, personal_names=personal_names,
                      sites=sites)


#: The working folder is the process's, not a thread's: jobs built or exported from several threads at once (the
#: fault tests do) take turns, or one thread's return to its folder pulls the sites/ folder from under another.
_CWD_LOCK = threading.RLock()


@contextlib.contextmanager
def _in_sites_dir():
    with _CWD_LOCK, contextlib.chdir(SITES_DIR):
        yield


def _build(config: TaskConfig, *, site_script: str, key_metric: str, personal_names, sites):
    from nvflare.recipe.utils import add_experiment_tracking

    if config.he:
        from fedbrain.jobs.encrypted import EncryptedFedAvgRecipe

        build = EncryptedFedAvgRecipe
    else:
        build = _build_plain
    recipe = build(config, site_script=site_script, key_metric=key_metric, personal_names=personal_names, sites=sites)
    run_installed_scripts(job_of(recipe))  # client apps that exist already (SCAFFOLD, encrypted)
    add_experiment_tracking(recipe, "tensorboard")  # site metrics stream to the server's tb_events/
    # Sites and server run the fedbrain they installed: no shadowed copy of it in custom/.
    job_of(recipe).set_app_packages(INSTALLED_PACKAGES)
    apply_round_timing(recipe)
    return recipe


#: FLARE's own per-round waits, set in every job (docs/admin-guide.md, "Round timing"; measured in
#: docs/benchmarks.md). ``task_request_interval`` (server app, FLARE's default 2 s) is how long a site
#: sleeps after submitting a result, and after each "no task yet" answer, before asking for its next
#: task: with FLARE's default every round paid up to 2 s of that sleep (the fixed ~2 s per round).
#: ``task_check_period`` (the workflows' wait loop, FLARE's default 0.5 s) is how often the server
#: controller looks whether a round's results are all in. Cost: a site waiting for the others' results
#: asks for a task 5 times a second instead of once per 2 s (12 waiting sites: ~60 small requests/s to
#: the server), and the controller checks 10 times a second; both are idle loops, not data transfers.
TASK_REQUEST_INTERVAL = 0.2
TASK_CHECK_PERIOD = 0.1


def apply_round_timing(recipe, task_request_interval: float = TASK_REQUEST_INTERVAL,
                       task_check_period: float = TASK_CHECK_PERIOD) -> None:
    """Write fedbrain's round timing into the job: the server app's ``server.task_request_interval``
    and every server workflow's ``task_check_period``."""
    job_of(recipe).to_server({"server": {"task_request_interval": float(task_request_interval)}})
    for workflow in server_workflows(recipe):
        set_task_check_period(workflow.controller, task_check_period)


def site_privacy_filters(config: TaskConfig, personal_names=()) -> list:
    """A job's own privacy filters for what a site sends, in order, all on plaintext: the personal
    part removed first (neither counted nor noised), then client-level DP (clip, noise)."""
    from nvflare.app_common.filters.exclude_vars import ExcludeVars

    from fedbrain.privacy.client_dp import client_dp_filters

    out = [ExcludeVars(exclude_vars=list(personal_names))] if personal_names else []
    return out + client_dp_filters(config)


def run_installed_scripts(job) -> None:
    """Make every client app code-free: FLARE's script executor becomes fedbrain's installed-script
    executor (same script name, arguments and exchange formats) and the copied script is dropped."""
    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

    from fedbrain.fl.executor import InstalledScriptExecutor

    for app in deployed_apps(job).values():
        cfg = getattr(app, "app_config", None)
        replaced = set()
        for definition in getattr(cfg, "executors", []):
            old = definition.executor
            if type(old) is ClientAPIExecutor:
                settings = script_settings(old)
                name = settings.pop("script")
                definition.executor = InstalledScriptExecutor(name, settings.pop("args"), **settings)
                replaced.add(name)
        if cfg is not None and replaced:
            cfg.ext_scripts = [s for s in cfg.ext_scripts if Path(s).name not in replaced]


def fault_policy(config: TaskConfig) -> dict:
    """The server controller's round policy from the task config (docs/reliability.md, "Timeout policy")."""
    return {"round_timeout": config.round_timeout, "min_responses": config.min_responses,
            "fetch_grace": config.dead_site_grace, "min_trained_sites": config.min_trained_sites}


def apply_fault_settings(recipe, config: TaskConfig) -> None:
    """Job-level FLARE settings of the fault policy: how long after a site's job process vanished
    FLARE deems the site gone (``dead_client_grace_period`` of the server app)."""
    from nvflare.apis.fl_constant import ConfigVarName

    job_of(recipe).to_server({ConfigVarName.DEAD_CLIENT_GRACE_PERIOD: float(config.dead_site_grace)})


def use_resilient_scaffold(recipe, config: TaskConfig) -> None:
    """FLARE's SCAFFOLD controller in a recipe becomes :class:`fedbrain.fl.resilient.ResilientScaffold`
    with the same arguments and the config's round policy (FLARE's own waits for every site forever)."""
    from nvflare.app_common.workflows.scaffold import Scaffold

    from fedbrain.fl.resilient import ResilientScaffold

    for workflow in server_workflows(recipe):
        old = workflow.controller
        if type(old) is Scaffold:
            workflow.controller = ResilientScaffold(
                num_clients=old.num_clients, num_rounds=old.num_rounds, persistor_id=persistor_id_of(old),
                memory_gc_rounds=old.memory_gc_rounds,
                enable_tensor_disk_offload=old.enable_tensor_disk_offload,
                round_timeout=config.round_timeout, min_responses=config.min_responses,
                min_trained_sites=config.min_trained_sites)


def bound_final_evaluation(recipe, config: TaskConfig) -> None:
    """The final evaluation waits at most ``round_timeout`` for each site's answer (FLARE's default is
    6000 s: a site restarted during the job, which FLARE neither re-admits nor reports dead, would hold
    the finished job for 100 minutes)."""
    if not config.round_timeout:
        return
    for workflow in server_workflows(recipe):
        set_validation_timeout(workflow.controller, config.round_timeout)


def _code_free_fedavg():
    """FLARE's FedAvg recipe whose per-site client apps (made at export) run installed scripts."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    class CodeFreeFedAvgRecipe(FedAvgRecipe):
        def __init__(self, *args, fault_policy: dict | None = None, secagg: bool = False, **kwargs):
            self._fault_policy = fault_policy or {}  # read by _create_controller, called from __init__
            self._secagg = secagg
            super().__init__(*args, **kwargs)

        def _create_controller(self, persistor_id, model_params, model_aggregator):
            """FLARE's FedAvg with fedbrain's round policy (fedbrain.fl.resilient), or its secure-aggregation
            form (fedbrain.secagg.server); same arguments."""
            from fedbrain.fl.resilient import ResilientFedAvg
            from fedbrain.secagg.server import SecAggFedAvg

            flare = super()._create_controller(persistor_id, model_params, model_aggregator)
            return (SecAggFedAvg if self._secagg else ResilientFedAvg)(
                num_clients=flare.num_clients, num_rounds=flare.num_rounds, persistor_id=persistor_id,
                model=model_params, save_filename=flare.save_filename, aggregator=model_aggregator,
                stop_cond=flare.stop_cond, patience=flare.patience, task_name=flare.task_name,
                exclude_vars=flare.exclude_vars, aggregation_weights=flare.aggregation_weights or None,
                memory_gc_rounds=flare.memory_gc_rounds,
                enable_tensor_disk_offload=flare.enable_tensor_disk_offload, **self._fault_policy)

        def _prepare_client_apps(self) -> None:
            super()._prepare_client_apps()
            run_installed_scripts(job_of(self))

    return CodeFreeFedAvgRecipe


def _build_plain(config: TaskConfig, *, site_script: str, key_metric: str, personal_names, sites):
    """FedAvg (or SCAFFOLD) over sites running ``site_script`` with ``config``.

    With ``sites`` each site gets its own app (per-site filters); ``personal_names`` are
    removed from every update by an ExcludeVars result filter at each site; the server
    records what it receives (``ReceivedUpdateAudit``) and screens and combines the round's
    updates with :class:`fedbrain.aggregation.aggregator.GuardedAggregator` (update guard,
    ``aggregation``; FedAvg only: FLARE's ScaffoldRecipe takes no aggregator).
    """
    from nvflare.apis.dxo import DataKind
    from nvflare.app_opt.pt.recipes.scaffold import ScaffoldRecipe
    from nvflare.client.config import ExchangeFormat, TransferType
    from nvflare.recipe.utils import add_final_global_evaluation, set_per_site_config

    from fedbrain.aggregation.aggregator import GuardedAggregator
    from fedbrain.filters.audit import ReceivedUpdateAudit

    common = dict(name=config.name, model=config.model_spec(), min_clients=config.min_clients,
                  num_rounds=config.rounds, train_script=site_script, train_args=f"--config {config.to_argument()}",
                  server_expected_format=ExchangeFormat.PYTORCH, params_transfer_type=TransferType.DIFF)
    if config.algorithm == "scaffold":
        # ScaffoldRecipe has one client app for all sites (no per-site config); it keeps the last model.
        recipe = ScaffoldRecipe(**common)
        use_resilient_scaffold(recipe, config)
        apply_fault_settings(recipe, config)
        groups = [None]
    else:
        from fedbrain.secagg.server import SecAggSum

        recipe = _code_free_fedavg()(**common, key_metric=key_metric, key_metric_mode="max",
                                     fault_policy=fault_policy(config), secagg=config.secagg,
                                     aggregator=SecAggSum() if config.secagg else GuardedAggregator.from_config(config),
                                     aggregator_data_kind=DataKind.WEIGHT_DIFF)
        apply_fault_settings(recipe, config)
        groups = [None]
        if sites:
            set_per_site_config(recipe, {site: {} for site in sites})  # one app per hospital
            groups = [[site] for site in sites]
    for clients in groups:
        for privacy_filter in site_privacy_filters(config, personal_names):
            recipe.add_client_output_filter(privacy_filter, tasks=["train"], clients=clients)
        if config.secagg:  # masking last, after every privacy filter; the setup and unmasking tasks' executor
            add_secure_aggregation(recipe, clients)
    # What actually arrived; it ends the job once no site may release updates any more.
    recipe.add_server_input_filter(ReceivedUpdateAudit(), tasks=["train"])
    if config.algorithm != "scaffold":  # ScaffoldRecipe exposes no persistor id to evaluate: the report
        add_final_global_evaluation(recipe)  # then uses the last round
        bound_final_evaluation(recipe, config)
    return recipe


def add_secure_aggregation(recipe, clients) -> None:
    """A site app's part of secure aggregation (fedbrain.secagg.site): the mask as the last ``train`` result
    filter, and the executor of the setup and unmasking tasks."""
    from fedbrain.contracts import SECAGG_TASKS
    from fedbrain.secagg.site import SecAggMask, SecAggSiteExecutor

    recipe.add_client_output_filter(SecAggMask(), tasks=["train"], clients=clients)
    job = job_of(recipe)
    for site in clients or [None]:
        if site:
            job.to(SecAggSiteExecutor(), site, tasks=list(SECAGG_TASKS))
        else:
            job.to_clients(SecAggSiteExecutor(), tasks=list(SECAGG_TASKS))


def export_recipe(recipe, export_dir: str | Path, name: str, start=None, sites=None) -> Path:
    """Export into ``export_dir/name``: configuration only (the site script is named, not carried),
    plus the public start model (:func:`fedbrain.models.start.ship`) when the job has one."""
    export_dir = Path(export_dir).resolve()
    with _in_sites_dir():
        recipe.export(str(export_dir))
    if start is not None:
        from fedbrain.models.start import ship

        ship(export_dir / name, start, sites)
    return export_dir / name


def bind_start(config: TaskConfig):
    """``(config, start)``: a start given as a path becomes its hash in the config that travels to
    sites, and the files travel in the job (:func:`fedbrain.models.start.bind`)."""
    from fedbrain.models.start import bind

    return bind(config)


def job_main(config_cls, export, doc: str, argv=None, default_export_dir: str | Path = ".") -> Path:
    """The command line of a job definition: every config field is a flag."""
    import argparse
    import inspect

    from fedbrain.tasks.config import add_config_arguments, config_from_arguments

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export_dir", "--export-dir", default=str(default_export_dir))
    per_site = "sites" in inspect.signature(export).parameters
    if per_site:
        p.add_argument("--sites", nargs="+", default=list(DEFAULT_SITES), help="one app per site (default: the POC's)")
    add_config_arguments(p, config_cls)
    a = p.parse_args(argv)
    extra = {"sites": a.sites} if per_site else {}
    try:
        folder = export(config_from_arguments(config_cls, a), a.export_dir, **extra)
    except ValueError as e:
        raise SystemExit(f"cannot export the job: {e}") from None
    print(folder)
    return folder
