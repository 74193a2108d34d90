"""The class allow-list of every fedbrain kit: exactly the classes the shipped jobs and site policies
name, FLARE's and fedbrain's, nothing else, and no function reachable under FLARE's prefix rule (a
config-only job naming ``fedbrain.fl.site.write_site_config`` rewrote a site's privacy settings before;
FLARE's default list, which kits carried too, admits loaders that read job-supplied paths at a site)."""

import importlib
import inspect
import json
import pkgutil

import pytest

import fedbrain
from fedbrain.ops.allowlist import (FEDBRAIN_SERVER_CLASSES, FEDBRAIN_SITE_CLASSES, FLARE_SERVER_CLASSES,
                                    FLARE_SITE_CLASSES, admitted, class_allow_list)
from fedbrain.tasks.classification_config import ClassificationConfig
from fedbrain.tasks.segmentation_config import SegmentationConfig

#: Every shape of job fedbrain exports: each algorithm, encryption, client-level DP, robust
#: aggregation, both segmentation networks and the dual-stream segmentation network.
CONFIGS = [
    SegmentationConfig(), SegmentationConfig(he=True), SegmentationConfig(arch="segresnet", aggregation="krum"),
    SegmentationConfig(streams=("mri", "ct")), SegmentationConfig(client_dp_clip=1.0, client_dp_noise=1.0),
    ClassificationConfig(), ClassificationConfig(algorithm="fedavg", aggregation="median"),
    ClassificationConfig(algorithm="scaffold"), ClassificationConfig(he=True),
    ClassificationConfig(algorithm="fedprox", client_dp_clip=0.5), SegmentationConfig(secagg=True, client_dp_clip=1.0),
]


def _paths(node, out: set) -> set:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("path", "class_path") and isinstance(value, str):
                out.add(value)
            _paths(value, out)
    elif isinstance(node, list):
        for value in node:
            _paths(value, out)
    return out


@pytest.fixture(scope="module")
def used(tmp_path_factory) -> dict:
    """Component paths the exported jobs name, in server apps and in site apps."""
    from fedbrain.jobs import classification, segmentation

    out = {"server": set(), "client": set()}
    for i, config in enumerate(CONFIGS):
        job = classification if config.TASK == "classification" else segmentation
        folder = job.export(config, tmp_path_factory.mktemp(f"job{i}"))
        for f in folder.glob("app*/config/config_fed_server.json"):
            _paths(json.loads(f.read_text()), out["server"])
        for f in folder.glob("app*/config/config_fed_client.json"):
            _paths(json.loads(f.read_text()), out["client"])
    from fedbrain.ops.builder import privacy_policy

    _paths(privacy_policy("standard"), out["client"])  # the site's own privacy.json: scopes and final check
    return out


@pytest.mark.parametrize("kind", ["server", "client"])
def test_every_component_the_jobs_name_is_admitted(used, kind):
    allowed = class_allow_list(kind)
    assert not [p for p in used[kind] if not admitted(p, allowed)]


@pytest.mark.parametrize("kind,listed", [("server", FEDBRAIN_SERVER_CLASSES), ("client", FEDBRAIN_SITE_CLASSES)])
def test_nothing_from_fedbrain_is_listed_that_no_job_names(used, kind, listed):
    assert set(listed) == {p for p in used[kind] if p.startswith("fedbrain.")}


@pytest.mark.parametrize("kind,listed", [("server", FLARE_SERVER_CLASSES), ("client", FLARE_SITE_CLASSES)])
def test_nothing_is_listed_that_no_job_names(used, kind, listed):
    """The whole list is what fedbrain's jobs and policies name: FLARE's default list is not included."""
    assert set(listed) == {p for p in used[kind] if not p.startswith("fedbrain.")}
    assert set(class_allow_list(kind)) == used[kind]


@pytest.mark.parametrize("path", [
    "nvflare.app_opt.xgboost.histogram_based_v2.csv_data_loader.CSVDataLoader",  # reads a job-supplied folder
    "nvflare.app_opt.xgboost.histogram_based_v2.fed_executor.FedXGBHistogramExecutor",
    "nvflare.app_common.executors.statistics.statistics_executor.StatisticsExecutor",
    "nvflare.app_common.psi.psi_executor.PSIExecutor",
    "nvflare.app_opt.he.model_decryptor.HEModelDecryptor",  # FLARE's, for a result chain: fedbrain's own decrypts task data
    "nvflare.app_common.widgets.event_recorder.ClientEventRecorder",
])
def test_flares_default_site_classes_that_fedbrain_does_not_use_are_refused(path):
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    assert admitted(path, DEFAULT_CLASS_ALLOW_LIST)  # FLARE alone would build it at a site
    assert not admitted(path, class_allow_list("client"))


def _every_fedbrain_name():
    """Every module, and every class and function defined in one, of the installed fedbrain."""
    for info in pkgutil.walk_packages(fedbrain.__path__, "fedbrain."):
        if info.name.startswith("fedbrain.jobs.sites"):
            continue  # site scripts run as programs, not modules
        module = importlib.import_module(info.name)
        yield info.name, module
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == info.name:
                yield f"{info.name}.{name}", obj


@pytest.mark.parametrize("kind", ["server", "client"])
def test_under_flares_prefix_rule_only_the_listed_classes_are_admitted(kind):
    allowed = class_allow_list(kind)
    assert not [a for a in allowed if a == "*" or a.endswith(".")], "a module prefix admits every function in it"
    reachable = {path: obj for path, obj in _every_fedbrain_name() if admitted(path, allowed)}
    listed = set(FEDBRAIN_SERVER_CLASSES if kind == "server" else FEDBRAIN_SITE_CLASSES)
    assert set(reachable) == listed, sorted(set(reachable) ^ listed)
    assert all(inspect.isclass(obj) for obj in reachable.values())
    assert not admitted("fedbrain.fl.site.write_site_config", allowed)
    assert not admitted("fedbrain.synthetic.cohort.write_case", allowed)
