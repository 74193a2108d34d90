"""The personal head: removed from what a site sends, kept on the site's disk across jobs."""

import re

import numpy as np
import pytest
import torch

from fedbrain.models.classifier import build_classifier, head_parameter_names
from fedbrain.fl.personal import PersonalHeadStore, site_workspace


def test_head_store_round_trip_and_survives_a_new_model(tmp_path):
    kit = tmp_path / "hospital-a"
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    job_dir = kit / "job-1" / "app_hospital-a"
    job_dir.mkdir(parents=True)
    assert site_workspace(job_dir) == kit
    store = PersonalHeadStore.for_site("fedbrain_classification", start=job_dir)
    assert store.path == kit / "personal" / "fedbrain_classification" / "head.pt"

    torch.manual_seed(0)
    trained = build_classifier()
    assert store.load_into(trained) is None  # first round ever: nothing stored
    store.save_from(trained, job_id="job-1", round_no=3)

    torch.manual_seed(1)
    fresh = build_classifier()  # e.g. the next job, another process
    head = head_parameter_names(fresh)
    assert not all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in head)
    origin = store.load_into(fresh)
    assert origin == {"job_id": "job-1", "round_no": 3}
    assert all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in head)
    shared = [k for k in fresh.state_dict() if k not in head]
    assert not all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in shared)


def test_head_store_refuses_a_head_of_another_shape(tmp_path):
    """Our own message (store, site, tensor, both shapes), not torch's generic size error; nothing copied."""
    kit = tmp_path / "hospital-a"
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    store = PersonalHeadStore.for_site("fedbrain_classification", start=kit)
    torch.manual_seed(0)
    old = build_classifier(head_hidden=16)
    store.save_from(old)
    torch.manual_seed(1)
    new = build_classifier(head_hidden=32)
    head = head_parameter_names(new)
    before = {k: new.state_dict()[k].clone() for k in head}
    with pytest.raises(ValueError) as info:
        store.load_into(new)
    message = str(info.value)
    assert message.startswith(f"{store.path} (site hospital-a): ")
    assert "stored head tensor head.0.weight has shape (16, 64), this model expects (32, 64)" in message
    assert "move it away" in message
    assert all(torch.equal(new.state_dict()[k], before[k]) for k in head)

    # A head of another class count: head.0.* fit, head.2.* do not. Outside a site workspace the
    # message names the bare path, and the tensors that fit must not have been copied either.
    bare = PersonalHeadStore(tmp_path / "elsewhere" / "head.pt")
    torch.manual_seed(2)
    bare.save_from(build_classifier(num_classes=2))
    torch.manual_seed(3)
    three = build_classifier()
    before = {k: three.state_dict()[k].clone() for k in head_parameter_names(three)}
    expected = f"{bare.path}: stored head tensor head.2.weight has shape (2, 32), this model expects (3, 32): "
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        bare.load_into(three)
    assert all(torch.equal(three.state_dict()[k], before[k]) for k in before)


def test_scaffold_controls_cover_the_shared_part_only():
    """A control difference is the local update in disguise: it must never cover the personal head."""
    import copy

    from fedbrain.fl.exchange import SharedScaffold

    torch.manual_seed(0)
    model = build_classifier("masked_mean", channels=(8, 16), embed_dim=16, head_hidden=8)
    head = set(head_parameter_names(model))
    scaffold = SharedScaffold(model, lr=0.1)
    assert not head & set(scaffold.names())
    assert set(scaffold.names()) == {n for n, _ in model.named_parameters() if n not in head}
    idle = scaffold.end_round(model)  # no steps taken: zero control change for every shared parameter
    assert set(idle) == set(scaffold.names()) and all(not v.any() for v in idle.values())

    start = copy.deepcopy(model)
    controls = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}  # server's c_global, head too
    scaffold.begin_round(controls)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaffold.after_step()  # no gradient step: only the correction -lr * (c_global - c_local) is applied
    for name, p in model.named_parameters():
        expected = before[name] if name in head else before[name] - 0.1 * 0.5
        assert torch.allclose(p, expected), name
    delta = scaffold.end_round(start)
    assert set(delta) == set(scaffold.names())
    # The drift was exactly the correction, so the new local control equals the old one (zero).
    assert all(np.allclose(v, 0.0, atol=1e-5) for v in delta.values())

    # A real step on data: the controls now record a drift.
    scaffold.begin_round(controls)
    start = copy.deepcopy(model)
    loss = model(torch.randn(2, 4, 8, 8, 8), torch.randn(2, 2, 8, 8, 8)).square().sum()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    scaffold.after_step()
    delta = scaffold.end_round(start)
    assert max(float(np.abs(v).max()) for v in delta.values()) > 1e-3


def test_a_mixed_job_keeps_its_correction_apart_from_a_whole_head(tmp_path):
    """Under algorithm mixed the personal head corrects a shared one: a job of the same name of the other kind
    must neither load it as a whole head nor overwrite that site's whole head."""
    kit = tmp_path / "hospital-a"
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    whole = PersonalHeadStore.for_site("fedbrain_classification", start=kit)
    correction = PersonalHeadStore.for_site("fedbrain_classification", start=kit, correction=True)
    assert whole.path.parent == correction.path.parent and whole.path != correction.path
    torch.manual_seed(0)
    personal = build_classifier()
    whole.save_from(personal, job_id="job-1")
    mixed = build_classifier(shared_head=True, init_seed=1)
    assert correction.load_into(mixed) is None  # not the whole head of job-1
    assert float(mixed.head[-1].weight.abs().sum()) == 0.0  # still adds nothing
    correction.save_from(mixed, job_id="job-2")
    again = build_classifier()
    assert whole.load_into(again) == {"job_id": "job-1"}
    assert all(torch.equal(again.state_dict()[k], personal.state_dict()[k]) for k in head_parameter_names(again))
