"""Hostile config-only jobs against real POC sites (issue 25's catalogue starts here): a job naming a
fedbrain function instead of a class is refused at every site by the exact class allow-list, and no
site's local/ or privacy ledger changes (hashes before and after, on the sites' disks)."""

import pytest

from poc_shared import HOSTILE_COMPONENT

pytestmark = pytest.mark.poc


@pytest.fixture(scope="module")
def hostile(shared_poc, first_wave):
    meta, result, _ = first_wave["hostile_function"]
    server_log = (shared_poc.poc.kit("localhost") / "log.txt").read_text(errors="replace")
    return {"meta": meta, "result": result, "server_log": server_log, "shared": shared_poc}


def test_the_job_naming_a_fedbrain_function_never_ran(hostile):
    assert hostile["meta"]["status"] != "FINISHED:COMPLETED", hostile["meta"]


def test_every_site_refused_it_naming_the_component(hostile):
    """The reason reaches the admin: each site's refusal names the function's path."""
    detail = " ".join(map(str, hostile["meta"].get("job_deploy_detail", [])))
    text = detail + hostile["server_log"]
    assert HOSTILE_COMPONENT["path"] in text, (detail, hostile["server_log"][-3000:])
    assert "allow_list" in text or "not allowed" in text or "not authorized" in text


def test_no_sites_local_settings_or_ledger_changed(hostile):
    shared = hostile["shared"]
    before, after = shared.local_state_before_wave, shared.local_state_after_wave
    assert before and before == after
    for site in shared.sites:
        assert "/tmp/hostile" not in (shared.poc.kit(site) / "local" / "fedbrain_site.json").read_text()
