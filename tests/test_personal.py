"""The personal head: removed from what a site sends, kept on the site's disk across jobs."""

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.filters.exclude_vars import ExcludeVars

from fedbrain.models.classifier import build_classifier, head_parameter_names
from fedbrain.training.personal import PersonalHeadStore, site_workspace


def test_exclude_vars_with_the_head_list_removes_only_the_head():
    model = build_classifier()
    head = head_parameter_names(model)
    update = {k: v.clone() for k, v in model.state_dict().items()}
    dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=update)
    out = ExcludeVars(exclude_vars=head).process_dxo(dxo, dxo.to_shareable(), FLContext())
    assert not set(out.data) & set(head)
    assert set(out.data) == set(model.state_dict()) - set(head)


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
    store = PersonalHeadStore(tmp_path / "head.pt")
    store.save_from(build_classifier(head_hidden=16))
    try:
        store.load_into(build_classifier(head_hidden=32))
    except (ValueError, RuntimeError) as e:
        assert "head" in str(e) or "size" in str(e)
    else:
        raise AssertionError("a mismatched head was loaded")
