"""The benchmarks build their runs from the task config: a seed row really uses its seed."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_classify():
    spec = importlib.util.spec_from_file_location("bench_classify", BENCH / "classify.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_seed_rows_start_from_their_own_initial_weights(tmp_path):
    """The "other seeds" rows once all started from init_seed 0: the job must carry the seed."""
    from fedbrain.jobs import classification

    bench = _bench_classify()
    for seed in (1, 2):
        config = bench.ClassifyBenchSettings(seed=seed).config(algorithm="fedavg", name=f"seed{seed}")
        folder = classification.export(config, tmp_path, sites=list(bench.SITES))
        server = json.loads((folder / "app_server" / "config" / "config_fed_server.json").read_text())
        persistor = next(c for c in server["components"] if c["id"] == "persistor")
        assert persistor["args"]["model"]["args"]["init_seed"] == seed
        client = json.loads((folder / "app_hospital-a" / "config" / "config_fed_client.json").read_text())
        assert f'"seed":{seed}' in client["executors"][0]["executor"]["args"]["task_script_args"]
