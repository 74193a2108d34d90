"""Where a site finds its data: the job never carries hospital paths."""

import json

import pytest

from fedbrain.fl.site import SiteConfigError, resolve_site_settings, write_site_config


def test_site_config_in_the_kit_is_found_from_inside_a_job_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBRAIN_DATALIST", raising=False)
    kit = tmp_path / "hospital-a"
    write_site_config(kit, tmp_path / "data" / "datalist.json", num_threads=2)
    (kit / "startup").mkdir()  # a kit: startup/ and local/
    job_dir = kit / "1234-job" / "app_hospital-a" / "custom"
    job_dir.mkdir(parents=True)
    s = resolve_site_settings("hospital-a", cwd=job_dir)
    assert s.datalist == tmp_path / "data" / "datalist.json"
    assert s.num_threads == 2 and s.source.endswith("local/fedbrain_site.json")


def test_environment_wins_over_the_kit_and_fills_the_site_name(tmp_path, monkeypatch):
    write_site_config(tmp_path, tmp_path / "other.json")
    monkeypatch.setenv("FEDBRAIN_DATALIST", "/data/{site}/datalist.json")
    monkeypatch.setenv("FEDBRAIN_NUM_THREADS", "3")
    s = resolve_site_settings("hospital-b", cwd=tmp_path)
    assert str(s.datalist) == "/data/hospital-b/datalist.json" and s.num_threads == 3


def test_nothing_configured_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBRAIN_DATALIST", raising=False)
    with pytest.raises(SiteConfigError) as e:
        resolve_site_settings("hospital-c", cwd=tmp_path)
    assert "hospital-c" in str(e.value) and "fedbrain_site.json" in str(e.value)


def test_broken_site_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBRAIN_DATALIST", raising=False)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "fedbrain_site.json").write_text(json.dumps({"root": "/x"}))
    with pytest.raises(SiteConfigError, match="datalist"):
        resolve_site_settings("hospital-a", cwd=tmp_path)


def test_an_unusable_datalist_gives_no_cases_and_the_reason(tmp_path, monkeypatch):
    from fedbrain.fl.site import load_site_cases

    monkeypatch.delenv("FEDBRAIN_DATALIST", raising=False)
    settings, cases, error = load_site_cases("hospital-c", str(tmp_path / "missing.json"))
    assert cases == {"training": [], "validation": []}
    assert "missing.json" in error


def test_a_site_in_two_studies_names_one_datalist_per_task(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBRAIN_DATALIST", raising=False)
    (tmp_path / "startup").mkdir()
    write_site_config(tmp_path, tmp_path / "default.json",
                      datalists={"classification": str(tmp_path / "grades.json")})
    assert resolve_site_settings("hospital-a", cwd=tmp_path, task="classification").datalist == tmp_path / "grades.json"
    assert resolve_site_settings("hospital-a", cwd=tmp_path, task="segmentation").datalist == tmp_path / "default.json"
    write_site_config(tmp_path, tmp_path / "default.json", datalists=["not", "a", "mapping"])
    with pytest.raises(SiteConfigError, match="datalists must map a task"):
        resolve_site_settings("hospital-a", cwd=tmp_path, task="classification")
