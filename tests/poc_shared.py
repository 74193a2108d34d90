"""One POC consortium for the whole session, shared by the POC modules that need nothing special
of it (same project, same site policies at start), and their first jobs run side by side on it.

Why: each POC module used to provision, start and stop its own consortium (~30-40 s of CPU-heavy
process starts each) and ran its jobs one after another; the POC modules were 18 of the suite's
20 minutes. Here the consortium starts once, every module's independent first job is submitted
together (:func:`first_wave`; FLARE runs several jobs at once and their start, round and end
latencies overlap), and each module then runs only what depends on earlier results or changes a
site (a budget, a datalist, a policy), one module at a time.

A module that changes a site puts it back: :meth:`SharedPoc.reset_site_configs` rewrites every
site's local/fedbrain_site.json; a changed privacy policy is restored (and the sites restarted) by
:meth:`SharedPoc.restore_policies` before the next module uses the consortium.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedbrain.demo import ClassifyDemoSettings, DemoSettings, export_job, prepare_classification_data
from fedbrain.fl.site import write_site_config
from fedbrain.jobs import classification as classification_job
from fedbrain.jobs import segmentation as segmentation_job
from fedbrain.poc.consortium import PocConsortium
from fedbrain.poc.runner import run_jobs_side_by_side
from fedbrain.synthetic.cohort import synthesize_consortium
from fedbrain.tasks.classification import ClassificationConfig
from fedbrain.tasks.segmentation import SegmentationConfig
from fedbrain_testing.attack import admit_attack_filter, export_with_attack

#: The attack modules' poisoned site (tests/test_poc_attacks.py reads it from here).
ATTACKER = "hospital-b"
#: Rounds of the clean segmentation job, which both test_poc_attacks (as its clean baseline) and
#: test_poc_e2e (as the end-to-end job) check, and of the guarded one.
SEG_ROUNDS = 3
#: The shared classification cohort (tests/test_poc_classify.py, test_poc_he.py, test_poc_policy.py).
CLS_DATA = dict(cases=8, seed=3)


@dataclass
class SharedPoc:
    poc: PocConsortium
    run_dir: Path
    seg_data: Path  # <site>/datalist.json: segmentation (hospital-b holds one broken case)
    cls_data: Path  # <site>/datalist.json: classification, Dirichlet-split
    user_state_before: dict = field(default_factory=dict)  # ~/.nvflare and /tmp/nvflare before anything ran
    started_pids: list[int] = field(default_factory=list)
    changed_policies: dict = field(default_factory=dict)  # site -> its original local/privacy.json text
    restart_before_use: set = field(default_factory=set)  # sites whose restored policy FLARE has not read yet
    local_state_before_wave: dict = field(default_factory=dict)  # local_state() around the first wave
    local_state_after_wave: dict = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return self.poc.sites

    def site_config(self, site: str, **changes) -> None:
        """What a hospital's IT writes: its datalist per task, plus any privacy keys in ``changes``."""
        datalists = {"segmentation": str(self.seg_data / site / "datalist.json"),
                     "classification": str(self.cls_data / site / "datalist.json")}
        datalists.update(changes.pop("datalists", {}))
        write_site_config(self.poc.kit(site), Path(datalists["segmentation"]), num_threads=1, min_validation_cases=1,
                          datalists=datalists, **changes)

    def reset_site_configs(self) -> None:
        for site in self.sites:
            self.site_config(site)

    def change_policy(self, site: str, edit) -> None:
        """Edit a site's local/privacy.json (``edit(policy) -> None``) and restart it: FLARE reads
        scopes at start-up. :meth:`restore_policies` puts the original back."""
        from fedbrain_testing.faults import kill_participant, start_participant

        path = self.poc.kit(site) / "local" / "privacy.json"
        self.changed_policies.setdefault(site, path.read_text())
        policy = json.loads(path.read_text())
        edit(policy)
        path.write_text(json.dumps(policy, indent=2))
        kill_participant(self.poc, site)
        start_participant(self.poc, site)

    def restore_policies(self) -> None:
        """Put the original policies back; the sites restart when the next module asks for the
        consortium (:meth:`ready`), so the last module to change a policy costs no restart."""
        for site, text in list(self.changed_policies.items()):
            (self.poc.kit(site) / "local" / "privacy.json").write_text(text)
            self.restart_before_use.add(site)
            del self.changed_policies[site]

    def ready(self) -> "SharedPoc":
        """The consortium as provisioned: sites whose policy was restored are restarted first."""
        from fedbrain_testing.faults import kill_participant, start_participant

        for site in sorted(self.restart_before_use):
            kill_participant(self.poc, site)
            start_participant(self.poc, site)
        self.restart_before_use.clear()
        return self


def _user_state() -> dict:
    real = Path(os.path.expanduser("~")) / ".nvflare"
    return {"real_nvflare": real, "real_before": real.exists() and sorted(p.name for p in real.iterdir()),
            "tmp_nvflare_before": Path("/tmp/nvflare").exists()}


@pytest.fixture(scope="session")
def shared_poc(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("poc_shared")
    user_state = _user_state()
    poc = PocConsortium(run_dir)
    seg = run_dir / "seg_data"
    synthesize_consortium(seg, sites=3, cases=8, seed=1, site_names=poc.sites, progress=False)
    # One broken case at hospital-b: it must be skipped and reported, not crash the site (test_poc_e2e).
    dl = json.loads((seg / "hospital-b" / "datalist.json").read_text())
    broken = seg / "hospital-b" / dl["training"][0]["image"][3]
    broken.write_bytes(broken.read_bytes()[:200])
    cls = prepare_classification_data(run_dir / "cls_data", poc.sites, ClassifyDemoSettings(**CLS_DATA))
    shared = SharedPoc(poc, run_dir, seg, cls, user_state)
    try:
        poc.prepare()
        shared.reset_site_configs()
        admit_attack_filter(poc)  # test_poc_attacks' poisoned site; no provisioned kit admits it
        poc.start()
        shared.started_pids = poc.pids()
        yield shared
    finally:
        poc.clean(graceful=False)  # results are downloaded: teardown by PID; raises if anything survives
    left = [pid for pid in shared.started_pids
            if Path(f"/proc/{pid}").exists() and str(poc.workspace) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert not left and not poc.pids() and not poc.workspace.exists(), f"the shared POC left processes {left}"


def first_wave_jobs(shared: SharedPoc) -> dict[str, Path]:
    """Every shared module's first job, exported (name -> folder). Personal-head jobs have their own
    names: a site keeps one head store per job name, and these run at the same time."""
    jobs = shared.run_dir / "jobs"
    sites = shared.sites
    # min_trained_sites 2: the guard refuses the attacker, and the two others' rounds must still be published
    attack = SegmentationConfig(rounds=SEG_ROUNDS, epochs_per_round=2, min_clients=3, guard_flag_after=2, min_trained_sites=2)
    x100 = {"site": ATTACKER, "kind": "scale", "factor": 100}
    he_cls = ClassificationConfig(name="poc_he_classification", rounds=2, epochs_per_round=1, seed=3, he=True)
    return {
        # test_poc_he: an encrypted classifier and an encrypted segmentation job
        "he_cls": export_job(jobs / "he_cls", ClassifyDemoSettings(task=he_cls, **CLS_DATA), sites),
        "he_seg": export_job(jobs / "he_seg", DemoSettings(task=SegmentationConfig(
            name="poc_he_segmentation", rounds=1, epochs_per_round=1, max_steps=2, he=True)), sites),
        # test_poc_attacks: clean, guarded against a x100 site, and the same attack unguarded (one round
        # is enough to break an unguarded model, whose final model is that round's). The clean job is
        # also test_poc_e2e's end-to-end job (hospital-b's broken case skipped and reported).
        "attack_clean": segmentation_job.export(attack.replace(name="attack_clean"), jobs / "clean"),
        "attack_guarded": export_with_attack(attack.replace(name="attack_guarded"), jobs / "guarded", x100),
        "attack_plain": export_with_attack(attack.replace(name="attack_plain", guard=False, rounds=1), jobs / "plain",
                                           x100),
        # test_poc_classify: personal heads, then (in the module) SCAFFOLD under the same name
        "classify": classification_job.export(classify_config(), jobs / "classify", sites=sites),
        # test_poc_hostile: a config-only job naming a fedbrain function, refused at every site
        "hostile_function": hostile_job(jobs / "hostile_function", sites),
        # ... jobs whose own filters undo their scope's promise, refused by each site's final check
        "hostile_encrypted": hostile_encrypted_job(jobs / "hostile_encrypted", sites),
        "hostile_dp": hostile_dp_job(jobs / "hostile_dp", sites),
        # ... and filters that rewrite a `dp` site's noised update or inflate its weight (one site trains: the
        # round is not published under min_trained_sites 3)
        "hostile_dp_filters": hostile_dp_filters_job(jobs / "hostile_dp_filters", sites),
        # test_poc_secagg: masked updates seen by a curious server, with a site killed after the key setup
        "secagg_lost": secagg_job(jobs / "secagg_lost", "poc_secagg_lost", sites, crash=("hospital-c", 0),
                                  min_clients=2, min_responses=2, min_trained_sites=2, round_timeout=45,
                                  dead_site_grace=10),
        "secagg_swapped": secagg_job(jobs / "secagg_swapped", "poc_secagg_swapped", sites, swap="hospital-c"),
    }


def _edit_app(job: Path, app: str, edit) -> None:
    path = job / app / "config" / ("config_fed_server.json" if app == "app_server" else "config_fed_client.json")
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def secagg_job(out: Path, name: str, sites, crash: tuple[str, int] | None = None, swap: str | None = None,
               **changes) -> Path:
    """A secure-aggregation classifier job under the `secagg` scope, with a curious server filter that keeps what
    the server received; ``crash = (site, round)``: that site's job process is killed before it sends that round;
    ``swap``: the server substitutes that site's masking key in the setup."""
    job = classification_job.export(classify_config(name=name, secagg=True, **changes), out, sites=sites)
    meta = json.loads((job / "meta.json").read_text())
    meta["scope"] = "secagg"  # every site's final check then refuses anything but a masked update
    (job / "meta.json").write_text(json.dumps(meta, indent=2))

    def curious(config):  # after the server's audit, in its `train` chain (FLARE takes one chain per task)
        (chain,) = [c for c in config["task_result_filters"] if c["tasks"] == ["train"]]
        chain["filters"].append({"path": "fedbrain_testing.attack.CuriousServer", "args": {}})
    _edit_app(job, "app_server", curious)
    if swap:
        _edit_app(job, "app_server", lambda c: c.setdefault("task_data_filters", []).append(
            {"tasks": ["secagg_share"], "filters": [{"path": "fedbrain_testing.attack.SwapSecAggKey",
                                                     "args": {"site": swap}}]}))
    if crash:
        def kill(config):
            config["task_result_filters"][0]["filters"].insert(0, {
                "path": "fedbrain_testing.attack.CrashBeforeSend", "args": {"site": crash[0], "round_no": crash[1]}})
        _edit_app(job, f"app_{crash[0]}", kill)
    return job


#: What each site's app of :func:`hostile_job` adds to the plain segmentation job, configuration only: a
#: fedbrain function that rewrites the hospital's local settings without its privacy keys (issue 25's critical
#: finding), one that deletes a folder (the site's privacy ledger), and a class of FLARE's own default list that
#: reads a job-supplied data folder at the site (the XGBoost CSV loader). Every site must refuse its app at load.
HOSTILE_COMPONENTS = {
    "hospital-a": {"id": "hostile", "path": "fedbrain.fl.site.write_site_config",
                   "args": {"workspace": "{WORKSPACE}", "datalist": "/tmp/hostile/datalist.json"}},
    "hospital-b": {"id": "hostile", "path": "fedbrain.synthetic.cohort.write_case",
                   "args": {"case": {}, "folder": "{WORKSPACE}/privacy", "affine": [], "case_id": "x"}},
    "hospital-c": {"id": "hostile", "path": "nvflare.app_opt.xgboost.histogram_based_v2.csv_data_loader.CSVDataLoader",
                   "args": {"folder": "{WORKSPACE}/.."}},
}


def hostile_job(out: Path, sites) -> Path:
    """The plain segmentation job with each site's :data:`HOSTILE_COMPONENTS` entry added to its app."""
    job = segmentation_job.export(SegmentationConfig(name="hostile_function", rounds=1, max_steps=1), out)

    def edit(site, client):
        client.setdefault("components", []).append(HOSTILE_COMPONENTS[site])

    return per_site_job(job, sites, edit, scope=None)


#: What each site's app of :func:`hostile_encrypted_job` does after FLARE's encryptor (None: nothing hostile).
HOSTILE_ENCRYPTED = {
    "hospital-a": "fedbrain's decryptor after the encryptor",
    "hospital-b": "the encryptor told to encrypt the biases only",
    "hospital-c": None,
}


def per_site_job(job: Path, sites, edit_site, scope: str | None) -> Path:
    """An exported one-app (@ALL) job rewritten as a server app and one app per site, each site's
    config passed through ``edit_site(site, config)``, under the privacy ``scope`` the job names (None:
    each site's default)."""
    import shutil

    app = job / "app" / "config"
    server, client = json.loads((app / "config_fed_server.json").read_text()), json.loads((app / "config_fed_client.json").read_text())
    shutil.rmtree(job / "app")
    (job / "app_server" / "config").mkdir(parents=True)
    (job / "app_server" / "config" / "config_fed_server.json").write_text(json.dumps(server, indent=2))
    for site in sites:
        (job / f"app_{site}" / "config").mkdir(parents=True)
        config = json.loads(json.dumps(client))
        edit_site(site, config)
        (job / f"app_{site}" / "config" / "config_fed_client.json").write_text(json.dumps(config, indent=2))
    meta = json.loads((job / "meta.json").read_text())
    meta.update(deploy_map={"app_server": ["server"], **{f"app_{s}": [s] for s in sites}})
    if scope:
        meta["scope"] = scope
    (job / "meta.json").write_text(json.dumps(meta, indent=2))
    return job


def hostile_encrypted_job(out: Path, sites) -> Path:
    """An encrypted segmentation job under the `encrypted` scope whose site apps undo the encryption
    (:data:`HOSTILE_ENCRYPTED`), configuration only. One answering site is enough for the job's round."""
    config = SegmentationConfig(name="hostile_encrypted", rounds=1, epochs_per_round=1, max_steps=1, he=True,
                                min_clients=1, min_responses=1)

    def edit(site, client):
        train = next(f for f in client["task_result_filters"] if f["tasks"] == ["train"])["filters"]
        if site == "hospital-a":
            train.append({"path": "fedbrain.filters.he.SharedPartDecryptor", "args": {}})
        elif site == "hospital-b":
            train[-1]["args"]["encrypt_layers"] = "bias$"

    return per_site_job(segmentation_job.export(config, out), sites, edit, scope="encrypted")


def hostile_dp_job(out: Path, sites) -> Path:
    """A SCAFFOLD classification job under the `dp` scope: its control difference (the local update in
    disguise) rides in meta, past the site's client-level DP noise."""
    # min_clients 3: FLARE's SCAFFOLD asks min_clients sites (a random subset when fewer), here every site.
    config = classify_config(name="hostile_dp", algorithm="scaffold", rounds=1, min_clients=3)
    job = classification_job.export(config, out, sites=sites)
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "scope": "dp"}, indent=2))
    return job


#: What each site's app of :func:`hostile_dp_filters_job` does after the `dp` scope's noise (None: nothing).
HOSTILE_DP_FILTERS = {
    "hospital-a": {"kind": "scale", "factor": 100},  # rewrites the noised payload
    "hospital-b": {"kind": "weight", "factor": 100},  # inflates the update's FedAvg weight
    "hospital-c": None,
}


def hostile_dp_filters_job(out: Path, sites) -> Path:
    """A classifier job under the `dp` scope whose own result filters, which FLARE runs after the scope's,
    rewrite the noised update (hospital-a) or inflate its weight (hospital-b); hospital-c's app is plain. The
    rewriting filter is the test-support PoisonUpdate (POC kits admit it), standing for any filter a job adds."""
    job = classification_job.export(classify_config(name="hostile_dp_filters", rounds=1, min_clients=1,
                                                    min_responses=1), out, sites=sites)
    for site, attack in HOSTILE_DP_FILTERS.items():
        if attack:
            _edit_app(job, f"app_{site}", lambda c, a=attack, s=site: next(
                f for f in c["task_result_filters"] if "train" in f["tasks"])["filters"].append(
                {"path": "fedbrain_testing.attack.PoisonUpdate", "args": {"site": s, **a}}))
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "scope": "dp"}, indent=2))
    return job


#: test_poc_e2e's DP job from a public start.
#: Both DP mechanisms on the part: DP-SGD trains only it, and client-level DP noises only it and sends the rest as
#: 0 (noise on the frozen rest would move it, which the test would see).
DP_START_JOB = SegmentationConfig(name="poc_dp_start", rounds=1, epochs_per_round=1, max_steps=2,
                                  dp_noise_multiplier=1.0, dp_delta=1e-5, min_trained_sites=2,
                                  client_dp_clip=1.0, client_dp_noise=0.5)


def seeded_start(out: Path, config) -> Path:
    """A start for ``config``'s network (start.pt + start.json, as `fedbrain pretrain` writes them) holding the
    weights of another init seed: what the test needs is weights the job's own seeded network would not have."""
    from fedbrain.models import start

    other = config.replace(seed=config.seed + 7, start_model=None, dp_ready=True)
    made = start.save(other.build_model().state_dict(), out,
                      {"task": config.TASK, "model_spec": other.model_spec(), "epochs": 0, "public_validation": {},
                       "public_data": [], "created": "test"})
    return made.weights


def local_state(poc) -> dict:
    """Hashes of every file in each site kit's local/ and privacy/ (the ledger): what a job must not change."""
    import hashlib

    return {str(p.relative_to(poc.workspace)): hashlib.sha256(p.read_bytes()).hexdigest()
            for site in poc.sites for folder in ("local", "privacy")
            for p in sorted((poc.kit(site) / folder).rglob("*")) if p.is_file()}


def classify_config(**changes) -> ClassificationConfig:
    """test_poc_classify's jobs: one name, so the second job finds the heads the first one kept."""
    return ClassificationConfig(name="poc_classify", rounds=2, epochs_per_round=1, seed=3, min_clients=3).replace(**changes)


@pytest.fixture(scope="session")
def first_wave(shared_poc):
    """name -> (job meta, downloaded result folder, seconds): every shared module's first job, side by side."""
    jobs = first_wave_jobs(shared_poc)
    shared_poc.local_state_before_wave = local_state(shared_poc.ready().poc)
    results = run_jobs_side_by_side(shared_poc.poc, jobs, shared_poc.run_dir / "results", max_active=4, timeout=1500)
    shared_poc.local_state_after_wave = local_state(shared_poc.poc)
    missing = {name: meta.get("status") for name, (meta, path, _) in results.items()
               if path is None and not name.startswith(("hostile", "secagg_swapped"))}
    assert not missing, f"jobs of the shared POC did not finish: {missing}"
    return results



@pytest.fixture(scope="session")
def second_wave(shared_poc, first_wave):
    """What depends on the first wave, side by side: test_poc_classify's SCAFFOLD job (it must find the
    heads its first job kept) and its mixed-heads job (it must not), and test_poc_e2e's job in which hospital-c's IT points its segmentation
    datalist at a file that is not there (the classifier job at hospital-c is not affected)."""
    poc, run_dir = shared_poc.ready().poc, shared_poc.run_dir
    shared_poc.site_config("hospital-c", datalists={"segmentation": str(run_dir / "missing" / "datalist.json")})
    try:
        heads_before = {s: (poc.kit(s) / "personal" / classify_config().name / "head.pt").read_bytes()
                        for s in shared_poc.sites}
        jobs = {"classify_scaffold": classification_job.export(classify_config(algorithm="scaffold"),
                                                               run_dir / "jobs" / "classify2", sites=shared_poc.sites),
                # test_poc_classify: algorithm mixed under the same job name must keep its correction apart
                "classify_mixed": classification_job.export(classify_config(algorithm="mixed"),
                                                            run_dir / "jobs" / "classify_mixed", sites=shared_poc.sites),
                # test_poc_e2e: DP-SGD on the declared part of a public start (hospital-c, without data here,
                # trains nothing: min_trained_sites 2 publishes the two others' round)
                "dp_start": segmentation_job.export(DP_START_JOB.replace(
                    start_model=str(seeded_start(run_dir / "start", DP_START_JOB))), run_dir / "jobs" / "dp_start",
                    sites=shared_poc.sites),
                "e2e_bad_site": export_job(run_dir / "jobs" / "e2e_bad_site",
                                           DemoSettings(task=SegmentationConfig(rounds=1, epochs_per_round=1)),
                                           shared_poc.sites)}
        results = run_jobs_side_by_side(poc, jobs, run_dir / "results2", max_active=2, timeout=900)
    finally:
        shared_poc.reset_site_configs()
    missing = {name: meta.get("status") for name, (meta, path, _) in results.items() if path is None}
    assert not missing, f"jobs of the shared POC did not finish: {missing}"
    return {**results, "classify_heads_after_job1": heads_before}
