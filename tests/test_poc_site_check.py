"""A data scientist's POC session through the CLI, on one real consortium (slow: marked poc):
`fedbrain poc up | status | down`, `fedbrain site check` and `fedbrain status` / `watch`.

The non-POC tests (test_site_check.py, test_site_ops.py) cover each fault with a stand-in server;
this one checks that a healthy POC site passes with FLARE's real server on the other end, that an
admin kit sees the three sites connected, and that `down` leaves nothing running. (One consortium
for all of it: each POC start and stop costs ~20 s of the suite's 25 minutes.)"""

from __future__ import annotations

import json
import sys
from io import StringIO

import pytest
from rich.console import Console

from fedbrain.cli import main as cli_main
from fedbrain.ops import site_check as sc
from fedbrain.ops.status import consortium_status
from fedbrain.jobs.segmentation import export
from fedbrain.ops.status import watch
from fedbrain.poc.consortium import PocConsortium
from fedbrain.tasks.segmentation import SegmentationConfig

pytestmark = pytest.mark.poc


def test_poc_cli_site_check_and_status_on_a_running_poc(tmp_path, capsys):
    run_dir = tmp_path / "poc"
    poc = PocConsortium(run_dir)
    try:
        # a long start timeout: this lane starts its consortium while the shared POC's first wave loads the machine
        assert cli_main(["poc", "up", "--run-dir", str(run_dir), "--cases", "3", "--start-timeout", "420"]) == 0
        capsys.readouterr()
        assert cli_main(["poc", "status", "--run-dir", str(run_dir)]) == 0
        out = capsys.readouterr().out
        status = json.loads(out[out.index("{"):])
        assert status["running"] and status["server"] == "up"
        assert status["sites"] == {s: "connected" for s in poc.sites}
        # every site was pointed at its own synthetic datalist
        for site in poc.sites:
            cfg = json.loads((poc.kit(site) / "local" / "fedbrain_site.json").read_text())
            assert cfg["datalist"].endswith(f"data/{site}/datalist.json")
        # `up` again must not re-provision under the running processes (new certificates)
        root_ca = (poc.kit("hospital-a") / "startup" / "rootCA.pem").read_bytes()
        assert cli_main(["poc", "up", "--run-dir", str(run_dir)]) == 1
        assert "already running" in capsys.readouterr().out
        assert (poc.kit("hospital-a") / "startup" / "rootCA.pem").read_bytes() == root_ca
        for site in poc.sites:
            check = sc.run_site_check(poc.kit(site), python=sys.executable)
            rows = {r.check: r for r in check.rows}
            assert check.ok, [r for r in check.rows if r.status == sc.FAIL]
            assert rows["server TLS"].status == sc.OK
            assert rows["FLARE preflight-check"].status == sc.WARN  # the site runs: FLARE's dry run is skipped
            assert rows["data"].status == sc.OK
        status = consortium_status(poc.kit(poc.admin), timeout=30)
        assert sorted(s["name"] for s in status["sites"]) == sorted(poc.sites)
        assert cli_main(["status", "--admin-kit", str(poc.kit(poc.admin)), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["user"] == poc.admin
        # `fedbrain watch` follows a real 2-round job to its end, showing each site's round metrics.
        job = export(SegmentationConfig(rounds=2, epochs_per_round=1, max_steps=2), tmp_path / "jobs")
        sess = poc.session()
        try:
            job_id = sess.submit_job(str(job))
        finally:
            sess.close()
        screen = StringIO()
        last = watch(poc.kit(poc.admin), job=job_id, interval=2.0, console=Console(file=screen, width=160),
                     timeout=30, polls=200)
        assert [j["status"] for j in last["jobs"]] == ["FINISHED:COMPLETED"]
        shown = screen.getvalue()
        assert "per site, latest round received" in shown and "val_dice" in shown, shown[-3000:]
    finally:
        assert cli_main(["poc", "down", "--run-dir", str(run_dir)]) == 0
    assert poc.pids() == []
    assert (poc.kit("hospital-a") / "startup" / "rootCA.pem").is_file()  # `down` keeps the kits
    assert cli_main(["poc", "status", "--run-dir", str(run_dir)]) == 1
    assert cli_main(["poc", "down", "--run-dir", str(run_dir), "--remove"]) == 0
    assert not poc.workspace.exists()
