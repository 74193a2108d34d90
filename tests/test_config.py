"""Task configs: the one home of every setting. They must survive every way they travel."""

import argparse
from dataclasses import fields

import pytest

from fedbrain.tasks.classification import ClassificationConfig
from fedbrain.tasks.config import add_config_arguments, config_from_arguments
from fedbrain.tasks.segmentation import SegmentationConfig

# A value unlike the default for every field. A new field without an entry here fails
# test_every_field_has_a_changed_value: add one, and the job round trip then covers it.
CHANGED = {
    "name": "renamed-job", "algorithm": {"SegmentationConfig": "fedprox", "ClassificationConfig": "fedavg"},
    "rounds": 3, "min_clients": 2, "epochs_per_round": 2, "max_steps": 7, "batch_size": 3, "lr": 0.0042,
    "weight_decay": 0.0003, "fedprox_mu": 0.2, "seed": 11, "num_threads": 1, "num_workers": 1, "device": "cpu",
    "amp": False, "he": True, "dp_epsilon": 5.0, "dp_noise_multiplier": 0.9, "dp_max_grad_norm": 2.0,
    "dp_delta": 1e-6, "client_dp_clip": 5.0, "client_dp_noise": 0.5, "aggregation": "median", "trim_fraction": 0.3,
    "krum_byzantine": 2, "guard": False, "guard_z": 5.0, "guard_flag_after": 2,
    "round_timeout": 45.0, "min_responses": 1, "dead_site_grace": 20.0, "min_trained_sites": 2,
    "dp_part": "all", "start_model": "sha256:" + "ab" * 32, "dp_ready": True,
    # segmentation
    "arch": "segresnet", "init_filters": 16, "dropout": 0.1, "spacing": (2.0, 2.5, 3.5), "roi_size": (32, 48, 64),
    "loss": "dicece", "val_sw_batch_size": 2, "val_overlap": 0.5, "ct_filters": 6,
    # classification
    "fusion": "attention", "streams": {"SegmentationConfig": ("mri", "ct"), "ClassificationConfig": ("mri",)},
    "embed_dim": 32, "channels": (8, 16, 32), "head_hidden": 16,
    "pool": "avg", "ct_mirror": False, "stream_loss": 0.0, "modality_dropout": 0.1, "spatial_size": (24, 32, 24), "augment": False, "class_weights": True,
}
CONFIGS = [SegmentationConfig, ClassificationConfig]
#: Changed values the config refuses together (with he the server only sums ciphertext: no robust
#: aggregation): changed() keeps the first of each pair at its default, changed(alt=True) the second.
EXCLUSIVE = (("aggregation", "he"),)
#: Changed values refused with several others (secagg: with he, and with any aggregation but fedavg): checked alone.
ALONE = {"secagg": True}


def changed(config_cls, alt: bool = False):
    out = {}
    for f in fields(config_cls):
        if f.name in ALONE:
            continue
        value = CHANGED[f.name]
        out[f.name] = value[config_cls.__name__] if isinstance(value, dict) else value
    for pair in EXCLUSIVE:
        out.pop(pair[1] if alt else pair[0])
    return config_cls(**out)


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_every_field_has_a_changed_value(config_cls):
    missing = [f.name for f in fields(config_cls) if f.name not in CHANGED and f.name not in ALONE]
    assert not missing, f"add a non-default value for {missing} to CHANGED"
    default, other, alt = config_cls(), changed(config_cls), changed(config_cls, alt=True)
    same = [f.name for f in fields(config_cls) if f.name not in ALONE
            and getattr(default, f.name) == getattr(other, f.name) == getattr(alt, f.name)]
    assert all(getattr(config_cls(**ALONE), k) == v != getattr(default, k) for k, v in ALONE.items())
    assert not same, f"CHANGED keeps the default of {same}"


@pytest.mark.parametrize("alt", [False, True])
@pytest.mark.parametrize("config_cls", CONFIGS)
def test_json_and_argument_round_trip(config_cls, alt):
    config = changed(config_cls, alt).replace(device="cuda:0  (spaces survive)")
    assert config_cls.from_json(config.to_json()) == config
    alone = config_cls(**ALONE)
    assert config_cls.from_json(alone.to_json()) == alone
    arg = config.to_argument()
    assert not any(ch.isspace() for ch in arg), "FLARE splits site-script arguments on whitespace"
    assert config_cls.from_json(arg) == config


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_unknown_or_invalid_settings_are_refused(config_cls):
    with pytest.raises(ValueError, match="unknown"):
        config_cls.from_dict({**config_cls().to_dict(), "lerning_rate": 1})
    with pytest.raises(ValueError, match="algorithm"):
        config_cls(algorithm="fedsgd")
    with pytest.raises(ValueError, match="rounds"):
        config_cls(rounds=0)


@pytest.mark.parametrize("alt", [False, True])
@pytest.mark.parametrize("config_cls", CONFIGS)
def test_command_line_flags_come_from_the_config(config_cls, alt):
    p = argparse.ArgumentParser()
    add_config_arguments(p, config_cls)
    assert config_from_arguments(config_cls, p.parse_args([])) == config_cls()  # no default declared twice
    target = changed(config_cls, alt)
    argv = []
    for f in fields(config_cls):
        value = getattr(target, f.name)
        if isinstance(value, bool):
            argv.append(f"--{f.name}" if value else f"--no-{f.name}")
        elif isinstance(value, tuple):
            argv += [f"--{f.name}", *map(str, value)]
        else:
            argv += [f"--{f.name}", str(value)]
    assert config_from_arguments(config_cls, p.parse_args(argv)) == target


def test_server_and_site_build_the_same_network():
    """The spec the server persistor instantiates is the config's own; same seed, same weights."""
    import torch

    from fedbrain.models import instantiate

    for config in (SegmentationConfig(seed=3), ClassificationConfig(seed=3)):
        a, b = instantiate(config.model_spec()).state_dict(), config.build_model().state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        c = config.replace(seed=4).build_model().state_dict()
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("config_cls", CONFIGS)
@pytest.mark.parametrize("change,why", [({"he": True}, "cannot also decrypt"),
                                        ({"algorithm": "scaffold"}, "SCAFFOLD's control variates"),
                                        ({"aggregation": "median"}, "combine other than by a weighted average"),
                                        ({"guard": True}, "the server never sees one")])
def test_secagg_refuses_what_would_need_each_sites_update(config_cls, change, why):
    """The server learns only the masked sum: decryption, SCAFFOLD controls (unmasked in meta), robust
    aggregation and the update guard would each need one site's update, so the config refuses them."""
    if change.get("algorithm") == "scaffold" and "scaffold" not in config_cls.ALGORITHMS:
        pytest.skip("no SCAFFOLD for this task")
    with pytest.raises(ValueError, match=why):
        config_cls(secagg=True, **change)
