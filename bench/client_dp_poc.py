"""Client-level DP from a public start, once for real: a 12-hospital POC consortium (issue 26).

The in-process curve (bench/client_dp_start.py) simulates the site loop; this runs it: a FLARE server and
12 site processes from 12 provisioned kits (mTLS), the classifier job from the public start exported with
client-level DP and submitted through the admin API. Hospitals are the first 12 of the simulation's 30,
with the same settings (5 rounds, clip, noise for epsilon 8 per hospital, DP on the declared part).
What is checked on what the server ended with: the job completed, the final global model's frozen values
are the start's bit for bit (the sites sent 0 there), which values of the part moved (the sites' default
``standard`` scope keeps the grade head, head.*, at each site: only fusion.* reaches the server), and its
balanced accuracy on the simulation's held-out cases.

    python bench/run.py --only client_dp_poc     # ~10 min on 2 cores
"""

from __future__ import annotations

import time
from pathlib import Path

TITLE = "Client-level DP from a public start: one POC run at 12 hospitals"
SITES = 12


def run(work: Path, console) -> dict:
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from client_dp_start import TASK, ClientDPStartSettings, _config, consortium, noise_for
    from dp_start import DPStartSettings, public_start

    from fedbrain.jobs.classification import export
    from fedbrain.poc.consortium import PocConsortium
    from fedbrain.poc.runner import submit_and_wait
    from fedbrain.tasks.classification import ClassificationTrainer
    from fedbrain_testing.load import write_project

    s = ClientDPStartSettings()
    start = public_start(work, TASK, DPStartSettings().tasks[TASK], console)
    lists = consortium(work, s)
    sigma = noise_for(s.epsilons[0], s.rounds, s.delta)
    run_dir = Path(work) / f"client-dp-poc-{time.strftime('%Y%m%d-%H%M%S')}"
    poc = PocConsortium(run_dir, write_project(SITES, run_dir / f"project-{SITES}-sites.yml"))
    data = run_dir / "data"
    data.mkdir(parents=True)
    for site, hospital in zip(poc.sites, list(lists)[:SITES]):  # each POC site holds one simulated hospital
        source = next(Path(work).glob(f"client_dp_start/hospitals-*/{hospital}"))
        (data / site).symlink_to(source.resolve(), target_is_directory=True)
    config = _config(s, start, 0, sigma).replace(name="client_dp_poc", min_clients=SITES, num_threads=1)
    job = export(config, run_dir / "jobs", sites=poc.sites)
    out = {"sites": SITES, "noise": sigma, "settings": {k: getattr(s, k) for k in ("rounds", "clip", "lr",
                                                                                   "batch_size", "epsilons")}}
    try:
        t = time.time()
        poc.up(data_dir=data, timeout=300)
        out["poc_start_s"] = time.time() - t
        t = time.time()
        meta, result = submit_and_wait(poc, job, rounds=s.rounds, result_dir=run_dir / "result", console=console)
        out["job_s"], out["status"] = time.time() - t, meta.get("status")
        epsilons = []  # each site's own log line per release (the site logs go with the consortium)
        for log in (run_dir / "poc").rglob("log.txt"):
            for line in log.read_text(errors="replace").splitlines():
                if "client-level DP: release" in line and "epsilon" in line:
                    epsilons.append(float(line.rsplit("epsilon ", 1)[1].split()[0]))
        out["max_epsilon_logged"] = max(epsilons) if epsilons else None
        out["releases_logged"] = len(epsilons)
    finally:
        poc.clean()
    saved = torch.load(next(result.glob("**/FL_global_model.pt")), weights_only=False)
    final = {k: torch.as_tensor(v) for k, v in saved.get("model", saved).items()}
    weights = start.state_dict()
    part = set(config.trainable_names(list(weights)))
    out["frozen_values"] = sum(weights[k].numel() for k in weights if k not in part)
    out["frozen_equal"] = all(torch.equal(final[k].to(weights[k].dtype), weights[k]) for k in weights if k not in part)
    # The sites' default `standard` scope keeps every head.* tensor at its site (personal heads), so of the
    # classifier's part only fusion.* can reach the server.
    out["part_moved"] = sorted(k for k in part if not torch.equal(final[k].to(weights[k].dtype), weights[k]))
    out["part_unmoved"] = sorted(k for k in part if k not in out["part_moved"])
    held_out = [c for dl in lists.values() for c in dl["validation"]]
    test = ClassificationTrainer([], held_out, config)
    model = config.build_model()
    model.load_state_dict({k: final[k].to(v.dtype) for k, v in model.state_dict().items()})
    out["val_bacc"] = test.validate(model)["val_bacc"]
    out["n_held_out"] = len(test.val_ds)
    console.print(f"  client-level DP POC, {SITES} hospitals: {out['status']}, val_bacc {out['val_bacc']:.3f}, "
                  f"frozen rest unchanged: {out['frozen_equal']}, max epsilon {out['max_epsilon_logged']}")
    return out


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    done = r.get("status") == "FINISHED:COMPLETED"
    return [
        (f"{r['sites']}-hospital POC, classifier from the public start with client-level DP: the job",
         r.get("status", "?"), "FINISHED:COMPLETED", f"{r['settings']['rounds']} rounds in {r.get('job_s', 0):.0f} s "
         f"(consortium up in {r.get('poc_start_s', 0):.0f} s)", "met" if done else "**not met**"),
        ("... the final global model's frozen values are the start's, bit for bit",
         "yes" if r["frozen_equal"] else "no", "yes", f"{r['frozen_values']:,} values outside the part; of the part, "
         f"moved: {', '.join(r['part_moved']) or 'none'}; the start's still: {', '.join(r['part_unmoved']) or 'none'} "
         f"(each site's `standard` scope keeps head.* at the site)", "met" if r["frozen_equal"] else "**not met**"),
        ("... its balanced accuracy on the simulation's held-out cases", f"{r['val_bacc']:.3f}", "",
         f"{r['n_held_out']} cases; noise multiplier {r['noise']:.2f}, clip {r['settings']['clip']:g}; largest "
         f"epsilon a site logged {r['max_epsilon_logged'] or 0:.2f} over {r['releases_logged']} releases"),
    ]
