"""A user error gets one line naming the file and the reason, and exit code 2: never a traceback."""

import json

from fedbrain.cli import main


def _said(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())  # the console wraps long lines


def test_report_on_a_folder_that_is_no_job_result(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    out = _said(capsys)
    assert "is this a downloaded job result" in out and "Traceback" not in out


def test_central_training_on_a_bad_datalist(tmp_path, capsys):
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [{"image": ["t1.nii.gz"]}]}))
    assert main(["train", "--central", str(dl), "--task", "segment", "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    out = _said(capsys)
    assert "must list exactly" in out and "Traceback" not in out


def test_provision_of_a_file_that_is_not_a_project(tmp_path, capsys):
    bad = tmp_path / "project.yml"
    bad.write_text("just: text\n")
    assert main(["provision", str(bad), "--out", str(tmp_path / "kits")]) == 1
    assert "not a FLARE project file" in _said(capsys)
