"""`fedbrain poc up | status | down` as a user runs them: a real consortium, then nothing left."""

import json

import pytest

from fedbrain.cli import main as cli_main
from fedbrain.poc.consortium import PocConsortium

pytestmark = pytest.mark.poc


def test_poc_up_status_down(tmp_path, capsys):
    run_dir = tmp_path / "poc"
    try:
        assert cli_main(["poc", "up", "--run-dir", str(run_dir), "--cases", "3"]) == 0
        capsys.readouterr()
        assert cli_main(["poc", "status", "--run-dir", str(run_dir)]) == 0
        out = capsys.readouterr().out
        status = json.loads(out[out.index("{"):])
        assert status["running"] and status["server"] == "up"
        assert status["sites"] == {s: "connected" for s in ("hospital-a", "hospital-b", "hospital-c")}
        # every site was pointed at its own synthetic datalist
        for site in status["sites"]:
            cfg = json.loads((PocConsortium(run_dir).kit(site) / "local" / "fedbrain_site.json").read_text())
            assert cfg["datalist"].endswith(f"data/{site}/datalist.json")
        # `up` again must not re-provision under the running processes (new certificates)
        root_ca = (PocConsortium(run_dir).kit("hospital-a") / "startup" / "rootCA.pem").read_bytes()
        capsys.readouterr()
        assert cli_main(["poc", "up", "--run-dir", str(run_dir)]) == 1
        assert "already running" in capsys.readouterr().out
        assert (PocConsortium(run_dir).kit("hospital-a") / "startup" / "rootCA.pem").read_bytes() == root_ca
    finally:
        assert cli_main(["poc", "down", "--run-dir", str(run_dir)]) == 0
    poc = PocConsortium(run_dir)
    assert poc.pids() == []
    assert (poc.kit("hospital-a") / "startup" / "rootCA.pem").is_file()  # `down` keeps the kits
    assert cli_main(["poc", "status", "--run-dir", str(run_dir)]) == 1
    assert cli_main(["poc", "down", "--run-dir", str(run_dir), "--remove"]) == 0
    assert not poc.workspace.exists()
