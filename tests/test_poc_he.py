"""Encrypted aggregation in a real POC (real kits and keys), checked on what really happened: what
the server received, what its kit and disk hold. The jobs run in the shared POC's first wave."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbrain.models.classifier import head_parameter_names
from fedbrain.tasks.classification import ClassificationConfig

pytestmark = pytest.mark.poc

SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def he_jobs(shared_poc, first_wave):
    """The encrypted classifier (2 rounds) and segmentation (1 round) jobs of the shared POC's first wave."""
    poc = shared_poc.poc
    (cls_meta, cls_result, _), (seg_meta, seg_result, _) = first_wave["he_cls"], first_wave["he_seg"]
    return {
        "poc": poc, "cls_meta": cls_meta, "cls_result": cls_result, "seg_meta": seg_meta, "seg_result": seg_result,
        "heads": {s: (poc.kit(s) / "personal" / "poc_he_classification" / "head.pt").is_file() for s in SITES},
        "server_files": sorted(p.name for p in poc.kit("localhost").rglob("*.tenseal")),
        "server_context": (poc.kit("localhost") / "startup" / "server_context.tenseal").read_bytes(),
        "client_context": (poc.kit("hospital-a") / "startup" / "client_context.tenseal").read_bytes(),
    }


def _received(result: Path) -> list[dict]:
    return [json.loads(line) for line in (result / "workspace" / "received_updates.jsonl").read_text().splitlines()]


def test_encrypted_jobs_complete(he_jobs):
    assert he_jobs["cls_meta"]["status"] == "FINISHED:COMPLETED"
    assert he_jobs["seg_meta"]["status"] == "FINISHED:COMPLETED"


def test_server_received_only_ciphertext_and_no_head(he_jobs):
    head = set(head_parameter_names(ClassificationConfig().build_model()))
    for key, rounds in (("cls_result", 2), ("seg_result", 1)):
        entries = _received(he_jobs[key])
        assert len(entries) == 3 * rounds, key
        for e in entries:
            assert e["data_kind"] == "WEIGHT_DIFF"
            assert e["params"] and {p["dtype"] for p in e["params"].values()} == {"CKKSVector"}, e["site"]
            values = sum(int(np.prod(p["shape"])) for p in e["params"].values())
            assert e["bytes"] > 4 * values  # ciphertext is larger than the fp32 values it hides
            if key == "cls_result":
                assert not head & set(e["params"]), f"{e['site']} sent its head"
    assert all(he_jobs["heads"].values()), "each hospital keeps its head on its own disk"


def test_report_shows_what_crossed_the_wire_and_he_timings(he_jobs):
    from fedbrain.report.job_report import build_report

    report = build_report(he_jobs["cls_result"])
    updates = report["exchange"]["updates"]
    assert len(updates) == 6 and all(u["encrypted"] and u["bytes"] > 0 for u in updates)
    assert all(u["encrypt_s"] is not None and u["encrypt_s"] > 0 for u in updates)
    # round 0's global model is the plaintext initial one; from round 1 on every site decrypts
    assert all(u["decrypt_s"] > 0 for u in updates if u["round"] == 1)
    assert [a["round"] for a in report["exchange"]["he_aggregation"]] == [0, 1]
    assert all(a["updates"] == 3 for a in report["exchange"]["he_aggregation"])


def test_server_holds_no_secret_key_and_cannot_read_its_global_model(he_jobs):
    import tenseal as ts

    assert he_jobs["server_files"] == ["server_context.tenseal"]
    server_ctx = ts.context_from(he_jobs["server_context"])
    assert not server_ctx.has_secret_key()
    client_ctx = ts.context_from(he_jobs["client_context"])
    assert client_ctx.has_secret_key()
    saved = torch.load(next((he_jobs["cls_result"] / "workspace" / "app_server").glob("FL_global_model.pt")),
                       weights_only=False)["model"]
    encrypted = {k: v for k, v in saved.items() if isinstance(v, bytes)}
    head = set(head_parameter_names(ClassificationConfig().build_model()))
    assert encrypted and not head & set(encrypted)  # the shared part is ciphertext; the head never came
    name, blob = next(iter(encrypted.items()))
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server_ctx, blob).decrypt()
    values = np.asarray(ts.ckks_vector_from(client_ctx, blob).decrypt())  # a hospital can
    expected = ClassificationConfig().build_model().state_dict()[name].numel()
    assert values.size == expected and np.isfinite(values).all()
