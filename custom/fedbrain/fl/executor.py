"""FLARE's Client API executor, running a site script of the fedbrain this site installed.

A job then names a script (``segment_client.py``) instead of carrying it: the exported job
has no ``custom/`` folder, so FLARE treats it as code-free (not BYOC) and checks each of
its components against the site's class allow-list. The site runs exactly the fedbrain
version its IT team installed.
"""

from __future__ import annotations

from importlib import resources

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

from fedbrain.fl.flare_private import set_client_api_poll_interval

#: Seconds between the Client API executor's looks for the site script's result, and the script's looks for its
#: next task (FLARE 2.9: 0.5 s each, up to 1 s of every round spent waiting; measured in docs/benchmarks.md). Both
#: are checks of an in-memory queue inside the site's job process: 20 a second cost nothing measurable.
CLIENT_API_POLL_INTERVAL = 0.05


def installed_site_script(name: str) -> str:
    """Absolute path of a site script shipped in the installed fedbrain (``fedbrain/jobs/sites/``)."""
    import fedbrain

    script = resources.files("fedbrain.jobs") / "sites" / name
    if "/" in name or not script.is_file():
        raise ValueError(f"the fedbrain {fedbrain.__version__} installed at this site has no site script "
                         f"'{name}' (the job was made for another fedbrain version?)")
    return str(script)


class InstalledScriptExecutor(ClientAPIExecutor):
    def __init__(self, site_script: str, task_script_args: str = "", params_exchange_format: str = "pytorch",
                 server_expected_format: str = "pytorch", params_transfer_type: str = "DIFF"):
        """``site_script``: a file name in fedbrain/jobs/sites/; it runs in the site's job process."""
        self.site_script = site_script
        set_client_api_poll_interval(CLIENT_API_POLL_INTERVAL)  # this runs in the site's job process
        super().__init__(execution_mode="in_process", task_script_path=installed_site_script(site_script),
                         task_script_args=task_script_args, params_exchange_format=params_exchange_format,
                         server_expected_format=server_expected_format, params_transfer_type=params_transfer_type)
