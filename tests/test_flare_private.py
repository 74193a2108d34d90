"""Every private FLARE part fedbrain touches (fedbrain/fl/flare_private.py) still exists in the
installed FLARE: an upgrade that renames one fails here, naming it, instead of deep in a job."""

import importlib
import inspect
from pathlib import Path

import pytest

from fedbrain.fl import flare_private as fp

ROOT = Path(__file__).resolve().parents[1]


def _cls(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path,method", [(c, m) for c, ms in fp.OVERRIDDEN.items() for m in ms])
def test_overridden_private_method_still_exists(path, method):
    assert callable(getattr(_cls(path), method, None)), f"FLARE's {path} has no {method} any more"


@pytest.mark.parametrize("module,name", [(m, n) for m, ns in fp.FUNCTIONS.items() for n in ns])
def test_private_function_still_exists(module, name):
    assert callable(getattr(importlib.import_module(module), name, None)), f"{module}.{name} is gone"


@pytest.mark.parametrize("module,name", [(m, n) for m, ns in fp.CONSTANTS.items() for n in ns])
def test_private_constant_still_exists_and_is_read_where_it_is_used(module, name):
    """The constant exists, and FLARE's code still reads the module global (so changing it changes the wait)."""
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, name, None), (int, float)), f"{module}.{name} is gone"
    assert inspect.getsource(mod).count(name) >= 3, f"{module} no longer reads {name} where it waits"


def test_a_site_executor_sets_the_client_api_poll_period():
    from nvflare.app_common.executors.client_api import in_process_backend

    from fedbrain.fl.executor import CLIENT_API_POLL_INTERVAL, InstalledScriptExecutor

    before = in_process_backend._RESULT_POLL_INTERVAL
    try:
        in_process_backend._RESULT_POLL_INTERVAL = 0.5  # FLARE's own (an executor built earlier in this process set it)
        InstalledScriptExecutor("segment_client.py")
        assert in_process_backend._RESULT_POLL_INTERVAL == CLIENT_API_POLL_INTERVAL < 0.5
    finally:
        in_process_backend._RESULT_POLL_INTERVAL = before


@pytest.fixture(scope="module")
def real_objects():
    """Real instances carrying each pinned attribute: a fedbrain segmentation recipe (FLARE's FedAvg
    recipe, its job, its workflows) and FLARE's own Client API executor."""
    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

    from fedbrain.jobs import SITES_DIR, build_task_recipe
    from fedbrain.tasks.segmentation_config import SegmentationConfig

    recipe = build_task_recipe(SegmentationConfig(rounds=1), site_script="segment_client.py", key_metric="val_dice")
    workflows = [w.controller for w in fp.server_workflows(recipe)]
    executor = ClientAPIExecutor(execution_mode="in_process", task_script_path=str(SITES_DIR / "segment_client.py"),
                                 task_script_args="--x 1")
    return {"recipe": recipe, "job": fp.job_of(recipe), "workflows": workflows, "executor": executor}


def _instances(path: str, objects: dict) -> list:
    cls = _cls(path)
    found = [o for o in [objects["recipe"], objects["job"], objects["executor"], *objects["workflows"]]
             if isinstance(o, cls)]
    assert found, f"no real {path} built to check (the test's fixture needs one)"
    return found


@pytest.mark.parametrize("path,attr", [(c, a) for c, attrs in fp.ATTRIBUTES.items() for a in attrs])
def test_private_attribute_still_exists_on_a_real_instance(path, attr, real_objects):
    for obj in _instances(path, real_objects):
        assert hasattr(obj, attr), f"FLARE's {path} instances have no {attr} any more"


def test_the_adapter_reads_what_the_job_really_carries(real_objects):
    assert set(fp.deployed_apps(real_objects["job"])) >= {"server"}
    settings = fp.script_settings(real_objects["executor"])
    assert settings["script"] == "segment_client.py" and settings["args"] == "--x 1"
    assert any(fp.set_task_check_period(c, 0.1) for c in real_objects["workflows"])
    assert any(fp.set_validation_timeout(c, 30) for c in real_objects["workflows"])


def test_no_other_fedbrain_module_touches_flare_private_attributes():
    """The adapter stays the only door: no ``._job``, ``._deploy_map``, ``._task_script_*``, ... elsewhere."""
    names = ({a for attrs in fp.ATTRIBUTES.values() for a in attrs} | {n for ns in fp.FUNCTIONS.values() for n in ns}
             | {n for ns in fp.CONSTANTS.values() for n in ns})
    adapter = Path(inspect.getsourcefile(fp)).resolve()
    offenders = []
    for path in (ROOT / "custom" / "fedbrain").rglob("*.py"):
        if path.resolve() == adapter:
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if f".{n}" in text or f"import {n}" in text]
    assert not offenders, offenders
