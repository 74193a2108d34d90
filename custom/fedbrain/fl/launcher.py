"""A site's job launcher that keeps one crashed hospital from failing the whole federation.

FLARE 2.9 starts each job at a site as a child process (``ClientProcessJobLauncher``). When that
process dies from a signal (the OOM killer's SIGKILL, a segfault, an operator's ``kill -9``), the
launcher maps the exit status to ``EXECUTION_ERROR``; the site then reports the job as failed with
an *exception* (``private/fed/client/client_executor.py`` ``_wait_child_process_finish``), and the
server fails the whole job on that report (``private/fed/server/fed_server.py``
``process_job_failure`` -> ``job_runner.fail_run``): FINISHED:EXECUTION_EXCEPTION for everyone.

:class:`SiteJobLauncher` is the same launcher except that a death by signal is reported as
``UNKNOWN`` (FLARE's code for "outcome not known"), which the server records without failing the
job. The job then goes on without that site the FLARE way: the server notices the job missing at
the site (heartbeat), deems the site gone after the job's ``dead_client_grace_period``, and ends
the job only if fewer than the job's ``min_clients`` remain. An ordinary error exit (status 1: a
Python exception in the job) is still reported as a failure. fedbrain's provisioning builder puts
this launcher in every site kit's ``local/resources.json`` (component ``process_launcher``).
"""

from __future__ import annotations

import logging

from nvflare.apis.job_launcher_spec import JobReturnCode
from nvflare.app_common.job_launcher.client_process_launcher import ClientProcessJobLauncher
from nvflare.app_common.job_launcher.process_launcher import ProcessHandle

log = logging.getLogger("fedbrain.launcher")


class _SignalTolerantHandle(ProcessHandle):
    def __init__(self, inner: ProcessHandle):
        super().__init__(process_adapter=inner.adapter)

    def poll(self):
        code = self.adapter.poll()
        if code is not None and code < 0:  # killed by signal -code
            log.warning("the job process was killed by signal %d; reporting its outcome as unknown so the "
                        "federation goes on without this site", -code)
            return JobReturnCode.UNKNOWN
        return super().poll()


class SiteJobLauncher(ClientProcessJobLauncher):
    def launch_job(self, job_meta: dict, fl_ctx):
        return _SignalTolerantHandle(super().launch_job(job_meta, fl_ctx))
