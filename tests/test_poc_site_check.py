"""`fedbrain site check` and `fedbrain status` against a real running POC consortium (slow: marked poc).

The non-POC tests (test_site_check.py, test_site_ops.py) cover each fault with a stand-in server;
this one checks that a healthy POC site passes with FLARE's real server on the other end, and
that an admin kit sees the three sites connected."""

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


def test_site_check_and_status_on_a_running_poc(tmp_path, capsys):
    run_dir = tmp_path / "poc"
    poc = PocConsortium(run_dir)
    try:
        assert cli_main(["poc", "up", "--run-dir", str(run_dir), "--cases", "3"]) == 0
        capsys.readouterr()
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
