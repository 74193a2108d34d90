"""Secure aggregation in a real POC (the shared consortium's first wave): signed keys, shares and masks through
FLARE's server; what the server received, kept by a curious server filter, is each site's masked vector and nothing
else; a site whose job process dies after the key setup and before its masked update costs no round (the same job);
a server that swaps a site's key gets nothing and the job ends with each site's reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from fedbrain.contracts import AUDIT_FILE, SECAGG_MASKED
from fedbrain.report.job_report import build_report
from fedbrain_testing.faults import round_record, server_log

pytestmark = pytest.mark.poc

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def secagg_jobs(first_wave):
    """The first wave's two secure-aggregation jobs (tests/poc_shared.py): name -> (meta, result)."""
    return {name: first_wave[f"secagg_{name}"][:2] for name in ("lost", "swapped")}


def test_the_server_receives_only_masked_vectors_that_look_uniform(secagg_jobs):
    meta, result = secagg_jobs["lost"]
    assert meta["status"] == "FINISHED:COMPLETED", meta
    kept = sorted((result / "workspace" / "curious_server").glob("*.npz"))
    assert [p.name for p in kept] == [f"{s}_round{r}.npz" for s in SITES[:2] for r in (0, 1)]  # hospital-c died
    for path in kept:
        with np.load(path) as arrays:
            assert list(arrays) == [SECAGG_MASKED], (path.name, list(arrays))
            masked = arrays[SECAGG_MASKED]
        assert masked.dtype == np.uint32 and masked.size == 65536
        counts = np.bincount((masked >> 24).astype(np.int64), minlength=256)  # top byte of every value
        assert stats.chisquare(counts).pvalue > 1e-4, path.name
    audit = [json.loads(line) for line in (result / "workspace" / AUDIT_FILE).read_text().splitlines()]
    assert {e["site"] for e in audit} == set(SITES[:2])
    assert all(list(e["params"]) == [SECAGG_MASKED] and e["l2_norm"] is None for e in audit), audit[0]
    updates = build_report(result)["exchange"]["updates"]  # what the admin's report says they crossed as
    assert updates and all(u["masked"] and not u["encrypted"] for u in updates), updates


def test_a_site_lost_after_the_key_setup_costs_no_round(secagg_jobs):
    meta, result = secagg_jobs["lost"]
    assert meta["status"] == "FINISHED:COMPLETED", meta
    rounds = round_record(result)
    assert [r["round"] for r in rounds] == [0, 1] and all(r["published"] for r in rounds), rounds
    assert rounds[0]["aggregated"] == ["hospital-a", "hospital-b"] or sorted(rounds[0]["aggregated"]) == ["hospital-a", "hospital-b"]
    log = server_log(result)
    assert "round 0: unmasked the sum of ['hospital-a', 'hospital-b']; removed the masks of ['hospital-c']" in log
    assert "masking group ['hospital-a', 'hospital-b', 'hospital-c'], threshold 2" in log


def test_a_server_that_swaps_a_key_gets_no_share_and_the_job_ends_with_the_reason(secagg_jobs):
    """The server put its own masking key in place of hospital-c's: every site finds hospital-c's signature does
    not cover it, shares nothing, and the job ends at the setup with each site's one-line reason in the server log."""
    meta, result = secagg_jobs["swapped"]
    assert meta["status"] != "FINISHED:COMPLETED", meta
    log = server_log(result) if result else ""
    for site in SITES:
        assert (f"site {site}: secure aggregation refused in job {meta['job_id']} (secagg_share): the keys advertised "
                f"for 'hospital-c' do not carry its signature: the server (or someone on the way) changed them") in log
    assert "secure aggregation: setup failed: only 0 of 3 sites shared their keys" in log
    assert not round_record(result)  # no round ran
