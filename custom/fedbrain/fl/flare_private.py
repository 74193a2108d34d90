"""The one door to FLARE's private parts (written against NVFLARE 2.9.0).

fedbrain needs a few things FLARE has no public API for: the job a recipe builds, the apps it
deploys, the script a Client API executor runs, two wait periods of the server workflows, the Client API's
poll period at a site, and the round state of the FedAvg controller. Every read or write of a private FLARE attribute goes
through a function here, and every private method a fedbrain subclass overrides is listed in
:data:`OVERRIDDEN`. ``tests/test_flare_private.py`` pins each entry against the installed FLARE,
so an upgrade that renames or removes one fails one test that names it.
"""

from __future__ import annotations

from pathlib import Path

#: Private methods fedbrain subclasses override (or call through ``super()``), by FLARE class.
OVERRIDDEN: dict[str, tuple[str, ...]] = {
    # fedbrain.fl.resilient.ResilientFedAvg: the round policy (who is asked, how long a round waits)
    "nvflare.app_common.workflows.fedavg.FedAvg": ("_prepare_task", "_aggregate_one_result",
                                                   "_get_aggregated_result"),
    # fedbrain.filters.he.TimedEncryptor: times FLARE's encryption
    "nvflare.app_opt.he.model_encryptor.HEModelEncryptor": ("_process",),
    # fedbrain.jobs._code_free_fedavg: the FedAvg recipe with fedbrain's controller and code-free apps
    "nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe": ("_create_controller", "_prepare_client_apps"),
}

#: Private attributes read or written here, by the FLARE class whose instances carry them.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "nvflare.recipe.spec.Recipe": ("_job",),
    "nvflare.job_config.api.FedJob": ("_deploy_map",),
    "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor": (
        "_task_script_path", "_task_script_args", "_params_exchange_format", "_server_expected_format",
        "_params_transfer_type"),
    "nvflare.app_common.workflows.base_model_controller.BaseModelController": (
        "_task_check_period", "_current_min_responses", "_current_num_targets", "_persistor_id"),
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval": ("_validation_timeout",),
}

#: Private module-level functions used, by module.
FUNCTIONS: dict[str, tuple[str, ...]] = {
    "nvflare.app_common.workflows.base_fedavg": ("_get_client_name",),
}

#: Private module-level settings changed, by module (read by FLARE at use, so a change applies from then on).
CONSTANTS: dict[str, tuple[str, ...]] = {
    # how often the in-process Client API executor looks for the site script's result, and (passed on) how often
    # the script looks for its next task: 0.5 s each in FLARE 2.9, a fixed wait of up to 1 s in every round
    "nvflare.app_common.executors.client_api.in_process_backend": ("_RESULT_POLL_INTERVAL",),
}


def job_of(recipe):
    """The FedJob a recipe builds (FLARE keeps it private)."""
    return recipe._job


def deployed_apps(job) -> dict:
    """``target -> app`` of a FedJob: "server", a site name, or FLARE's "@ALL" for every client."""
    return job._deploy_map


def server_workflows(recipe) -> list:
    server = deployed_apps(job_of(recipe)).get("server")
    return list(getattr(getattr(server, "app_config", None), "workflows", []))


def set_task_check_period(controller, seconds: float) -> bool:
    """How often a workflow looks whether a round's results are in; False when it has no such wait."""
    if not hasattr(controller, "_task_check_period"):
        return False
    controller._task_check_period = float(seconds)
    return True


def set_validation_timeout(controller, seconds: int) -> bool:
    """How long the final cross-site evaluation waits for a site; False for other workflows."""
    if not hasattr(controller, "_validation_timeout"):
        return False
    controller._validation_timeout = int(seconds)
    return True


def script_settings(executor) -> dict:
    """What a Client API executor runs: script name, arguments and exchange formats."""
    return {"script": Path(executor._task_script_path).name, "args": executor._task_script_args,
            "params_exchange_format": executor._params_exchange_format,
            "server_expected_format": executor._server_expected_format,
            "params_transfer_type": executor._params_transfer_type}


def persistor_id_of(controller) -> str:
    """The persistor component a model controller loads and saves the global model with."""
    return controller._persistor_id


def tell_round_minimum(controller, min_responses: int) -> None:
    """The error tolerance of the task being prepared: FLARE's FedAvg sets it to every target."""
    controller._current_min_responses = min(min_responses, controller._current_num_targets)


def set_client_api_poll_interval(seconds: float) -> None:
    """How often the in-process Client API executor and its site script look for each other's result or task
    (in this process, from the next job's start on)."""
    from nvflare.app_common.executors.client_api import in_process_backend

    in_process_backend._RESULT_POLL_INTERVAL = float(seconds)


def client_name(result) -> str:
    """The site an FLModel result came from."""
    from nvflare.app_common.workflows.base_fedavg import _get_client_name

    return _get_client_name(result)
