"""The exact classes a job may name at a fedbrain server or site (FLARE's ``class_allow_list``).

FLARE instantiates whatever a job's component ``path`` names, function or class, with arguments from
the job (``{WORKSPACE}`` is the site's own folder), and its allow-list matches entries as path
prefixes. A module prefix such as ``fedbrain.`` therefore let a config-only job call any fedbrain
function at a site (rewrite its local settings, delete its privacy ledger). These lists name classes
only, one by one; under FLARE's prefix rule an entry ``a.b.C`` admits ``a.b.C`` and nothing else that
exists (``tests/test_allowlist.py`` walks every fedbrain module to prove it, and checks that every
component the shipped jobs and site policies use is listed and nothing more).
"""

from __future__ import annotations

#: fedbrain classes a server app names: the round controllers, the aggregator, the audit of what
#: arrives, the encrypted and the securely masked aggregation, and the networks the server's persistor builds from a spec.
FEDBRAIN_SERVER_CLASSES = (
    "fedbrain.fl.resilient.ResilientFedAvg",
    "fedbrain.fl.resilient.ResilientScaffold",
    "fedbrain.aggregation.aggregator.GuardedAggregator",
    "fedbrain.filters.audit.ReceivedUpdateAudit",
    "fedbrain.filters.he.TimedHEAggregator",
    "fedbrain.secagg.server.SecAggFedAvg",
    "fedbrain.secagg.server.SecAggSum",
    "fedbrain.models.segmentation.SeededUNet",
    "fedbrain.models.segmentation.SeededSegResNet",
    "fedbrain.models.segmentation.DualStreamSegNet",
    "fedbrain.models.classifier.DualStreamClassifier",
)
#: fedbrain classes a site app (or the site's own privacy policy) names: the installed-script
#: executor, the HE filters, secure aggregation's executor and mask, and the privacy filters.
FEDBRAIN_SITE_CLASSES = (
    "fedbrain.fl.executor.InstalledScriptExecutor",
    "fedbrain.filters.he.SharedPartDecryptor",
    "fedbrain.filters.he.TimedEncryptor",
    "fedbrain.privacy.client_dp.UpdateNormClip",
    "fedbrain.privacy.client_dp.ClientLevelDP",
    "fedbrain.filters.require_encryption.RequireEncryption",
    "fedbrain.filters.final_check.FinalPayloadCheck",
    "fedbrain.secagg.site.SecAggSiteExecutor",
    "fedbrain.secagg.site.SecAggMask",
)
#: FLARE classes fedbrain's server apps name that FLARE's default allow-list lacks.
FLARE_SERVER_EXTRAS = (
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
)


def class_allow_list(kind: str) -> list[str]:
    """``server`` or ``client``: FLARE's default list plus exactly what fedbrain's apps name there."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    extra = FLARE_SERVER_EXTRAS + FEDBRAIN_SERVER_CLASSES if kind == "server" else FEDBRAIN_SITE_CLASSES
    return list(DEFAULT_CLASS_ALLOW_LIST) + [c for c in extra if c not in DEFAULT_CLASS_ALLOW_LIST]


def admitted(path: str, allow_list) -> bool:
    """Whether FLARE's component authorizer lets a job name ``path`` (its prefix rule, "*" = all)."""
    return any(entry == "*" or path == entry or (path.startswith(entry) if entry.endswith(".")
                                                 else path.startswith(entry + ".")) for entry in allow_list)
