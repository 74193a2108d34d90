"""A public start (fedbrain pretrain) and DP-SGD on a declared part of it."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedbrain.models import start as start_mod
from fedbrain.privacy.dpsgd import DPSGD
from fedbrain.tasks.classification import ClassificationConfig
from fedbrain.tasks.pretrain import pretrain
from fedbrain.tasks.segmentation import SegmentationConfig, SegmentationTrainer

try:
    from .fixtures_seg import make_cases
except ImportError:  # tests/ is not a package
    from fixtures_seg import make_cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SMALL = dict(spacing=(6.0, 6.0, 6.0), roi_size=(32, 32, 32), seed=0, num_threads=1, epochs_per_round=1, rounds=2,
             batch_size=2)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    items = make_cases(root, 4, prefix="PUB", seed=300)
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"site": "public-1", "training": items[:3], "validation": items[3:]}))
    return root, items, datalist


@pytest.fixture(scope="module")
def start(cases, tmp_path_factory):
    _, _, datalist = cases
    return pretrain(SegmentationConfig(**SMALL), [datalist], tmp_path_factory.mktemp("start_out"), epochs=1,
                    trainer_cls=SegmentationTrainer, progress=False)


def test_the_public_cohort_is_nobody_from_a_hospital(tmp_path):
    from fedbrain.synthetic.cohort import public_site_profiles, synthesize_consortium

    public = synthesize_consortium(tmp_path / "public", sites=2, cases=3, seed=0, profiles=public_site_profiles(2, 0),
                                   progress=False)
    hospital = synthesize_consortium(tmp_path / "hospital", sites=1, cases=3, seed=0, site_names=["hospital-a"],
                                     progress=False)
    assert [s["name"] for s in public["sites"]] == ["public-1", "public-2"]
    assert not any(s["has_ct"] for s in public["sites"])  # no CT in the public cohort
    assert all(s["profile"]["tumour_scale"] > 1 for s in public["sites"])  # larger tumours
    public_ids = {c["case_id"] for c in public["cases"]}
    assert not public_ids & {c["case_id"] for c in hospital["cases"]}
    first_public = json.loads((tmp_path / "public/public-1/datalist.json").read_text())
    first_hospital = json.loads((tmp_path / "hospital/hospital-a/datalist.json").read_text())
    a = nib.load(tmp_path / "public/public-1" / (first_public["training"] + first_public["validation"])[0]["label"])
    b = nib.load(tmp_path / "hospital/hospital-a" / (first_hospital["training"] + first_hospital["validation"])[0]["label"])
    # Same seed, same site index: another patient (another random stream), not the hospital's with other contrast.
    assert not np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_pretrain_writes_weights_and_provenance_that_verify(start, cases):
    _, _, datalist = cases
    record = json.loads(start.weights.with_suffix(".json").read_text())
    assert record["sha256"] == start_mod.sha256_of(start.weights)
    assert record["task"] == "segmentation" and record["settings"]["dp_ready"] is True
    assert record["public_data"][0]["site"] == "public-1"
    assert record["public_data"][0]["n_training"] == 3
    assert "val_dice_wt" in record["public_validation"]
    # weights_only: FLARE's persistor loads it as is
    state = torch.load(start.weights, weights_only=True)
    assert set(state) == set(SegmentationConfig(**SMALL, dp_ready=True).build_model().state_dict())
    # the network built from it is the start, for DP and non-DP fine-tuning alike
    for dp in ({}, {"dp_epsilon": 8.0}):
        model = SegmentationConfig(**SMALL, start_model=str(start.weights), **dp).build_model()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_changed_or_foreign_start_is_refused_in_one_line(start, tmp_path):
    bad = tmp_path / "start.pt"
    bad.write_bytes(start.weights.read_bytes()[:-8] + b"XXXXXXXX")
    (tmp_path / "start.json").write_text(start.weights.with_suffix(".json").read_text())
    with pytest.raises(start_mod.StartModelError, match="sha256 .* is not the"):
        start_mod.load(bad)
    with pytest.raises(start_mod.StartModelError, match="another network"):
        SegmentationConfig(**{**SMALL, "init_filters": 16}, start_model=str(start.weights)).build_model()
    with pytest.raises(start_mod.StartModelError, match="a start for 'segmentation'"):
        start_mod.load(start.weights).check_spec(ClassificationConfig())


def test_the_exported_job_carries_the_start_and_names_it_by_hash(start, tmp_path):
    from fedbrain.jobs.segmentation import export

    config = SegmentationConfig(**SMALL, start_model=str(start.weights), dp_epsilon=8.0)
    with pytest.raises(start_mod.StartModelError, match="names its sites"):
        export(config, tmp_path / "nowhere")
    job = export(config, tmp_path, sites=["hospital-a", "hospital-b"])
    # the start goes to the server's own app only (the sites never load it; a job message over 4 MB
    # once closed FLARE's HTTP connection to every site: FINISHED:FAILED_TO_RUN)
    assert json.loads((job / "meta.json").read_text())["deploy_map"] == {"app_server": ["server"],
                                                                         "app": ["hospital-a", "hospital-b"]}
    assert not list((job / "app").rglob("fedbrain_start*")) and not (job / "app/config/config_fed_server.json").exists()
    assert not (job / "app_server/config/config_fed_client.json").exists()
    server = next(job.glob("*/config/config_fed_server.json")).parent
    assert start_mod.sha256_of(server / start_mod.JOB_START_WEIGHTS) == start.sha256
    assert json.loads((server / "environment.json").read_text())["APP_CKPT"] == f"config/{start_mod.JOB_START_WEIGHTS}"
    assert json.loads((server / start_mod.JOB_START_RECORD).read_text())["sha256"] == start.sha256
    clients = "".join(p.read_text() for p in job.glob("*/config/config_fed_client.json"))
    assert f"sha256:{start.sha256}" in clients
    assert str(start.weights.parent) not in clients  # the admin's path never reaches a site
    assert start_mod.record_in_run(server.parent.parent / "nowhere") is None
    assert start_mod.record_in_run(job)["sha256"] == start.sha256


@pytest.mark.parametrize("part", ["decoder", "bias"])
def test_dp_on_a_part_changes_that_part_only(start, cases, part):
    _, items, _ = cases
    config = SegmentationConfig(**SMALL, start_model=str(start.weights), dp_noise_multiplier=1.0, dp_part=part)
    trainer = SegmentationTrainer(items[:3], items[3:], config)
    DPSGD.attach(trainer)
    model = trainer.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.train(model, steps=2)
    assert result["steps"] == 2 and result["dp_epsilon_spent"] > 0
    trained = set(config.trainable_names(before))
    assert trained and len(trained) < len(before)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trained  # the whole part moved (noise alone moves it), nothing else did
    # without DP the same config trains everything
    assert set(config.replace(dp_noise_multiplier=None).trainable_names(before)) == set(before)


def test_a_public_start_picks_the_tasks_part_and_random_weights_train_everything(start):
    names = list(SegmentationConfig(**SMALL, dp_ready=True).build_model().state_dict())
    with_start = SegmentationConfig(**SMALL, start_model=str(start.weights), dp_epsilon=8.0)
    assert with_start.trained_part == SegmentationConfig.DP_PART_DEFAULT
    assert SegmentationConfig(**SMALL, dp_epsilon=8.0).trainable_names(names) == names
    with pytest.raises(ValueError, match="dp_part must be one of"):
        SegmentationConfig(dp_part="everything")
    cls = ClassificationConfig(start_model="sha256:00", dp_epsilon=8.0)
    kept = cls.trainable_names(list(cls.build_model().state_dict()))
    assert kept and all("mri_trunk.features" not in k for k in kept)


def test_the_report_names_the_start(start, tmp_path):
    from fedbrain.report.job_report import _start_markdown, _start_model

    ws = tmp_path / "workspace"
    config_dir = ws / "app_server" / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "config_fed_server.json").write_text("{}")
    start_mod.ship(ws, start)
    found = _start_model(ws)
    assert found["sha256"] == start.sha256 and found["public_data"][0]["site"] == "public-1"
    line = _start_markdown(found)[0]
    assert start.sha256[:16] in line and "No hospital data is in it" in line
    assert "no public start" in _start_markdown(_start_model(tmp_path / "empty"))[0]


def test_a_frozen_trunk_gets_no_loss_of_its_own():
    """Each stream's own loss trains its trunk; with the trunks frozen (DP on the head of a public start whose CT
    trunk never trained) it would only bend the shared head towards features that cannot improve."""
    from fedbrain.tasks.classification import ClassificationTrainer

    def own(config):
        trainer = ClassificationTrainer.__new__(ClassificationTrainer)
        trainer.config = config
        return trainer._streams_with_own_loss(config.build_model())

    assert own(ClassificationConfig()) == {"mri", "ct"}
    assert own(ClassificationConfig(start_model="sha256:00", dp_epsilon=8.0)) == set()  # the head only
    assert own(ClassificationConfig(start_model="sha256:00", dp_epsilon=8.0, dp_part="head_ct")) == {"ct"}
    assert own(ClassificationConfig(start_model="sha256:00")) == {"mri", "ct"}  # without DP all of it trains


def test_each_task_pretrains_on_its_own_public_cohort(tmp_path, monkeypatch):
    """A segmentation challenge's scans are curated cleaner than a grading archive's; a start is keyed by its
    cohort, so changing one task's cohort pretrains that task's start again and keeps the other's."""
    from fedbrain.synthetic import cohort
    from fedbrain.tasks import pretrain as pretrain_mod

    seg, cls = cohort.public_site_profiles(2, 0, "segmentation"), cohort.public_site_profiles(2, 0, "classification")
    assert cls == cohort.public_site_profiles(2, 0)  # the classifier's cohort as before
    assert max(p.noise_level for p in seg) < min(p.noise_level for p in cls)
    assert max(p.psf_fwhm_mm for p in seg) <= 1.3 < max(p.psf_fwhm_mm for p in cls)
    assert [(p.name, p.grade_mix, p.tumour_scale) for p in seg] == [(p.name, p.grade_mix, p.tumour_scale) for p in cls]
    with pytest.raises(ValueError, match="no public cohort"):
        cohort.public_site_profiles(2, 0, "survival")

    made = []
    monkeypatch.setattr(pretrain_mod, "synthesize_public", lambda out, **k: made.append(("data", Path(out).name)) or [])

    def fake_pretrain(config, datalists, out, **kwargs):
        made.append(("start", Path(out).name))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pretrain_mod, "pretrain", fake_pretrain)

    def start_dir(config, trainer_cls):
        with pytest.raises(RuntimeError, match="stop here"):
            pretrain_mod.cached_start(tmp_path, config, trainer_cls)
        return made[-1][1]

    from fedbrain.tasks.classification import ClassificationTrainer

    seg_config = SegmentationConfig(**SMALL)

    before = start_dir(seg_config, SegmentationTrainer), start_dir(ClassificationConfig(), ClassificationTrainer)
    assert ("data", "public_data-segmentation") in made and ("data", "public_data-classification") in made
    monkeypatch.setitem(cohort.PUBLIC_ACQUISITION, "segmentation", {"noise_level": (0.02, 0.03),
                                                                     "psf_fwhm_mm": (1.0, 1.3)})
    after = start_dir(seg_config, SegmentationTrainer), start_dir(ClassificationConfig(), ClassificationTrainer)
    assert after[0] != before[0] and after[1] == before[1]
    # one public start per network: `fedbrain demo --seed 3` (another data seed and job init) reuses seed 0's start
    assert start_dir(seg_config.replace(seed=3), SegmentationTrainer) == after[0]
    assert start_dir(ClassificationConfig(seed=4), ClassificationTrainer) == after[1]


def test_the_demos_public_start_is_made_once_and_reused(tmp_path, monkeypatch):
    """`fedbrain demo --dp-epsilon` without a start: one is pretrained on the synthetic public cohort into the
    cache, and the next demo with the same network loads it instead of training again."""
    from fedbrain.tasks import pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "PUBLIC_CASES", 3)
    monkeypatch.setitem(pretrain_mod.EPOCHS, "segmentation", 1)
    config = SegmentationConfig(**SMALL, dp_epsilon=8.0)
    made = pretrain_mod.cached_start(tmp_path, config, SegmentationTrainer)
    assert made.record["public_data"][0]["site"] == "public-1" and made.record["settings"]["dp_ready"]
    calls = []
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda *a, **k: calls.append(a))
    again = pretrain_mod.cached_start(tmp_path, config, SegmentationTrainer)
    assert again.sha256 == made.sha256 and not calls
    # the demo's job is then built from it: DP on the task's part of that start
    assert config.replace(start_model=str(again.weights)).trained_part == SegmentationConfig.DP_PART_DEFAULT


def test_a_job_cannot_make_a_site_open_a_file_through_start_model(tmp_path):
    """A hostile config names a start by a path at the site: the site never opens it (a job names its start
    by hash; the server's first global model carries the weights)."""
    from fedbrain.fl.site_loop import parse_site_args

    bait = tmp_path / "start.pt"
    bait.write_bytes(b"not a model")
    hostile = SegmentationConfig(start_model=str(bait), dp_epsilon=8.0)
    config = parse_site_args(SegmentationConfig, ["--config", hostile.to_argument()])
    assert config.start_model.startswith("sha256:")
    config.build_model()  # builds the DP-ready network without opening anything
    assert config.dp_clip() == 1.0  # nor reads a start's record for its clip (the bait would fail to load)
    with pytest.raises(start_mod.StartModelError):
        hostile.dp_clip()  # what the site would have done with the path


def test_a_start_chooses_its_dp_clip_on_public_cases_and_a_job_carries_it(start, cases, tmp_path):
    """DP-SGD's noise is proportional to its clip: the start records, per part, the median norm of a public case's
    gradient (public validation cases, never a hospital's), and a job from it clips there unless it says otherwise."""
    from fedbrain.jobs.segmentation import export
    from fedbrain.privacy.clip import DEFAULT_CLIP, RECORD_KEY, per_case_gradient_norms

    _, items, _ = cases
    record = start.record
    assert set(record[RECORD_KEY]) == set(SegmentationConfig.PARTS)
    assert record["public_gradient_norms_cases"] == "validation" and record[RECORD_KEY]["decoder"]["n_cases"] == 1
    decoder = record[RECORD_KEY]["decoder"]
    assert decoder["clip"] == float(f"{decoder['median']:.2g}") and decoder["clip"] > 0
    assert record[RECORD_KEY]["bias"]["median"] < record[RECORD_KEY]["all"]["median"]  # a part's norm <= the whole's

    # The norms are each case's own gradient: one batch of two cases, against plain autograd case by case.
    config = SegmentationConfig(**SMALL, start_model=str(start.weights), dp_noise_multiplier=1.0)
    trainer = SegmentationTrainer(items[:2], [], config)
    batch = next(iter(trainer.train_loader))
    trainer.train_loader = [batch]
    model = config.build_model()
    norms = per_case_gradient_norms(trainer, model, "decoder")
    assert all(p.requires_grad for p in model.parameters())  # left as it came
    trained = set(config.replace(dp_part="decoder").trainable_names([n for n, _ in model.named_parameters()]))
    by_hand = []
    for i in range(2):
        model.zero_grad()
        one = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        sum(trainer.loss_terms(model, one).values()).backward()
        by_hand.append(float(torch.sqrt(sum(p.grad.pow(2).sum() for n, p in model.named_parameters() if n in trained))))
    assert norms == pytest.approx(by_hand, rel=1e-3)
    assert norms[0] != pytest.approx(norms[1], rel=1e-3)

    # Where the clip comes from: the job's own setting, else the start's for the trained part, else 1.0.
    dp = dict(start_model=str(start.weights), dp_epsilon=8.0)
    assert SegmentationConfig(**SMALL, **dp).dp_clip() == decoder["clip"]
    assert SegmentationConfig(**SMALL, **dp, dp_part="bias").dp_clip() == record[RECORD_KEY]["bias"]["clip"]
    assert SegmentationConfig(**SMALL, **dp, dp_max_grad_norm=0.7).dp_clip() == 0.7
    assert SegmentationConfig(**SMALL, dp_epsilon=8.0).dp_clip() == DEFAULT_CLIP
    hook = DPSGD(SegmentationTrainer(items[:2], [], SegmentationConfig(**SMALL, **dp)))
    assert hook.max_grad_norm == decoder["clip"]
    # The sites never read the start's record: the exported job carries the number.
    job = export(SegmentationConfig(**SMALL, **dp), tmp_path / "job", sites=["hospital-a"])
    clients = "".join(p.read_text() for p in job.glob("*/config/config_fed_client.json"))
    assert f'\\"dp_max_grad_norm\\":{decoder["clip"]},' in clients
    job = export(SegmentationConfig(**SMALL, **dp, dp_max_grad_norm=0.7), tmp_path / "own", sites=["hospital-a"])
    assert '\\"dp_max_grad_norm\\":0.7,' in "".join(p.read_text() for p in job.glob("*/config/config_fed_client.json"))


def test_a_start_written_before_public_clips_gets_them_once(start, cases, tmp_path):
    """A cached start from an earlier version has no clips: they are measured and added to its record, and the
    weights (and so the hash every job names) stay as they were."""
    import shutil

    from fedbrain.privacy.clip import RECORD_KEY
    from fedbrain.tasks.pretrain import with_public_clips

    _, _, datalist = cases
    old = tmp_path / "old"
    old.mkdir()
    shutil.copyfile(start.weights, old / "start.pt")
    record = {k: v for k, v in start.record.items() if k not in (RECORD_KEY, "public_gradient_norms_cases")}
    (old / "start.json").write_text(json.dumps(record))
    updated = with_public_clips(start_mod.load(old), SegmentationConfig(**SMALL), [datalist], SegmentationTrainer)
    assert updated.sha256 == start.sha256 and set(updated.record[RECORD_KEY]) == set(SegmentationConfig.PARTS)
    assert RECORD_KEY in json.loads((old / "start.json").read_text())
    assert with_public_clips(updated, SegmentationConfig(**SMALL), [], SegmentationTrainer) is updated


def test_the_classifier_keeps_its_clip_whatever_its_start_records():
    """The classifier's start scores public cases with almost no loss, so their norms would set a clip 4-5 orders
    of magnitude below a hospital's gradients: that task clips at 1.0 (PUBLIC_CLIP, by measurement)."""
    from fedbrain.privacy.clip import DEFAULT_CLIP, RECORD_KEY, clip_from_record

    record = {RECORD_KEY: {"head": {"clip": 6.5e-05}, "decoder": {"clip": 0.097}}}
    assert clip_from_record(record, ClassificationConfig(dp_epsilon=8.0, dp_part="head")) is None
    assert clip_from_record(record, SegmentationConfig(dp_epsilon=8.0, dp_part="decoder")) == 0.097
    assert clip_from_record({}, SegmentationConfig(dp_epsilon=8.0, dp_part="decoder")) is None
    assert ClassificationConfig(dp_epsilon=8.0).dp_clip() == DEFAULT_CLIP
