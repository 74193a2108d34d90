"""Encrypted aggregation (CKKS through FLARE's HE components), checked on what really happened:
the filter order in the exported job, what the server received, what its kit and disk hold."""

import json

import numpy as np
import pytest

from fedbrain.jobs import classification, segmentation
from fedbrain.tasks.classification import ClassificationConfig
from fedbrain.tasks.segmentation import SegmentationConfig

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _filters(client: dict, kind: str, task: str) -> list[str]:
    return [f["path"].rsplit(".", 1)[-1] for g in client[kind] if task in g["tasks"] for f in g["filters"]]


def test_privacy_filters_act_on_plaintext_before_the_encryptor(tmp_path):
    folder = classification.export(ClassificationConfig(he=True), tmp_path / "cls")
    for site in SITES:
        client = json.loads((folder / f"app_{site}" / "config" / "config_fed_client.json").read_text())
        # the head list itself: tests/test_jobs.py
        assert _filters(client, "task_result_filters", "train") == ["ExcludeVars", "TimedEncryptor"], site
        assert _filters(client, "task_data_filters", "train") == ["SharedPartDecryptor"]
    server = json.loads((folder / "app_server" / "config" / "config_fed_server.json").read_text())
    components = {c["id"]: c for c in server["components"]}
    # DIFF transfer needs WEIGHT_DIFF (FLARE's default for this aggregator, so left out of the args).
    assert components["aggregator"]["args"].get("expected_data_kind", "WEIGHT_DIFF") == "WEIGHT_DIFF"
    assert components["persistor"]["args"]["filter_id"] == "model_serialize_filter"  # persisted encrypted
    assert components["model_serialize_filter"]["path"].endswith("HEModelSerializeFilter")
    seg = segmentation.export(SegmentationConfig(he=True), tmp_path / "seg")
    client = json.loads((seg / "app" / "config" / "config_fed_client.json").read_text())
    assert _filters(client, "task_result_filters", "train") == ["TimedEncryptor"]


def test_scaffold_is_refused_under_he():
    with pytest.raises(ValueError, match="SCAFFOLD"):
        ClassificationConfig(algorithm="scaffold", he=True)


def test_ckks_settings_of_the_kit_keep_the_weighted_mean_exact_to_1e5():
    """One aggregation of fixed updates, as the server does it (weighted sum of ciphertexts, then the
    mean), with the CKKS settings the POC project file provisions: equal to plaintext within 1e-5."""
    import tenseal as ts
    import yaml

    from fedbrain.poc.consortium import DEFAULT_PROJECT

    builder = next(b for b in yaml.safe_load(DEFAULT_PROJECT.read_text())["builders"] if b["path"].endswith("HEBuilder"))
    args = builder["args"]
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, args["poly_modulus_degree"], coeff_mod_bit_sizes=args["coeff_mod_bit_sizes"])
    ctx.global_scale = 2 ** args["scale_bits"]
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, 10_000) for _ in range(3)]  # weight differences of a 10k-value layer
    steps = [12, 5, 20]
    total = None
    for update, n in zip(updates, steps):
        encrypted = ts.ckks_vector(ctx, update * float(n))  # the site weighs by its steps, then encrypts
        total = encrypted if total is None else total + encrypted
    mean = np.asarray((total * (1.0 / sum(steps))).decrypt())
    expected = sum(u * n for u, n in zip(updates, steps)) / sum(steps)
    assert np.max(np.abs(mean - expected)) <= 1e-5


def _he_context():
    """Like a kit's client context (FLARE's HEBuilder makes it symmetric: encrypting needs the secret key)."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.global_scale = 2 ** 40
    ctx.generate_galois_keys()
    return ctx


def test_layers_encrypted_in_a_process_pool_decrypt_to_the_weighted_update():
    """A site with threads to spare encrypts layers in parallel: same result as FLARE's serial path."""
    from fedbrain.filters.he import TimedEncryptor

    ctx = _he_context()
    rng = np.random.default_rng(1)
    update = {"conv.weight": rng.normal(0, 0.01, (16, 4, 3, 3, 3)), "conv.bias": rng.normal(0, 0.01, 16),
              "big": rng.normal(0, 0.01, 9000)}  # over one ciphertext (4096 slots)
    out = {}
    for workers in (1, 2):
        enc = TimedEncryptor(workers=workers)
        enc.tenseal_context, enc.encrypt_layers, enc.n_iter = ctx, [True], 3
        try:
            params, processed = enc.encryption({k: v.copy() for k, v in update.items()}, None)
        finally:
            if enc._pool is not None:
                enc._pool.shutdown()
        assert processed == dict.fromkeys(update, True)
        out[workers] = {k: np.asarray(v.decrypt()) for k, v in params.items()}
    for name, values in update.items():
        expected = values.ravel() * 3  # weighed by the site's steps before encryption
        assert np.max(np.abs(out[2][name] - expected)) < 1e-6
        assert np.max(np.abs(out[2][name] - out[1][name])) < 1e-6


def test_tenseal_warning_is_held_back_and_other_output_passes():
    """In a site process (stdout to a pipe, as a kit's console log): TenSEAL's C++ warning for a
    multi-ciphertext vector is held back, everything else printed meanwhile passes."""
    import subprocess
    import sys

    script = """
import numpy as np, tenseal as ts
from fedbrain.filters.ckks import tenseal_quiet
ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40]); ctx.global_scale = 2 ** 40
guard = {guard}
with (tenseal_quiet() if guard else open('/dev/null')):
    print('kept line', flush=True)
    ts.ckks_vector(ctx, np.zeros(9000))
print('after', flush=True)
"""
    outputs = {}
    for guard in (True, False):
        res = subprocess.run([sys.executable, "-c", script.format(guard=guard)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        outputs[guard] = res.stdout
    assert "kept line" in outputs[True] and "after" in outputs[True]
    assert "does not fit in a single ciphertext" not in outputs[True]
    assert "does not fit in a single ciphertext" in outputs[False]  # the test can fail


def test_an_encrypted_round_with_too_few_trained_sites_ends_the_job_with_one_line():
    """The server cannot leave an encrypted sum out of the model: below min_trained_sites (or min_responses) the HE
    aggregator ends the job with the reason instead of publishing (it never adds the ciphertexts)."""
    from nvflare.apis.fl_context import FLContext

    from fedbrain.filters.he import TimedHEAggregator

    for accepted, trained, why in ((3, 2, "round 4 not published: 2 trained site(s), fewer than min_trained_sites 3"),
                                   (1, 1, "round 4: 1 encrypted update(s) arrived before the round closed, fewer than "
                                          "min_responses 2")):
        agg = TimedHEAggregator(min_responses=2, min_trained_sites=3)
        panics = []
        agg.system_panic = lambda reason, fl_ctx: panics.append(reason)
        agg._accepted, agg._trained = accepted, trained
        ctx = FLContext()
        ctx.set_prop("current_round", 4, private=False, sticky=False)
        assert agg.aggregate(ctx) is None
        assert len(panics) == 1 and panics[0].startswith(why) and panics[0].endswith("the job ends here"), panics
