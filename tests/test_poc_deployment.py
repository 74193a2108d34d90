"""A real (non-POC) deployment: production kits from `fedbrain provision`, each started with its
own start.sh, a job through the admin API, and the kits a hospital must not be able to start."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from fedbrain.fl.site import write_site_config
from fedbrain.jobs.segmentation import export
from fedbrain.poc.consortium import processes_under
from fedbrain.poc.runner import submit_and_wait
from fedbrain.synthetic.cohort import synthesize_consortium
from fedbrain.tasks.segmentation import SegmentationConfig

from deployment import Deployment

pytestmark = pytest.mark.poc


def _log_line(kit: Path, needle: str, timeout: float = 60) -> str:
    """The first line of the kit's log.txt containing ``needle``, waiting up to ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = kit / "log.txt"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        time.sleep(1)
    seen = (kit / "log.txt").read_text(errors="replace")[-2000:] if (kit / "log.txt").exists() else "(no log.txt)"
    raise AssertionError(f"'{needle}' not in {kit}/log.txt after {timeout:.0f} s; it holds:\n{seen}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    dep = Deployment(root)
    dep.provision()
    # The consortium's server would accept code (FLARE's default for its admin): the sites' own
    # policies must be what refuses a job that carries it.
    server_authz = dep.kit("localhost") / "local" / "authorization.json"
    policy = json.loads(server_authz.read_text())
    policy["permissions"]["project_admin"]["byoc"] = "any"
    server_authz.write_text(json.dumps(policy))
    data = root / "data"
    synthesize_consortium(data, sites=len(dep.sites), cases=6, seed=3, site_names=dep.sites, progress=False)
    for site in dep.sites:  # what each hospital's IT does: say where its data is, in its own kit
        write_site_config(dep.kit(site), data / site / "datalist.json", num_threads=1, min_validation_cases=1)
    out = {"dep": dep, "root": root}
    try:
        dep.start(dep.kit("localhost"))
        for site in dep.sites:
            dep.start(dep.kit(site))
        dep.wait_for_sites(dep.sites)
        # Encrypted: the template's hospital-c releases updates only under encryption (scope `encrypted`).
        config = SegmentationConfig(rounds=1, epochs_per_round=1, max_steps=2, min_clients=len(dep.sites), he=True)
        job = export(config, root / "jobs")
        out["job"] = job
        out["meta"], out["result"] = submit_and_wait(dep, job, rounds=1, result_dir=root / "result")
        out["negative"] = _negative_cases(dep, root, job)
        out["restart"] = _server_killed_mid_job(dep, root)
        yield out
    finally:
        dep.stop()
        assert processes_under(root) == []


def _negative_cases(dep: Deployment, root: Path, job: Path) -> dict:
    found = {}
    # A job that carries code: every kit grants `byoc` to nobody, the project admin included.
    byoc = Path(shutil.copytree(job, root / "byoc_job" / job.name))
    (byoc / "app" / "custom").mkdir(parents=True)
    (byoc / "app" / "custom" / "extra.py").write_text("print('custom code')\n")
    sess = dep.session()
    try:
        try:
            job_id = sess.submit_job(str(byoc))
            deadline = time.time() + 120
            while time.time() < deadline:
                meta = sess.get_job_meta(job_id)
                if meta.get("status", "").startswith("FINISHED") or meta.get("status") in ("FAILED", "ABORTED"):
                    break
                time.sleep(3)
            found["byoc"] = ("ran", meta)
        except Exception as e:  # noqa: BLE001 - the refusal is what we want to see
            found["byoc"] = ("refused", str(e))
    finally:
        sess.close()

    # A site kit from another consortium (its own root CA), pointed at this server.
    other = Deployment(root / "other", project_name="other_consortium")

    def same_server(project):
        server = next(p for p in project["participants"] if p["type"] == "server")
        mine = next(p for p in dep.project["participants"] if p["type"] == "server")
        server["fed_learn_port"], server["admin_port"] = mine["fed_learn_port"], mine["admin_port"]

    other.provision(edit=same_server)
    foreign = other.kit("hospital-a")
    # An edited kit file, and a corrupted certificate, each in a copy of a real site kit.
    edited = Path(shutil.copytree(dep.kit("hospital-b"), root / "edited" / "hospital-b", symlinks=True))
    cfg = edited / "startup" / "fed_client.json"
    cfg.write_text(cfg.read_text().replace('"mtls"', '"tls"'))
    corrupted = Path(shutil.copytree(dep.kit("hospital-c"), root / "corrupted" / "hospital-c", symlinks=True))
    crt = bytearray((corrupted / "startup" / "client.crt").read_bytes())
    crt[300] ^= 0x21
    (corrupted / "startup" / "client.crt").write_bytes(bytes(crt))
    for name, kit in (("foreign", foreign), ("edited", edited), ("corrupted", corrupted)):
        for stale in ("log.txt", "daemon_pid.fl", "pid.fl"):
            (kit / stale).unlink(missing_ok=True)
        started = time.time()
        dep.start(kit)
        line = _log_line(kit, "REFUSED", timeout=60)
        found[name] = {"line": line, "seconds": time.time() - started}
        time.sleep(3)
        found[name]["flare_started"] = any("nvflare.private.fed.app" in _cmd(p) for p in processes_under(kit))
    found["joined"] = _a_hospital_joins_with_a_key_it_made(dep, root)
    server_name = next(p["name"] for p in dep.project["participants"] if p["type"] == "server")
    found["server_log"] = (dep.kit(server_name) / "log.txt").read_text(errors="replace")
    sess = dep.session()
    try:
        found["connected"] = sorted(c.name for c in sess.get_system_info().client_info)
    finally:
        sess.close()
    return found


def _a_hospital_joins_with_a_key_it_made(dep: Deployment, root: Path) -> dict:
    """hospital-d joins the running consortium by distributed provisioning: its key made in its own folder,
    only the request and the signed certificate crossing, its kit assembled there and started."""
    from fedbrain.ops import distributed
    from fedbrain.ops.kit import root_fingerprint

    project = json.loads(json.dumps(dep.project))
    project["participants"].append({"name": "hospital-d", "type": "client", "org": "hospital_d"})
    consortium_side, hospital_side = dep.kits.parent, root / "hospital-d-machine"
    (consortium_side.parent / "project-with-d.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    hospital_side.mkdir()
    (hospital_side / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))  # a project file: no secret
    request, key = distributed.request_kit(hospital_side / "project.yml", hospital_side / "request", name="hospital-d",
                                           env=dep.env())
    signed = distributed.approve_request(shutil.copy(request, consortium_side), consortium_side,
                                         consortium_side.parent / "project-with-d.yml", env=dep.env())
    kit = distributed.package_kit(shutil.copy(signed, hospital_side), hospital_side / "request",
                                  hospital_side / "kits", root_fingerprint(dep.kit("localhost")), env=dep.env())
    dep.start(kit)
    dep.wait_for_sites(["hospital-d"], timeout=90)
    key_pem = key.read_bytes()
    return {"kit": kit, "key": key_pem, "kit_key": (kit / "startup" / "client.key").read_bytes(),
            "key_mode": (kit / "startup" / "client.key").stat().st_mode & 0o777,
            "consortium_files_with_key": [str(f) for f in consortium_side.rglob("*")
                                          if f.is_file() and key_pem.strip() in f.read_bytes()],
            "crossed": {z.name: z.read_bytes() for z in (request, signed)}}


def _server_killed_mid_job(dep: Deployment, root: Path) -> dict:
    """A plaintext job on the shipped template (hospital-c's default scope refuses plaintext; hospital-d, which joined
    above, has no data yet), then the server's FLARE process tree killed after round 0 was saved. Its kit's start
    script brings it back; nothing is typed; the restarted server continues the job by itself."""
    import os
    import signal

    from fedbrain.contracts import CHECKPOINT_NOTE
    from fedbrain.report.job_report import build_report
    from fedbrain_testing.faults import _descendants, flare_pid, resumed_job_of

    config = SegmentationConfig(name="restart_mid_job", rounds=3, epochs_per_round=1, max_steps=1, min_clients=2,
                                min_responses=2, min_trained_sites=2, round_timeout=60)
    sess = dep.session()
    try:
        job_id = sess.submit_job(str(export(config, root / "jobs-restart")))
    finally:
        sess.close()
    note = dep.kit("localhost") / job_id / CHECKPOINT_NOTE
    deadline = time.time() + 240
    while not note.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert note.exists(), f"round 0 of {job_id} was not saved in 240 s"
    parent = flare_pid(dep, "localhost")
    for pid in [parent, *_descendants(parent)]:  # the server process and its job: the start script stays
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    resumed = resumed_job_of(dep, job_id, timeout=240)
    assert resumed, f"the restarted server did not continue {job_id}"
    sess = dep.session()
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            meta = sess.get_job_meta(resumed["job_id"])
            if meta.get("status", "").startswith("FINISHED"):
                break
            time.sleep(2)
        old = sess.get_job_meta(job_id)
        path = Path(sess.download_job_result(resumed["job_id"], str(root / "result-restart")))
    finally:
        sess.close()
    return {"job_id": job_id, "resumed": resumed, "meta": meta, "old_status": old.get("status"),
            "seconds": time.time() - killed_at, "report": build_report(path),
            "server_log": (dep.kit("localhost") / "log.txt").read_text(errors="replace")}


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_job_completes_on_production_kits(deployed):
    meta = deployed["meta"]
    assert meta["status"] == "FINISHED:COMPLETED"
    assert sorted(d.split(":")[0] for d in meta["job_deploy_detail"]) == ["hospital-a", "hospital-b", "hospital-c", "server"]
    for site in deployed["dep"].sites:
        assert "kit verified" in (deployed["dep"].kit(site) / "log.txt").read_text()


def test_the_job_carried_no_code_and_the_server_stored_it_where_told(deployed):
    assert not list(Path(deployed["job"]).rglob("custom"))
    assert any((deployed["root"] / "server-storage" / "jobs-storage").iterdir())


def test_a_job_carrying_code_is_refused_by_each_site(deployed):
    outcome, meta = deployed["negative"]["byoc"]
    assert outcome == "ran" and meta["status"] != "FINISHED:COMPLETED", meta
    detail = meta["job_deploy_detail"]
    for site in deployed["dep"].sites:
        assert f"{site}: NVFLARE_ERROR: BYOC not permitted" in detail, detail
    assert "server: OK" in detail  # the server allowed it (the test set that): the sites refused


def test_a_foreign_kit_is_refused_in_its_log_within_60s(deployed):
    neg = deployed["negative"]["foreign"]
    assert neg["seconds"] < 60 and "did not issue" in neg["line"], neg
    assert not neg["flare_started"]
    assert "hospital-a" in deployed["negative"]["connected"]  # the real hospital-a; no second one joined
    # the server's own log says who tried and why (FLARE alone logs nothing for a failed handshake)
    lines = [line for line in deployed["negative"]["server_log"].splitlines() if "TLS handshake from" in line]
    assert lines and "another consortium" in lines[0], deployed["negative"]["server_log"][-3000:]


def test_an_edited_kit_is_refused_at_start_naming_the_file(deployed):
    neg = deployed["negative"]["edited"]
    assert "startup/fed_client.json: edited since provisioning" in neg["line"], neg
    assert not neg["flare_started"]


def test_a_corrupted_certificate_is_a_clear_error_not_a_hang(deployed):
    neg = deployed["negative"]["corrupted"]
    assert "startup/client.crt" in neg["line"] and neg["seconds"] < 60, neg
    assert not neg["flare_started"]


def test_a_hospital_joins_with_a_key_that_never_left_it(deployed):
    """Distributed provisioning, end to end: hospital-d's key is the one it made, in no file on the consortium's
    side, in neither zip that crossed; its own kit passed the kit check and the server admitted it."""
    joined = deployed["negative"]["joined"]
    assert "hospital-d" in deployed["negative"]["connected"]
    assert joined["kit_key"] == joined["key"] and joined["key_mode"] == 0o600
    assert joined["consortium_files_with_key"] == []
    for name, content in joined["crossed"].items():
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            assert not [m for m in zf.namelist() if b"PRIVATE KEY" in zf.read(m)], name
    log = (joined["kit"] / "log.txt").read_text()
    assert "kit verified" in log, log[-2000:]


def test_a_server_killed_mid_job_comes_back_and_continues_the_job_by_itself(deployed):
    """Nothing typed: the kit's start script restarts the server, which continues the job from the round it saved;
    hospital-c (default scope `encrypted`) refused the plaintext job without ending it, and the report says so."""
    r = deployed["restart"]
    assert r["meta"]["status"] == "FINISHED:COMPLETED", r["meta"]
    assert r["old_status"] == "FINISHED:ABNORMAL" and r["resumed"]["after_round"] == 0
    assert f"fedbrain: job {r['job_id']} was interrupted by a server restart after round 0" in r["server_log"]
    rounds = sorted({x["round"] for site in r["report"]["sites"].values() for x in site["rounds"]})
    assert rounds == [1, 2], rounds  # the rounds left, none trained twice
    refused = {x["site"]: x["reason"] for x in r["report"]["exchange"]["refused"]}
    assert "requires encrypted model updates" in refused.get("hospital-c", ""), refused


def test_site_logs_stay_at_the_site(deployed):
    """Log streaming is off in the template: the server holds no ERRORLOG from any site."""
    store = deployed["root"] / "server-storage" / "jobs-storage"
    assert not [p for p in store.rglob("ERRORLOG_*")]
    for site in deployed["dep"].sites:
        res = json.loads((deployed["dep"].kit(site) / "local" / "resources.json").read_text())
        assert res["allow_log_streaming"] is False
