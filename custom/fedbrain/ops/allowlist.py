"""The exact classes a job may name at a fedbrain server or site (FLARE's ``class_allow_list``).

FLARE instantiates whatever a job's component ``path`` names, function or class, with arguments from
the job (``{WORKSPACE}`` is the site's own folder), and its allow-list matches entries as path
prefixes. A module prefix such as ``fedbrain.`` therefore let a config-only job call any fedbrain
function at a site (rewrite its local settings, delete its privacy ledger). These lists name classes
only, one by one, FLARE's included (FLARE's own default list admits 88 classes a fedbrain site never
needs); under FLARE's prefix rule an entry ``a.b.C`` admits ``a.b.C`` and nothing else that
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
#: FLARE classes fedbrain's server apps name (its round workflow, model selection and persistence,
#: the TensorBoard receiver, FLARE's HE server parts).
FLARE_SERVER_CLASSES = (
    "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector",
    "nvflare.app_common.widgets.metrics_artifact_writer.MetricsArtifactWriter",
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator",
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval",
    "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
    "nvflare.app_opt.he.model_serialize_filter.HEModelSerializeFilter",
    "nvflare.app_opt.he.model_shareable_generator.HEModelShareableGenerator",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
)
#: FLARE classes fedbrain's site apps and site policies name: the head filter and the metric relay.
#: Nothing else of FLARE's default list (88 classes) is admitted at a site: it holds executors and
#: loaders that read files from job-supplied paths (the XGBoost CSV loader, PSI, statistics), which
#: would bypass the rule that only the site's own local/ names its data.
FLARE_SITE_CLASSES = (
    "nvflare.app_common.filters.exclude_vars.ExcludeVars",
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
)


def class_allow_list(kind: str) -> list[str]:
    """``server`` or ``client``: exactly the classes fedbrain's apps and site policies name there, FLARE's
    and fedbrain's (not FLARE's default list)."""
    if kind not in ("server", "client"):
        raise ValueError(f"kind must be 'server' or 'client', got {kind!r}")
    return list(FLARE_SERVER_CLASSES + FEDBRAIN_SERVER_CLASSES if kind == "server"
                else FLARE_SITE_CLASSES + FEDBRAIN_SITE_CLASSES)


def admitted(path: str, allow_list) -> bool:
    """Whether FLARE's component authorizer lets a job name ``path`` (its prefix rule, "*" = all)."""
    return any(entry == "*" or path == entry or (path.startswith(entry) if entry.endswith(".")
                                                 else path.startswith(entry + ".")) for entry in allow_list)
