"""Benchmark rows of the dual-stream MRI+CT grade classifier (issue: personal heads, robust fusion).

One synthetic cohort per run, measured side by side:

* federated arms, each a real FLARE job on one POC consortium, same Dirichlet(alpha) split,
  rounds and local epochs: ``personal`` (heads stay on site), ``fedavg`` (shared head),
  ``fedprox`` and ``scaffold`` (personal heads + proximal term / control variates). Figures:
  per-site and minimum-site balanced accuracy of the final model on each site's own validation
  cases, and how fast the minimum site gets there (rounds to reach TARGET, mean over rounds):
  on an easy cohort every arm ends at the ceiling, and speed is what still differs.
* centralized arms (the same trainer on pooled training cases, no FLARE), scored on a
  held-out test cohort of cases that have both MRI and CT:
  - ``dual`` (robust fusion + modality dropout): the pooled ceiling, also scored per site;
  - ``mri_only`` / ``ct_only`` single streams;
  - ``late`` vs ``robust`` fusion both trained on CT-complete cases only, tested with all
    modalities, without CT and without MRI (a hospital without CT would teach late fusion
    that zeros mean "absent", hiding the degradation this row is about).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.console import Console

from fedbrain.tasks.classification import ClassificationConfig

SITES = ("hospital-a", "hospital-b", "hospital-c")
FED_ARMS = ("personal", "fedavg", "fedprox", "scaffold")
TARGET = 0.9  # minimum-site balanced accuracy the "rounds to target" figure counts up to
#: Most balanced accuracy (points) robust fusion may lose when a modality is missing at test time (the issue's goals).
DROP_GOALS = {"ct": 5.0, "mri": 15.0}


@dataclass
class ClassifyBenchSettings:
    cases: int = 40  # per hospital before pooling and re-splitting
    test_cases: int = 24  # per hospital of the held-out test cohort (another seed)
    alpha: float = 0.5
    seed: int = 0  # cohort, split, initial weights, data order: everything a run draws
    central_epochs: int = 40
    atypical: float = 0.2  # gliomas that look like the other grade on MRI (see fedbrain.synthetic.cohort)
    #: Training settings: the task config's own defaults (rounds, local epochs, lr, fusion, mu, ...).
    task: ClassificationConfig = field(default_factory=ClassificationConfig)

    def config(self, **changes) -> ClassificationConfig:
        """This run's task config. The bench seed is the model's seed too: before this was one
        place, the "other seeds" rows all started from init_seed 0."""
        return self.task.replace(seed=self.seed, **changes)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "task"}, "task": self.task.to_dict()}


def _pooled(split_dir: Path, section: str) -> list[dict]:
    from fedbrain.data.datalist import load_datalist

    return [c for s in SITES for c in load_datalist(split_dir / s / "datalist.json")[section]]


def prepare_data(work: Path, s: ClassifyBenchSettings, console: Console,
                 with_test: bool = True) -> tuple[Path, list[dict]]:
    """Dirichlet split of a synthetic cohort + a held-out test cohort (cases with CT only)."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.synthetic.cohort import synthesize_consortium
    from fedbrain.demo import ClassifyDemoSettings, prepare_classification_data

    split = prepare_classification_data(work / "data", list(SITES), ClassifyDemoSettings(
        cases=s.cases, seed=s.seed, alpha=s.alpha, atypical=s.atypical))
    if not with_test:
        return split, []
    console.print("held-out test cohort")
    synthesize_consortium(work / "test", sites=len(SITES), cases=s.test_cases, seed=s.seed + 1000,
                          site_names=list(SITES), atypical=s.atypical, progress=True)
    test = []
    for site in SITES:
        lists = load_datalist(work / "test" / site / "datalist.json")
        test += [c for c in lists["training"] + lists["validation"] if c.get("ct")]
    return split, test


def run_federated(work: Path, split: Path, s: ClassifyBenchSettings, console: Console,
                  arms: tuple[str, ...] = FED_ARMS) -> dict:
    """Every algorithm as a FLARE job, one after another on one POC consortium."""
    from fedbrain.jobs import classification
    from fedbrain.poc.consortium import PocConsortium
    from fedbrain.poc.runner import submit_and_wait

    poc = PocConsortium(work / "poc-run")
    summaries = {}
    try:
        poc.up(data_dir=split)
        for algorithm in arms:
            console.rule(f"federated: {algorithm} (seed {s.seed})")
            # Distinct job names -> distinct personal-head stores: no arm starts from another's heads.
            config = s.config(algorithm=algorithm, name=f"bench_{algorithm}", min_clients=len(SITES))
            job = classification.export(config, work / "jobs", sites=list(SITES))
            meta, result = submit_and_wait(poc, job, rounds=config.rounds, result_dir=work / "result" / algorithm,
                                           console=console)
            summaries[algorithm] = summarize_arm(result, meta.get("status"))
    finally:
        poc.clean()
    return summaries


def summarize_arm(result: Path, status: str | None = None) -> dict:
    """Per-site final and per-round balanced accuracy of one downloaded job result.

    ``status``: what the admin API reported (the result's own meta.json is written at submission).
    """
    from fedbrain.report.job_report import build_report

    report = build_report(result)
    per_site = {site: e["final"].get("val_bacc") for site, e in report["sites"].items()}
    curves = {site: [r.get("val_bacc") for r in e["rounds"]] for site, e in report["sites"].items()}
    n = min(len(v) for v in curves.values())
    min_curve = [min(v[r] for v in curves.values() if v[r] is not None) for r in range(n)]
    return {
        "status": status or report["status"],
        "duration": report["duration"],
        "result": str(result),
        "per_site_bacc": per_site,
        "min_bacc": min(v for v in per_site.values() if v is not None),
        "mean_bacc": sum(per_site.values()) / len(per_site),
        "per_site_auc": {site: e["final"].get("val_auc") for site, e in report["sites"].items()},
        "per_site_curve": curves,
        "min_site_curve": min_curve,
        "mean_min_site_over_rounds": sum(min_curve) / len(min_curve),
        "rounds_to_target": next((r for r, v in enumerate(min_curve) if v >= TARGET), None),
        "n_val": {site: e["final"].get("n_val") for site, e in report["sites"].items()},
    }


def _central_arm(train: list[dict], test: list[dict], per_site_val: dict | None, s: ClassifyBenchSettings,
                 console: Console, **overrides) -> dict:
    from fedbrain.tasks.classification import ClassificationTrainer

    config = s.config(**overrides)
    trainer = ClassificationTrainer(train, test, config)
    model = trainer.build_model()
    t = time.time()
    trainer.train(model, epochs=s.central_epochs, progress=True)
    out = {"config": overrides, "n_train": len(trainer.train_ds), "n_test": len(trainer.val_ds),
           "train_seconds": time.time() - t}
    for drop in (None, "ct", "mri"):
        if drop is not None and len(config.streams) < 2:
            continue
        metrics = trainer.validate(model, drop=drop)
        suffix = "" if drop is None else f"_no_{drop}"
        out[f"bacc{suffix}"] = metrics["val_bacc"]
        out[f"auc{suffix}"] = metrics["val_auc"]
    if per_site_val:
        out["per_site_bacc"] = {site: ClassificationTrainer([], cases, config).validate(model)["val_bacc"]
                                for site, cases in per_site_val.items()}
    console.print(f"  {overrides or 'dual'}: test bacc {out['bacc']:.3f}"
                  + (f", no CT {out['bacc_no_ct']:.3f}, no MRI {out['bacc_no_mri']:.3f}" if "bacc_no_ct" in out else ""))
    return out


def run_central(split: Path, test: list[dict], s: ClassifyBenchSettings, console: Console) -> dict:
    from fedbrain.data.datalist import load_datalist

    train = _pooled(split, "training")
    with_ct = [c for c in train if c.get("ct")]
    per_site_val = {site: load_datalist(split / site / "datalist.json")["validation"] for site in SITES}
    console.rule("centralized arms")
    return {
        "dual": _central_arm(train, test, per_site_val, s, console),
        "mri_only": _central_arm(train, test, None, s, console, streams=("mri",)),
        "ct_only": _central_arm(with_ct, test, None, s, console, streams=("ct",)),
        "late_ct_complete": _central_arm(with_ct, test, None, s, console, fusion="late", modality_dropout=0.0),
        "robust_ct_complete": _central_arm(with_ct, test, None, s, console),
    }


def bench_classify(work: Path, settings: ClassifyBenchSettings | None = None, console: Console | None = None,
                   parts: tuple[str, ...] = ("federated", "central")) -> dict:
    s = settings or ClassifyBenchSettings()
    console = console or Console()
    work = Path(work) / f"classify-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True)
    split, test = prepare_data(work, s, console)
    out = {"settings": s.to_dict(), "work": str(work), "n_test": len(test)}
    if "federated" in parts:
        out["federated"] = run_federated(work, split, s, console)
        (work / "results.json").write_text(json.dumps(out, indent=2, default=str))  # kept if a later part fails
    if "central" in parts:
        out["central"] = run_central(split, test, s, console)
        (work / "results.json").write_text(json.dumps(out, indent=2, default=str))
    return out


# --------------------------------------------------------------------------- statistics over seeds

#: Fewest seeds a statistics row may be judged on (issue 13): fewer, and the row is "not met" whatever its mean.
MIN_SEEDS = 5
#: Dirichlet concentration that makes a "split" IID in practice (every site ~ the pooled class mix).
IID_ALPHA = 1000.0


@dataclass
class SeedBenchSettings:
    """Comparisons repeated over seeds: each seed draws a new cohort, split and initial weights.

    Per seed one synthetic pool of three hospitals is made, and from it:

    * the consortium where personalization should matter: the hospitals as synthesized, each
      with its own scanner (``SiteProfile``: slice thickness, gain, gamma, noise, CT calibration,
      the last without CT), a Dirichlet(``alpha``) grade mix per hospital (label skew), and
      ``relabel_site`` grading every glioma of ``relabel_wt_ml`` mL or more (whole tumour) as
      high grade, as a rater who reads a large mass as high grade would (site-specific labels; its
      validation uses its own labels). Why size: a habit the other hospitals do not share and
      that the images show, so a shared head must get it wrong at that site and a personal head
      can learn it (grading atypical cases "by their MRI look" was no such habit: the shared
      MRI-driven model already predicts the look);
    * the consortium where it should not: the same cases pooled and re-split IID
      (Dirichlet(IID_ALPHA), no quantity skew), true grades everywhere;
    * each site's validation: its own ``val_fraction`` of the pool plus ``site_val_cases`` more cases from the
      same hospital (scanner, grade mix and, for ``relabel_site``, labelling habit), never trained
      on, so a site is judged on ~45 cases, not 15: one case then moves a site by ~2-10 points, not
      7-50 (:func:`site_validation_cohort`);
    * the centralized arms (dual / MRI-only / CT-only) trained on the IID consortium's training
      cases and scored, as in the classify group, on a held-out cohort (seed + 1000, default
      hospitals) of cases that have CT.

    Federated arms here run in process (:func:`simulate_federation`: the product's trainer, FedAvg
    weighted by steps like the FLARE job, heads kept per site for ``personal``), not as FLARE jobs:
    20 FLARE jobs (5 seeds x 2 consortia x 2 arms) do not fit a benchmark run on 2 cores.
    """

    seeds: tuple = (0, 1, 2, 3, 4)
    cases: int = 50  # per hospital, no quantity skew: val_fraction 0.3 leaves 35 training + 15 validation cases
    val_fraction: float = 0.3
    test_cases: int = 24  # per hospital of the held-out test cohort of the centralized arms
    site_val_cases: int = 30  # per hospital, added to its validation (see :func:`site_validation_cohort`)
    alpha: float = 0.5
    relabel_site: str = "hospital-b"
    relabel_wt_ml: float = 30.0  # about the median LGG whole-tumour volume of the synthetic cohort
    atypical: float = 0.2
    rounds: int = 10
    epochs_per_round: int = 2
    central_epochs: int = 40
    task: ClassificationConfig = field(default_factory=ClassificationConfig)

    def config(self, seed: int, **changes) -> ClassificationConfig:
        return self.task.replace(seed=seed, epochs_per_round=self.epochs_per_round, rounds=self.rounds, **changes)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "task"}, "task": self.task.to_dict()}


def skewed_profiles(seed: int, alpha: float, sites=SITES) -> list:
    """The default hospitals (their scanners) with a Dirichlet(alpha) grade mix each and equal size."""
    import numpy as np

    from fedbrain.synthetic.cohort import GRADES, default_site_profiles

    rng = np.random.default_rng([seed, 0xD1])
    return [replace(p, case_factor=1.0, grade_mix=dict(zip(GRADES, (round(float(v), 3) for v in rng.dirichlet([alpha] * 3)))))
            for p in default_site_profiles(len(sites), seed, list(sites))]


def relabel_large_gliomas(cases: list[dict], wt_ml: dict[str, float], threshold_ml: float) -> tuple[list[dict], int]:
    """A hospital that grades every glioma of ``threshold_ml`` or more (whole tumour) as HGG: its own labels."""
    out, changed = [], 0
    for c in cases:
        grade = "HGG" if c["grade"] == "LGG" and wt_ml.get(c["case_id"], 0.0) >= threshold_ml else c["grade"]
        changed += grade != c["grade"]
        out.append({**c, "grade": grade})
    return out, changed


def held_out_test(work: Path, s: SeedBenchSettings, seed: int) -> list[dict]:
    """Cases with CT of another cohort (seed + 1000, the default hospitals): never trained on."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.synthetic.cohort import synthesize_consortium

    synthesize_consortium(work / "test", sites=len(SITES), cases=s.test_cases, seed=seed + 1000,
                          site_names=list(SITES), atypical=s.atypical, progress=True)
    lists = [load_datalist(work / "test" / site / "datalist.json") for site in SITES]
    return [c for d in lists for c in d["training"] + d["validation"] if c.get("ct")]


def site_validation_cohort(work: Path, s: SeedBenchSettings, seed: int) -> tuple[dict[str, list[dict]], dict]:
    """More validation cases per hospital for the federated arms (seed + 2000, never trained on),
    with their true grades, and each case's whole-tumour volume (mL) for a site's own grading.

    Same site profiles as the pool (scanner and Dirichlet grade mix of this seed), so a site's extra
    cases look like its own.
    """
    from fedbrain.data.datalist import load_datalist
    from fedbrain.synthetic.cohort import synthesize_consortium

    if s.site_val_cases <= 0:
        return {site: [] for site in SITES}, {}
    manifest = synthesize_consortium(work / "siteval", sites=len(SITES), cases=s.site_val_cases, seed=seed + 2000,
                                     site_names=list(SITES), atypical=s.atypical, val_fraction=s.val_fraction,
                                     profiles=skewed_profiles(seed, s.alpha), progress=True)
    lists = {site: load_datalist(work / "siteval" / site / "datalist.json") for site in SITES}
    return ({site: d["training"] + d["validation"] for site, d in lists.items()},
            {c["case_id"]: c["wt_ml"] for c in manifest["cases"]})


def seed_data(work: Path, s: SeedBenchSettings, seed: int, console: Console) -> dict:
    """Both consortia of one seed as ``{name: {site: {"training": [...], "validation": [...]}}}``."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.data.splits import write_partitioned_datalists
    from fedbrain.synthetic.cohort import synthesize_consortium

    manifest = synthesize_consortium(work / "pool", sites=len(SITES), cases=s.cases, seed=seed, site_names=list(SITES),
                                     atypical=s.atypical, val_fraction=s.val_fraction,
                                     profiles=skewed_profiles(seed, s.alpha), progress=True)
    volumes = {c["case_id"]: c["wt_ml"] for c in manifest["cases"]}
    matters, relabelled = {}, 0
    for site in SITES:
        lists = load_datalist(work / "pool" / site / "datalist.json")
        if site == s.relabel_site:
            for section in ("training", "validation"):
                lists[section], n = relabel_large_gliomas(lists[section], volumes, s.relabel_wt_ml)
                relabelled += n
        matters[site] = lists
    pooled = [c for site in SITES for sec in ("training", "validation")
              for c in load_datalist(work / "pool" / site / "datalist.json")[sec]]
    write_partitioned_datalists(pooled, work / "iid", list(SITES), alpha=IID_ALPHA, seed=seed,
                                val_fraction=s.val_fraction, quantity_skew=False)
    iid = {site: load_datalist(work / "iid" / site / "datalist.json") for site in SITES}
    extra, extra_volumes = site_validation_cohort(work, s, seed)
    for site in SITES:  # each hospital judged on its own extra cases, graded its own way
        own = (relabel_large_gliomas(extra[site], extra_volumes, s.relabel_wt_ml)[0] if site == s.relabel_site
               else extra[site])
        matters[site]["validation"] = matters[site]["validation"] + own
    pooled_extra = [c for site in SITES for c in extra[site]]  # the IID consortium: true grades, dealt out evenly
    random.Random(seed).shuffle(pooled_extra)
    for i, site in enumerate(SITES):
        iid[site]["validation"] = iid[site]["validation"] + pooled_extra[i::len(SITES)]
    return {"matters": matters, "iid": iid, "relabelled": relabelled,
            "grade_mix": {p["name"]: p["grade_counts"] for p in manifest["sites"]}}


def federate(trainers: dict, config: ClassificationConfig, arm: str) -> dict:
    """One arm's rounds; returns each site's final model (global shared part + its head for ``personal``).

    Per round each site loads the global model into its own model object (the optimizer's moments
    carry on, as in the site loop), puts its own head back unless ``fedavg``, trains
    ``config.epochs_per_round``; the server averages the shared part (all of it for ``fedavg``)
    weighted by optimizer steps, as the FLARE job's FedAvg does.
    """
    from fedbrain.models.classifier import head_parameter_names

    network = config.replace(algorithm=arm)  # mixed adds the shared head
    start = network.build_model()  # init_seed = config.seed: every arm starts from the same trunks and fusion
    heads = set(head_parameter_names(start))
    averaged = [k for k in start.state_dict() if arm == "fedavg" or k not in heads]
    global_state = {k: v.clone() for k, v in start.state_dict().items()}
    models = {site: network.build_model() for site in trainers}
    for trainer in trainers.values():
        trainer.optimizer, trainer._opt_params = None, []  # a fresh optimizer per arm

    def receive(site):
        model = models[site]
        own = {k: v.clone() for k, v in model.state_dict().items() if k in heads}
        model.load_state_dict(global_state)
        if arm != "fedavg":
            model.load_state_dict(own, strict=False)  # round 0: the global initial head
        return model

    for _ in range(config.rounds):
        states, weights = {}, {}
        for site, trainer in trainers.items():
            model = receive(site)
            weights[site] = trainer.train(model)["steps"]
            states[site] = model.state_dict()
        total = sum(weights.values()) or 1
        for k in averaged:
            global_state[k] = sum(states[site][k].float() * (weights[site] / total)
                                  for site in trainers).to(global_state[k].dtype)
    return {site: receive(site) for site in trainers}


def simulate_federation(site_cases: dict, config: ClassificationConfig, arms=("personal", "fedavg", "mixed"),
                        console: Console | None = None) -> dict:
    """Personal vs FedAvg in process with the product's trainer (:func:`federate`): what the FLARE
    job does, minus FLARE. Final figure: each site's validation of its final model."""
    from fedbrain.tasks.classification import ClassificationTrainer

    trainers = {site: ClassificationTrainer(c["training"], c["validation"], config) for site, c in site_cases.items()}
    out = {}
    for arm in arms:
        models = federate(trainers, config, arm)
        metrics = {site: trainers[site].validate(model) for site, model in models.items()}
        per_site = {site: m["val_bacc"] for site, m in metrics.items()}
        values = [v for v in per_site.values() if v == v]
        out[arm] = {"per_site_bacc": per_site, "n_val": {site: m["n_val"] for site, m in metrics.items()},
                    "min_bacc": min(values), "mean_bacc": sum(values) / len(values)}
        if console:
            console.print(f"  {arm}: " + ", ".join(f"{k} {v:.3f} (n={out[arm]['n_val'][k]})" for k, v in per_site.items()))
    return out


def bench_seed_statistics(work: Path, settings: SeedBenchSettings | None = None, console: Console | None = None,
                          parts: tuple[str, ...] = ("matters", "iid", "central")) -> dict:
    """Every seed of ``settings.seeds``: centralized dual / MRI-only / CT-only, and personal vs FedAvg on
    both consortia. Written to the run folder after each seed, so a stopped run keeps what it measured."""
    s = settings or SeedBenchSettings()
    console = console or Console()
    root = Path(work) / f"classify-stats-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True)
    out = {"settings": s.to_dict(), "work": str(root), "seeds": {}}
    for seed in s.seeds:
        console.rule(f"seed {seed}")
        folder = root / f"seed{seed}"
        data = seed_data(folder, s, seed, console)
        row = out["seeds"][str(seed)] = {"relabelled": data["relabelled"], "grade_mix": data["grade_mix"]}
        for name in ("matters", "iid"):
            if name in parts:
                console.print(f"federated (in process), consortium: {name}")
                row[name] = simulate_federation(data[name], s.config(seed), console=console)
                (root / "results.json").write_text(json.dumps(out, indent=2, default=str))
        if "central" in parts:
            cen = replace(ClassifyBenchSettings(seed=seed, central_epochs=s.central_epochs, atypical=s.atypical),
                          task=s.task)
            train = [c for site in SITES for c in data["iid"][site]["training"]]
            test = held_out_test(folder, s, seed)
            with_ct = [c for c in train if c.get("ct")]
            row["central"] = {
                arm: {k: v for k, v in _central_arm(tr, test, None, cen, console, **kw).items()
                      if k.startswith(("bacc", "auc", "n_"))}
                for arm, tr, kw in (("dual", train, {}), ("mri_only", train, {"streams": ("mri",)}),
                                    ("ct_only", with_ct, {"streams": ("ct",)}),
                                    ("late_ct_complete", with_ct, {"fusion": "late", "modality_dropout": 0.0}))}
        (root / "results.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def ct_density_probe(train: list[dict], test: list[dict], c: float = 0.1) -> float:
    """Held-out balanced accuracy of a logistic regression on a few global CT density numbers.

    Why: tells "the synthetic CT carries no grade information" apart from "the CNN does not learn it".
    Same preprocessing as the classifier (the CT's two windows on the MRI grid, brain only).
    """
    import numpy as np
    from scipy import ndimage
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedbrain.data.multimodal import CT_WINDOWS, classification_transforms, load_classification_cases

    (lo, hi), _ = CT_WINDOWS

    def features(cases):
        ds, _ = load_classification_cases([x for x in cases if x.get("ct")], classification_transforms(False))
        rows, labels = [], []
        for item in ds.items:
            ct = np.asarray(item["ct"])
            hu = ndimage.gaussian_filter(ct[0] * (hi - lo) + lo, 0.7)
            core = ndimage.binary_erosion(ct[0] > 0, iterations=2)
            v = hu[core]
            med = np.median(v)
            rows.append([*(np.percentile(v, q) - med for q in (1, 3, 99, 99.9)), (v < med - 8).mean(),
                         (v > med + 8).mean(), ct[1].max(), (ct[1] > 0.05).sum()])
            labels.append(int(item["label"]))
        return np.array(rows), np.array(labels)

    (xtr, ytr), (xte, yte) = features(train), features(test)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
    return float(balanced_accuracy_score(yte, model.fit(xtr, ytr).predict(xte)))


def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t interval over seeds (NaN bounds with one value)."""
    import statistics

    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def stats_intro(st: dict) -> list[str]:
    """What the statistics section measured and how to read it (docs/benchmarks.md)."""
    settings = {k: v for k, v in st["settings"].items() if k != "task"}
    parts = st.get("parts_measured_at", {})
    when = ("; ".join(f"{part} {at}" for part, at in sorted(parts.items())) if len(set(parts.values())) > 1
            else st.get("measured_at", ""))
    return [f"Measured {when}; seeds {', '.join(st.get('seeds', {})) or 'none'} of "
            f"{', '.join(str(k) for k in settings['seeds'])} done. "
            f"Settings: `{json.dumps(settings)}`; run folder `{st['work']}` in bench's work folder."
            + (f" {st['note']}." if st.get("note") else ""), "",
            "Each seed draws a new synthetic cohort, split and initial weights. A figure is the mean over seeds with",
            "its 95% t interval; a gain is met only when its interval excludes 0. The consortium where",
            "personalization should matter: each hospital its own scanner and a Dirichlet grade mix, and "
            f"{settings['relabel_site']}",
            f"grades every glioma of {settings.get('relabel_wt_ml', '?')} mL or more (whole tumour) as HGG, with its "
            "validation labelled the same way; where it",
            "should not: the same cases re-split IID. "
            + (f"Each site is validated on its {settings['val_fraction']:.0%} of the pool plus {settings['site_val_cases']} more cases "
               "from the same hospital (scanner, grade mix, grading), never trained on. "
               if settings.get("site_val_cases") else "")
            + "Its federated arms run in process (bench/classify.py",
            "`federate`: the product's trainer, FedAvg weighted by steps, heads kept at the site; for `mixed` a shared "
            "head averaged with the trunks and each site's own correction kept), not as FLARE jobs.",
            "The centralized arms (dual, MRI-only, CT-only; late fusion trained on the CT-complete cases for the",
            "missing-modality rows) train on the IID consortium's training cases and are scored on a held-out cohort",
            "(seed + 1000) of cases with CT. The CT trunk compares the hemispheres (`ct_mirror`, on by default since",
            "2026-11-30; before it CT-only stayed at chance: docs/troubleshooting.md, ad).", ""]


def _verdict(ok: bool, n_seeds: int | None = None) -> str:
    if n_seeds is not None and n_seeds < MIN_SEEDS:
        return f"**not met** ({n_seeds} of {MIN_SEEDS} seeds)"
    return "met" if ok else "**not met**"


def _bound_verdict(whole: bool, mean: bool, n_seeds: int) -> str:
    """A threshold goal over seeds: met only when the whole 95% interval clears it; the mean alone can be luck."""
    if whole or not mean or n_seeds < MIN_SEEDS:
        return _verdict(whole, n_seeds)
    return "**not met** (the mean does, not the whole interval)"


def _span(counts) -> str:
    """"45" when every count is 45, "44-46" otherwise."""
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _signed_interval(values: list[float]) -> str:
    """Signed differences in points: "+m [lo, hi]" (mean and 95% interval over seeds)."""
    m, lo, hi = interval(values)
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def stats_rows(st: dict) -> list[tuple[str, str, str, str, str]]:
    """Rows with mean [95% interval] over seeds; the verdict is explicit: a gain is met only when its
    interval excludes 0 (and its mean reaches the goal); "within x" needs the whole interval inside."""
    seeds = st.get("seeds", {})
    keys = sorted(seeds, key=int)
    out = []

    def seeds_of(part):
        return f"seeds {', '.join(k for k in keys if part in seeds[k])}"

    cen = [seeds[k]["central"] for k in keys if "central" in seeds[k]]
    if cen:
        seeds_note = seeds_of("central")
        n_test = sorted({c["dual"]["n_test"] for c in cen})
        arms = {a: [c[a]["bacc"] for c in cen] for a in ("dual", "mri_only", "ct_only")}
        m, lo, hi = interval(arms["ct_only"])
        out.append(("CT-only test balanced accuracy (centralized), mean [95% interval]", f"{m:.3f} [{lo:.3f}, {hi:.3f}]",
                    ">= 0.60",
                    f"{seeds_note}; per seed " + " / ".join(f"{v:.3f}" for v in arms["ct_only"])
                    + f"; {_span(n_test)} held-out test "
                    "cases with CT per seed; met when the whole interval clears the goal",
                    _bound_verdict(lo >= 0.60, m >= 0.60, len(cen))))
        for a, b, label in (("dual", "mri_only", "Dual-stream - MRI-only"), ("mri_only", "ct_only", "MRI-only - CT-only")):
            diffs = [100 * (x - y) for x, y in zip(arms[a], arms[b])]
            m, lo, hi = interval(diffs)
            out.append((f"{label}, test balanced accuracy (points, centralized)", _signed_interval(diffs),
                        "> 0", f"{seeds_note}; {a} {interval(arms[a])[0]:.3f}, {b} {interval(arms[b])[0]:.3f} (means)",
                        _verdict(lo > 0, len(cen))))
        drops = {(a, m): [100 * (c[a]["bacc"] - c[a][f"bacc_no_{m}"]) for c in cen if a in c]
                 for a in ("dual", "late_ct_complete") for m in ("ct", "mri")}
        for m, name in (("ct", "CT"), ("mri", "MRI")):
            goal = DROP_GOALS[m]
            mean, lo, hi = interval(drops[("dual", m)])
            late = drops[("late_ct_complete", m)]
            beside = f"; late fusion trained on CT-complete cases: {_signed_interval(late)}" if late else ""
            out.append((f"Drop in test balanced accuracy with {name} missing at test time (points), robust fusion "
                        "(masked mean, modality dropout)", _signed_interval(drops[("dual", m)]), f"<= {goal:.0f}",
                        f"{seeds_note}; per seed " + " / ".join(f"{d:+.1f}" for d in drops[("dual", m)]) + beside
                        + "; met when the whole interval stays within the goal",
                        _bound_verdict(hi <= goal, mean <= goal, len(cen))))
    for name, goal, label in (("matters", 12.0, "where personalization should matter (label skew, one hospital's "
                               "own grading, scanner shift)"),
                              ("iid", 2.0, "where it should not (IID split, one labelling)")):
        for arm, title in PERSONAL_ARMS.items():
            runs = [seeds[k][name] for k in keys if arm in seeds[k].get(name, {})]
            if runs:
                out.append(_personalization_row(st, runs, seeds_of(name), arm, title, name, goal, label))
    return out


#: The personalization methods compared with FedAvg, as the rows name them.
PERSONAL_ARMS = {"personal": "Personal heads", "mixed": "Mixed heads (shared head + personal correction)"}


def _personalization_row(st: dict, runs: list[dict], seeds_note: str, arm: str, title: str, name: str, goal: float,
                         label: str) -> tuple:
    """One method against FedAvg at the minimum site, over seeds, on one consortium."""
    diffs = [100 * (r[arm]["min_bacc"] - r["fedavg"]["min_bacc"]) for r in runs]
    m, lo, hi = interval(diffs)
    n_val = sorted({n for r in runs for n in r[arm]["n_val"].values()})
    detail = (f"{seeds_note}; per seed " + " / ".join(f"{d:+.1f}" for d in diffs)
              + f"; min-site {arm} {interval([r[arm]['min_bacc'] for r in runs])[0]:.3f} vs "
              f"FedAvg {interval([r['fedavg']['min_bacc'] for r in runs])[0]:.3f} (means); mean-site {arm} - "
              f"FedAvg {_signed_interval([100 * (r[arm]['mean_bacc'] - r['fedavg']['mean_bacc']) for r in runs])}"
              f"; validation cases per site {_span(n_val)}; in-process federation")
    if name == "matters":
        site = st.get("settings", {}).get("relabel_site")
        at_site = [100 * (r[arm]["per_site_bacc"][site] - r["fedavg"]["per_site_bacc"][site])
                   for r in runs if site in r[arm].get("per_site_bacc", {})]
        if at_site:
            detail += f"; at {site} (its own grading) {arm} - FedAvg {_signed_interval(at_site)}"
        return (f"{title} - FedAvg, minimum-site balanced accuracy (points), {label}", _signed_interval(diffs),
                f">= +{goal:.0f}, interval > 0", detail, _verdict(m >= goal and lo > 0, len(runs)))
    return (f"{title} - FedAvg, minimum-site balanced accuracy (points), {label}", _signed_interval(diffs),
            f"within +-{goal:.0f} (whole interval)", detail, _verdict(-goal <= lo and hi <= goal, len(runs)))


# --------------------------------------------------------------------------- doc rows and plots


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def rows(c: dict) -> list[tuple[str, str, str, str]]:
    """Benchmark table rows (what, measured, goal, detail)."""
    out = []
    fed, cen = c.get("federated", {}), c.get("central", {})
    if "personal" in fed and "fedavg" in fed:
        p, f = fed["personal"], fed["fedavg"]
        out.append(("Personal heads - FedAvg shared head: minimum-site balanced accuracy (points), "
                    f"Dirichlet({c['settings']['alpha']})", f"{100 * (p['min_bacc'] - f['min_bacc']):+.1f}", ">= +12",
                    f"min {_f(p['min_bacc'])} vs {_f(f['min_bacc'])}; mean {_f(p['mean_bacc'])} vs {_f(f['mean_bacc'])}"))
    if "fedprox" in fed and "personal" in fed:
        x, p = fed["fedprox"], fed["personal"]
        mu = c["settings"].get("fedprox_mu", c["settings"].get("task", {}).get("fedprox_mu"))
        out.append((f"FedProx (mu={mu}) - FedAvg, both with personal heads: "
                    "minimum-site balanced accuracy (points)", f"{100 * (x['min_bacc'] - p['min_bacc']):+.1f}", "",
                    f"min {_f(x['min_bacc'])} vs {_f(p['min_bacc'])}; mean {_f(x['mean_bacc'])} vs {_f(p['mean_bacc'])}"))
    if "scaffold" in fed and "personal" in fed:
        x, p = fed["scaffold"], fed["personal"]
        out.append(("SCAFFOLD - FedAvg, both with personal heads: minimum-site balanced accuracy (points)",
                    f"{100 * (x['min_bacc'] - p['min_bacc']):+.1f}", "",
                    f"min {_f(x['min_bacc'])} vs {_f(p['min_bacc'])}; mean {_f(x['mean_bacc'])} vs {_f(p['mean_bacc'])}"))
    if fed and all("rounds_to_target" in a for a in fed.values()):
        arms = [a for a in FED_ARMS if a in fed]
        out.append((f"Rounds until the minimum site reaches balanced accuracy {TARGET} ({' / '.join(arms)})",
                    " / ".join(_f(fed[a]["rounds_to_target"], "{:d}") for a in arms), "",
                    "round 0 = untrained model; – = never"))
        out.append((f"Minimum-site balanced accuracy averaged over all rounds ({' / '.join(arms)})",
                    " / ".join(_f(fed[a]["mean_min_site_over_rounds"]) for a in arms), "",
                    "area under the minimum-site curve"))
    if "late_ct_complete" in cen and "robust_ct_complete" in cen:
        late, rob = cen["late_ct_complete"], cen["robust_ct_complete"]
        for drop, name in (("ct", "CT"), ("mri", "MRI")):
            d_late = 100 * (late["bacc"] - late[f"bacc_no_{drop}"])
            d_rob = 100 * (rob["bacc"] - rob[f"bacc_no_{drop}"])
            out.append((f"Drop in balanced accuracy with {name} missing at test time (points): robust vs late fusion",
                        f"{d_rob:.1f} vs {d_late:.1f}", f"robust <= {DROP_GOALS[drop]:.0f}",
                        f"robust {_f(rob['bacc'])} -> {_f(rob[f'bacc_no_{drop}'])}; "
                        f"late {_f(late['bacc'])} -> {_f(late[f'bacc_no_{drop}'])}"))
    if {"dual", "mri_only", "ct_only"} <= set(cen):
        d, m, t = cen["dual"], cen["mri_only"], cen["ct_only"]
        out.append(("Dual-stream vs MRI-only vs CT-only, test balanced accuracy (centralized)",
                    f"{_f(d['bacc'])} / {_f(m['bacc'])} / {_f(t['bacc'])}", "dual > both",
                    f"AUC {_f(d['auc'])} / {_f(m['auc'])} / {_f(t['auc'])}; {c['n_test']} test cases with MRI+CT"))
    if "dual" in cen and fed:
        best = max(fed, key=lambda a: fed[a]["min_bacc"])
        ceiling = cen["dual"]["per_site_bacc"]
        out.append(("Pooled (centralized) ceiling vs best federated arm: minimum-site balanced accuracy",
                    f"{_f(min(ceiling.values()))} vs {_f(fed[best]['min_bacc'])}", "",
                    f"best federated arm: {best}"))
    return out


def plot(c: dict, img: Path, tag: str = "classify") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    out = []
    fed, cen = c.get("federated", {}), c.get("central", {})
    if fed:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        arms = [a for a in FED_ARMS if a in fed]
        groups = list(arms) + (["pooled ceiling"] if "dual" in cen else [])
        w = 0.8 / len(groups)
        for k, arm in enumerate(groups):
            values = cen["dual"]["per_site_bacc"] if arm == "pooled ceiling" else fed[arm]["per_site_bacc"]
            ax.bar([i + (k - (len(groups) - 1) / 2) * w for i in range(len(SITES))],
                   [values.get(site) or 0 for site in SITES], w, label=arm)
        ax.set_xticks(range(len(SITES)), SITES)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("balanced accuracy, site's own validation cases")
        ax.set_title(f"Final model per site, Dirichlet({c['settings']['alpha']}) split")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        for arm in arms:
            ax2.plot(fed[arm]["min_site_curve"], "o-", label=arm, ms=3)
        ax2.set_xlabel("round")
        ax2.set_ylabel("minimum-site balanced accuracy")
        ax2.set_title("Minimum site per round")
        ax2.set_ylim(0, 1.05)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(img / f"bench_federated_{tag}.png", dpi=110)
        plt.close(fig)
        out.append(f"img/bench_federated_{tag}.png")
    if cen:
        arms = [a for a in ("dual", "mri_only", "ct_only", "late_ct_complete", "robust_ct_complete") if a in cen]
        fig, ax = plt.subplots(figsize=(9, 4))
        w = 0.27
        for k, (key, label) in enumerate((("bacc", "MRI + CT"), ("bacc_no_ct", "CT missing"), ("bacc_no_mri", "MRI missing"))):
            ax.bar([i + (k - 1) * w for i in range(len(arms))], [cen[a].get(key) or 0 for a in arms], w, label=label)
        ax.set_xticks(range(len(arms)), [a.replace("_", "\n") for a in arms])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test balanced accuracy")
        ax.set_title("Centralized arms on the held-out test cohort")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(img / f"bench_central_{tag}.png", dpi=110)
        plt.close(fig)
        out.append(f"img/bench_central_{tag}.png")
    return out


def per_site_lines(c: dict) -> list[str]:
    fed, cen = c.get("federated", {}), c.get("central", {})
    if not fed:
        return []
    lines = ["Classification, final balanced accuracy per site (n = validation cases at that site):", "",
             "| site | n | " + " | ".join(a for a in FED_ARMS if a in fed) + (" | pooled ceiling |" if "dual" in cen else " |"),
             "|---|---|" + "---|" * (len(fed) + ("dual" in cen))]
    any_arm = next(iter(fed.values()))
    for site in SITES:
        cells = [_f(fed[a]["per_site_bacc"].get(site)) for a in FED_ARMS if a in fed]
        if "dual" in cen:
            cells.append(_f(cen["dual"]["per_site_bacc"].get(site)))
        n = any_arm["n_val"].get(site)
        lines.append(f"| {site} | {_f(n, '{:.0f}')} | " + " | ".join(cells) + " |")
    return lines + [""]
