"""Tests for the synthetic consortium generator (fedbrain.synthetic.cohort).

They check what downstream code relies on: the CONTRACTS.md layout, BraTS
labels per grade, plausible MR/CT contrast, a CT that reads back onto the MRI
grid, seed determinism and real between-site differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedbrain.synthetic import cohort as synth
from fedbrain.data.dicom import read_ct_series

SITES, CASES, SEED = 3, 3, 0  # 3 sites so the last one is the no-CT site


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "consortium"
    manifest = synth.synthesize_consortium(out, sites=SITES, cases=CASES, seed=SEED, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def anatomy():
    return synth.load_anatomy(3.0)


@pytest.fixture(scope="module")
def profile():
    return synth.default_site_profiles(3, seed=1)[0]


@pytest.fixture(scope="module")
def cases_by_grade(anatomy, profile):
    """A few cases per grade straight from synthesize_case (no disk)."""
    return {
        grade: [synth.synthesize_case(np.random.default_rng([11, g, k]), anatomy, profile, grade) for k in range(3)]
        for g, grade in enumerate(synth.GRADES)
    }


def _items(datalist):
    return datalist["training"] + datalist["validation"]


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


# --------------------------------------------------------------------------- layout


def test_layout_and_datalists_match_contracts(consortium):
    out, manifest = consortium
    assert json.loads((out / "manifest.json").read_text())["sites"] == json.loads(json.dumps(manifest["sites"]))
    names = [s["name"] for s in manifest["sites"]]
    assert names == ["hospital-a", "hospital-b", "hospital-c"]
    seen_ids = set()
    for site in manifest["sites"]:
        site_dir = out / site["name"]
        datalist = json.loads((out / site["datalist"]).read_text())
        assert datalist["site"] == site["name"] and isinstance(datalist["description"], str)
        assert len(datalist["validation"]) >= 2
        assert any(item["grade"] != "healthy" for item in datalist["validation"])
        assert len(datalist["training"]) >= 1
        assert len(_items(datalist)) == site["n_cases"] >= 3
        for item in _items(datalist):
            case_id = item["case_id"]
            assert case_id not in seen_ids
            seen_ids.add(case_id)
            assert [Path(p).name for p in item["image"]] == ["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
            assert Path(item["label"]).name == "seg.nii.gz"
            assert Path(item["label"]).parent.name == case_id  # case_id default rule holds too
            assert item["grade"] in synth.GRADES
            for rel in [*item["image"], item["label"]]:
                assert not Path(rel).is_absolute() and (site_dir / rel).is_file()
            if site["has_ct"]:
                assert sorted(p.name for p in (site_dir / item["ct"]).iterdir())[0] == "IM0001.dcm"
            else:
                assert "ct" not in item
                assert not (site_dir / "cases" / case_id / "ct").exists()
    assert [s["has_ct"] for s in manifest["sites"]] == [True, True, False]
    assert len(manifest["cases"]) == manifest["n_cases"] == len(seen_ids)


def test_manifest_records_parameters(consortium):
    _, manifest = consortium
    assert manifest["seed"] == SEED and manifest["spacing_mm"] == 3.0
    assert manifest["shape"] == [64, 80, 64]
    assert all(n % 16 == 0 for n in manifest["shape"])
    profile = manifest["sites"][0]["profile"]
    for key in ("mri_gain", "gamma", "bias_strength", "noise_level", "slice_thickness_mm",
                "ct_noise_hu", "ct_offset_hu", "grade_mix", "case_factor"):
        assert key in profile
    assert set(manifest["cases"][0]) >= {"case_id", "site", "split", "grade", "wt_ml"}


def test_nifti_geometry_and_dtypes(consortium):
    out, manifest = consortium
    site = manifest["sites"][0]
    item = json.loads((out / site["datalist"]).read_text())["validation"][0]
    site_dir = out / site["name"]
    seg, seg_affine = _load(site_dir / item["label"])
    assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 4}
    for rel in item["image"]:
        arr, affine = _load(site_dir / rel)
        assert arr.dtype == np.float32 and arr.shape == seg.shape == tuple(manifest["shape"])
        assert np.array_equal(affine, seg_affine)
        assert (arr[seg > 0] > 0).all()  # tumour lies inside the skull-stripped brain
    np.testing.assert_allclose(seg_affine, manifest["affine"], atol=1e-5)


def test_ct_reads_back_on_the_mri_grid(consortium):
    out, manifest = consortium
    site = manifest["sites"][0]
    item = json.loads((out / site["datalist"]).read_text())["training"][0]
    site_dir = out / site["name"]
    volume, affine = read_ct_series(site_dir / item["ct"])
    t1, t1_affine = _load(site_dir / item["image"][0])
    assert volume.shape == t1.shape
    np.testing.assert_allclose(affine, t1_affine, atol=1e-3)
    assert volume.min() >= -1024 and volume.max() > 700  # air and skull present
    brain = t1 > 0
    assert 0 < volume[brain].mean() < 80


# --------------------------------------------------------------------------- labels


def test_labels_per_grade(cases_by_grade):
    for case in cases_by_grade["healthy"]:
        assert not case["seg"].any()
    for grade in ("HGG", "LGG"):
        for case in cases_by_grade[grade]:
            seg = case["seg"]
            assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 4}
            tc = np.isin(seg, (1, 4)).sum()
            assert (seg == 1).any() and (seg == 2).any()
            if grade == "HGG":
                assert (seg == 4).sum() > 0.1 * tc
            else:
                assert (seg == 4).sum() <= 0.05 * tc
            fraction = (seg > 0).sum() / case["brain"].sum()
            assert 0.003 < fraction < 0.10, fraction  # "a few % of the brain"
            assert (seg == 2).sum() > 0.3 * tc  # oedema surrounds the core
            assert not (seg[~case["brain"]]).any()


# --------------------------------------------------------------------------- contrast


def test_mri_contrast_is_plausible(cases_by_grade):
    for grade in ("HGG", "LGG"):
        for case in cases_by_grade[grade]:
            seg, wm = case["seg"], (case["wm"] > 0.9) & (case["seg"] == 0) & case["brain"]
            mean = {c: (lambda m, c=c: float(case[c][m].mean())) for c in synth.MRI_CONTRASTS}
            assert mean["flair"](seg == 2) > 1.2 * mean["flair"](wm)
            assert mean["t2"](seg == 2) > 1.2 * mean["t2"](wm)
            if grade == "HGG":
                assert mean["t1ce"](seg == 4) > 1.15 * mean["t1ce"](wm)
                assert mean["t1"](seg == 4) < mean["t1"](wm)  # enhancement is a T1ce-only finding
                assert mean["t1"](seg == 1) < 0.6 * mean["t1"](wm)  # necrosis dark
                assert mean["t1ce"](seg == 1) < 0.7 * mean["t1ce"](wm)
    case = cases_by_grade["healthy"][0]
    wm = (case["wm"] > 0.9) & case["brain"]
    # Ventricle-ish voxels: inside the brain, low white matter, dark on T1.
    csf = case["brain"] & (case["wm"] < 0.05) & (case["t1"] < np.percentile(case["t1"][case["brain"]], 5))
    assert csf.sum() > 20
    assert case["t2"][csf].mean() > case["t2"][wm].mean()
    assert case["flair"][csf].mean() < case["flair"][wm].mean()
    for c in synth.MRI_CONTRASTS:
        assert case[c].dtype == np.float32
        assert not case[c][~case["brain"]].any()  # skull-stripped


def test_ct_contrast_is_plausible(cases_by_grade):
    for grade in synth.GRADES:
        for case in cases_by_grade[grade]:
            ct, seg, brain = case["ct"], case["seg"], case["brain"]
            wm = (case["wm"] > 0.9) & (seg == 0) & brain
            assert ct[case["skull"]].mean() > 500
            assert 0 < ct[brain].mean() < 80
            assert ct[0, 0, 0] < -900  # air in the corner
            if grade != "healthy":
                assert ct[seg == 2].mean() < ct[wm].mean()  # hypodense oedema
            if grade == "HGG":
                assert ct[seg == 4].mean() < 60  # no enhancement on plain CT


def test_lgg_calcifications_show_on_ct_only(anatomy, profile):
    for k in range(40):
        rng = np.random.default_rng([5, k])
        case = synth.synthesize_case(rng, anatomy, profile, "LGG")
        if case["meta"]["calcified"]:
            break
    else:
        pytest.fail("no calcified LGG in 40 draws")
    core = case["seg"] == 1
    assert case["ct"][core].max() >= 150
    # Same spot on FLAIR is unremarkable: within the range of the rest of the core.
    spot = np.unravel_index(np.argmax(np.where(core, case["ct"], -np.inf)), core.shape)
    assert case["flair"][spot] < np.percentile(case["flair"][core], 99.9) * 1.5
    healthy = synth.synthesize_case(np.random.default_rng([5, 0]), anatomy, profile, "healthy")
    assert not healthy["meta"]["calcified"] and healthy["ct"][healthy["brain"]].max() < 150


# Every CT finding certain (or off), so one case shows what a setting does.
ALL_FINDINGS = synth.GliomaCT(calcification_lgg=1.0, calcification_hgg=0.0, haemorrhage_hgg=1.0,
                              haemorrhage_lgg=0.0, density_hgg_hu=(10.0, 0.0), density_lgg_hu=(-8.0, 0.0))
NO_CT_FINDINGS = synth.GliomaCT(calcification_lgg=0.0, calcification_hgg=0.0, haemorrhage_hgg=0.0,
                                haemorrhage_lgg=0.0, density_hgg_hu=(0.0, 0.0), density_lgg_hu=(0.0, 0.0))


def _core_minus_wm_hu(case):
    """Median HU of the tumour core (no calcification or blood) minus normal white matter."""
    seg, ct = case["seg"], case["ct"]
    wm = (case["wm"] > 0.9) & (seg == 0) & case["brain"]
    solid = np.isin(seg, (1, 4)) & (ct < 50)  # without blood or calcium
    return float(np.median(ct[solid]) - np.median(ct[wm]))


def test_ct_findings_follow_the_true_grade_not_the_mri_look(anatomy, profile):
    """An atypical glioma looks like the other grade on MRI but keeps its own grade's CT signs."""
    seed = [11, 3]
    for grade, looks in (("LGG", "HGG"), ("HGG", "LGG")):
        case = synth.synthesize_case(np.random.default_rng(seed), anatomy, profile, grade, atypical=1.0,
                                     ct_findings=ALL_FINDINGS)
        meta, core = case["meta"], np.isin(case["seg"], (1, 4))
        assert meta["looks_like"] == looks
        assert meta["calcified"] == (grade == "LGG") and meta["haemorrhage"] == (grade == "HGG")
        if grade == "LGG":  # calcified although it enhances like an HGG
            assert case["ct"][core].max() >= 150
        else:  # acute blood (55-80 HU) although it looks like a non-enhancing LGG
            assert ((case["ct"] >= 50) & (case["ct"] < 100) & core).sum() >= 3
    # Cellularity: the same tumour is denser as an HGG (+10 HU setting), fainter as an LGG (-8 HU),
    # than with no density finding; partial volume with necrosis and oedema dilutes it a little.
    for grade, sign in (("HGG", 1), ("LGG", -1)):
        for k in range(2):
            with_ = synth.synthesize_case(np.random.default_rng([12, k]), anatomy, profile, grade, ct_findings=ALL_FINDINGS)
            without = synth.synthesize_case(np.random.default_rng([12, k]), anatomy, profile, grade,
                                            ct_findings=NO_CT_FINDINGS)
            assert sign * (_core_minus_wm_hu(with_) - _core_minus_wm_hu(without)) > 4.0, (grade, k)


def test_ct_findings_never_change_the_mri_and_can_be_switched_off(anatomy, profile):
    rng = lambda: np.random.default_rng([13, 1])  # noqa: E731
    on = synth.synthesize_case(rng(), anatomy, profile, "LGG", ct_findings=ALL_FINDINGS)
    off = synth.synthesize_case(rng(), anatomy, profile, "LGG", ct_findings=NO_CT_FINDINGS)
    for key in (*synth.MRI_CONTRASTS, "seg"):
        assert np.array_equal(on[key], off[key]), key  # CT draws come after the MRI's
    assert on["meta"]["calcified"] and not off["meta"]["calcified"] and off["meta"]["ct_density_hu"] == 0.0
    assert off["ct"][np.isin(off["seg"], (1, 4))].max() < 100


def test_midline_shift_pushes_tissue_away_from_the_tumour(anatomy, profile):
    rng = lambda: np.random.default_rng([14, 2])  # noqa: E731
    shifted = synth.synthesize_case(rng(), anatomy, profile, "HGG")
    still = synth.synthesize_case(rng(), anatomy, profile, "HGG", ct_findings=synth.GliomaCT(midline_shift_mm=0.0))
    assert shifted["meta"]["midline_shift_mm"] >= 2.0 and still["meta"]["midline_shift_mm"] == 0.0
    side = np.sign(shifted["meta"]["tumour_centre_mm"][0] - float(anatomy.affine[0, :3] @ (np.array(anatomy.shape) - 1) / 2 + anatomy.affine[0, 3]))
    x = np.arange(anatomy.shape[0])[:, None, None] * anatomy.spacing_mm
    centroid = {k: float((c["wm"] * x).sum() / c["wm"].sum()) for k, c in (("shifted", shifted), ("still", still))}
    assert side * (centroid["still"] - centroid["shifted"]) > 0.1, centroid  # white matter moved across (mm)


# --------------------------------------------------------------------------- determinism and sites


def test_same_seed_same_arrays_different_seed_differs(consortium, tmp_path):
    out, manifest = consortium
    again = synth.synthesize_consortium(tmp_path / "again", sites=SITES, cases=CASES, seed=SEED, progress=True)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in manifest.items() if k != "seconds"}
    for site in manifest["sites"]:
        for item in _items(json.loads((out / site["datalist"]).read_text())):
            for rel in [*item["image"], item["label"]]:
                a, _ = _load(out / site["name"] / rel)
                b, _ = _load(tmp_path / "again" / site["name"] / rel)
                assert np.array_equal(a, b), rel

    anatomy, profile = synth.load_anatomy(3.0), synth.default_site_profiles(1)[0]
    first = synth.synthesize_case(np.random.default_rng(1), anatomy, profile, "HGG")
    same = synth.synthesize_case(np.random.default_rng(1), anatomy, profile, "HGG")
    other = synth.synthesize_case(np.random.default_rng(2), anatomy, profile, "HGG")
    for key in (*synth.MRI_CONTRASTS, "seg", "ct"):
        assert np.array_equal(first[key], same[key])
        assert not np.array_equal(first[key], other[key])


def test_a_cohort_tag_gives_other_patient_ids_and_the_same_images(consortium, tmp_path):
    """A site's privacy ledger counts patients by case ID: a tagged cohort must not reuse another's IDs."""
    out, manifest = consortium
    tagged = synth.synthesize_consortium(tmp_path / "tagged", sites=SITES, cases=CASES, seed=SEED, cohort="DP",
                                         progress=False)
    ids, tagged_ids = ({c["case_id"] for c in m["cases"]} for m in (manifest, tagged))
    assert len(tagged_ids) == len(ids) and not ids & tagged_ids
    assert all(i.startswith("SYN-DP-") for i in tagged_ids) and tagged["cohort"] == "DP"
    first = sorted(ids)[0]
    site = next(c["site"] for c in manifest["cases"] if c["case_id"] == first)
    a, _ = _load(out / site / "cases" / first / "t1.nii.gz")
    b, _ = _load(tmp_path / "tagged" / site / "cases" / first.replace("SYN-", "SYN-DP-") / "t1.nii.gz")
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="cohort"):
        synth.synthesize_consortium(tmp_path / "bad", sites=1, cases=3, cohort="../x", progress=False)


def test_atypical_gliomas_look_like_the_other_grade(anatomy, profile):
    """atypical=1: every LGG enhances with a necrotic core and no HGG does; the true grade stays in meta."""
    seed = [11, 3]
    plain = synth.synthesize_case(np.random.default_rng(seed), anatomy, profile, "LGG")
    zero = synth.synthesize_case(np.random.default_rng(seed), anatomy, profile, "LGG", atypical=0.0)
    assert np.array_equal(plain["seg"], zero["seg"]) and np.array_equal(plain["t1ce"], zero["t1ce"])
    assert plain["meta"]["looks_like"] == "LGG"
    for grade, looks in (("LGG", "HGG"), ("HGG", "LGG")):
        case = synth.synthesize_case(np.random.default_rng(seed), anatomy, profile, grade, atypical=1.0)
        seg = case["seg"]
        tc = np.isin(seg, (1, 4)).sum()
        assert case["meta"]["grade"] == grade and case["meta"]["looks_like"] == looks
        if looks == "HGG":
            assert (seg == 4).sum() > 0.1 * tc  # an enhancing rim, like an HGG
        else:
            assert (seg == 4).sum() <= 0.05 * tc and not case["meta"]["calcified"]
    with pytest.raises(ValueError, match="atypical"):
        synth.synthesize_case(np.random.default_rng(0), anatomy, profile, "HGG", atypical=1.5)


def test_sites_differ(consortium):
    out, manifest = consortium
    profiles = synth.default_site_profiles(3, seed=SEED)
    assert [p.has_ct for p in profiles] == [True, True, False]
    assert profiles[0].grade_mix["HGG"] > profiles[-1].grade_mix["HGG"]  # label skew
    assert profiles[0].case_factor > profiles[-1].case_factor  # quantity skew
    assert len({p.slice_thickness_mm for p in profiles}) == 3
    assert len({p.mri_gain["t1"] for p in profiles}) == 3
    assert synth.default_site_profiles(3, seed=SEED) == profiles != synth.default_site_profiles(3, seed=SEED + 1)

    wm_means = []
    for site in manifest["sites"]:
        values = []
        for item in _items(json.loads((out / site["datalist"]).read_text())):
            t1, _ = _load(out / site["name"] / item["image"][0])
            seg, _ = _load(out / site["name"] / item["label"])
            brain = (t1 > 0) & (seg == 0)
            values.append(np.percentile(t1[brain], 90))  # white matter is the bright end of T1
        wm_means.append(float(np.mean(values)))
    assert max(wm_means) > 1.2 * min(wm_means), wm_means


# --------------------------------------------------------------------------- pieces


def test_split_and_grade_allocation_guarantees():
    rng = np.random.default_rng(0)
    grades = synth._allocate_grades(rng, 3, {"healthy": 1.0, "LGG": 0.0, "HGG": 0.0})
    assert any(g != "healthy" for g in grades)
    for n in range(3, 12):
        grades = ["healthy"] * (n - 1) + ["LGG"]
        flags = synth._split(np.random.default_rng(n), grades, 0.25)
        val = [g for g, v in zip(grades, flags) if v]
        assert len(val) >= 2 and "LGG" in val and not all(flags)


def test_procedural_fallback_anatomy_works():
    anatomy = synth.load_anatomy(3.0, source="procedural")
    assert anatomy.source == "procedural phantom"
    case = synth.synthesize_case(np.random.default_rng(0), anatomy, synth.SiteProfile(name="x"), "HGG")
    assert case["t1"].shape == anatomy.shape
    assert {1, 2, 4} <= set(np.unique(case["seg"]))


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synth.synthesize_consortium(tmp_path, sites=0, progress=False)
    with pytest.raises(ValueError):
        synth.default_site_profiles(2, names=["same", "same"])
    with pytest.raises(ValueError):
        synth.synthesize_case(np.random.default_rng(0), synth.load_anatomy(3.0), synth.SiteProfile(name="x"), "GBM")
