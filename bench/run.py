"""fedbrain benchmarks: measured side by side in one run, written to bench/results.json and
docs/benchmarks.md (with plots in docs/img/). These machines are shared and noisy, so every
target is a ratio of two things measured in the same run, never an absolute time in a test.

    python bench/run.py                      # everything
    python bench/run.py --only clean_demo    # row groups: cli | clean_demo | demo | repro | central | overhead | classify
    python bench/run.py --only he            # the demo plaintext then --he: time, bytes, Dice (~8 min)
    python bench/run.py --only overhead      # FLARE round vs bare round, FLARE default timing vs fedbrain's (~5 min)
    python bench/run.py --only repro         # the demo twice, same commit and seed: do sites agree? (~7 min)
    python bench/run.py --only classify --classify-parts central   # classifier: federated | central
    python bench/run.py --only classify_seeds   # classifier comparisons over 5 seeds, 95% intervals (~60 min)
    python bench/run.py --only dp            # DP-SGD step time; demo with/without --dp-epsilon 8, both tasks (~30 min)
    python bench/run.py --only dp --dp-tasks classification,segmentation   # + utility at epsilon 1/3/8/inf (~40 min more on 2 cores)
    python bench/run.py --only faults        # reliability groups (bench/<group>.py, see GROUP_MODULES): faults | attacks | load
    python bench/run.py --only dp_start      # DP from a public start, both tasks, 3 seeds (~75 min)
    python bench/run.py --only client_dp_start,client_dp_poc   # client-level DP from the start: 12/30 hospitals (~15 min), 12 in POC (~5 min)
    python bench/run.py --only fed_central   # federated vs centralized on the demo cohort, 5 data seeds (~25 min)
    python bench/run.py --only metrics_check # fedbrain's Dice/HD95 vs the BraTS organisers' package (~2 min)
    python bench/run.py --only classify_demo # `fedbrain demo --task classify` over 5 data seeds (~15 min)
    python bench/run.py --only doc           # re-render docs/benchmarks.md and the plots from results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # fedbrain_testing: fault injection, load harness
import classify as classify_bench  # noqa: E402  (bench/classify.py: the classifier's rows)
import dp as dp_bench  # noqa: E402  (bench/dp.py: differential-privacy rows)

#: Row groups that live in their own module bench/<group>.py, each with
#: ``TITLE`` (its docs/benchmarks.md section), ``run(work: Path, console) -> dict`` (JSON-able results),
#: ``rows(result) -> [(what, measured, goal, detail)]``, and optionally ``notes(result) -> [lines]`` and
#: ``plot(result, img_dir: Path) -> [relative png paths]``. A module not written yet is skipped.
GROUP_MODULES = ("faults", "attacks", "load", "client_dp", "seg_ct", "secagg", "soak", "dp_start", "client_dp_start", "client_dp_poc",
                 "fed_central", "metrics_check", "classify_demo")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
WORK = ROOT / "bench" / "work"

console = Console()
CLASSIFY_CAVEATS = [
    "How to read these rows: each federated arm is one run of one seed (same data, same initial weights via",
    "`init_seed`); n above is each site's validation cases (one case moves a site by 100/n points or more): the",
    "statistics over seeds above are the figures that hold. The",
    "centralized arms are scored on a held-out cohort (another seed) of cases with both MRI and CT. Late fusion can",
    "only degrade without CT if it learned to use CT: compare with the CT-only arm before reading the CT-missing row.",
    "The federated arms are FLARE jobs on POC kits, whose scopes keep `head.*` at the site: in the FedAvg arm measured",
    "before 2026-12-08 no head was shared, and each site validated the server's untrained head; since then such a site",
    "keeps and trains its own head (the arm then behaves as personal). The statistics over seeds above federate the",
    "head in process.",
    "",
]
CLASSIFY_SECTIONS = {
    "classify": "Dual-stream MRI+CT grade classifier",
    "classify_typical": "Classifier on a cohort without atypical gliomas (MRI alone grades every case)",
}


def bench_demo(settings) -> dict:
    """The main job exactly as `make demo` runs it (install excluded): time, memory, Dice."""
    from fedbrain.demo import run_demo

    t = time.time()
    report = run_demo(WORK, settings, console=console)
    run = report["run"]
    return {
        "run_dir": run["run folder"],
        "demo_seconds": time.time() - t,
        "peak_memory_gb": float(run["peak memory of the POC (GB)"]),
        "peak_rss_sum_gb": float(run.get("peak sum of resident sizes of the POC (GB)", "nan")),
        "mean_wt_dice": report["summary"]["mean_final_wt_dice"],
        "min_wt_dice": report["summary"]["min_final_wt_dice"],
        "mean_dice": report["summary"]["mean_final_dice"],
        "per_site_wt": {s: e["final"].get("val_dice_wt") for s, e in report["sites"].items()},
        "per_site_curve": {s: [r["val_dice_wt"] for r in e["rounds"]] for s, e in report["sites"].items()},
    }


def bench_repro(settings, runs: int = 2) -> dict:
    """The demo twice on the same commit, settings and seed: do per-site results agree?

    Before init_seed was part of the segmentation model spec, the server built an unseeded
    initial model and two runs ended 0.05-0.15 WT Dice apart at the same hospital.
    """
    from fedbrain.demo import run_demo

    finals = []
    for i in range(runs):
        console.rule(f"demo run {i + 1}/{runs}")
        report = run_demo(WORK, settings, console=console)
        finals.append({s: {k: e["final"].get(k) for k in ("val_dice", "val_dice_wt", "val_dice_tc", "val_dice_et")}
                       for s, e in report["sites"].items()})
    diffs = [abs(run[s][k] - finals[0][s][k]) for run in finals[1:] for s in finals[0] for k in finals[0][s]
             if run[s][k] is not None and finals[0][s][k] is not None]
    return {"runs": finals, "max_abs_diff": max(diffs) if diffs else None}


def he_arm(report: dict, seconds: float) -> dict:
    """One arm of the HE comparison from its demo report (and the server's audit beside it)."""
    import math

    result = next((Path(report["run"]["run folder"]) / "result").glob("*/workspace/received_updates.jsonl"))
    audit = [json.loads(line) for line in result.read_text().splitlines()]
    # The encrypted job has no final evaluation step (the server cannot evaluate ciphertext), so both arms are
    # compared on the last round's validation: the same global model age in both.
    last = {s: {k: e["rounds"][-1].get(k) for k in ("val_dice", "val_dice_wt")} for s, e in report["sites"].items()}
    return {
        "demo_seconds": seconds,
        "round_seconds": statistics.median(r["seconds"] for r in report["round_seconds"] if r["round"] > 0),
        "bytes_per_update": statistics.median(e["bytes"] for e in audit),
        "values_per_update": sum(math.prod(p["shape"]) for p in audit[0]["params"].values()),
        "per_site_last_round": last,
        "mean_last_round_wt_dice": statistics.mean(v["val_dice_wt"] for v in last.values()),
        "per_site_curve": {s: [r["val_dice_wt"] for r in e["rounds"]] for s, e in report["sites"].items()},
    }


def he_comparison(arms: dict) -> dict:
    plain, he = arms["plain"], arms["he"]
    sites = plain["per_site_last_round"]
    return {
        **arms,
        "round_ratio": he["round_seconds"] / plain["round_seconds"],
        "demo_ratio": he["demo_seconds"] / plain["demo_seconds"],
        "bytes_ratio_vs_fp32": he["bytes_per_update"] / (4 * he["values_per_update"]),
        "dice_ratio": he["mean_last_round_wt_dice"] / plain["mean_last_round_wt_dice"],
        "max_site_dice_diff": max(abs(he["per_site_last_round"][s][k] - sites[s][k])
                                  for s in sites for k in ("val_dice", "val_dice_wt")),
    }


def bench_he_pool(settings, repeats: int = 3) -> dict:
    """Encrypting one segmentation update serially vs in a pool of 2 processes, side by side
    (pool started beforehand: that start-up is paid once per job)."""
    import numpy as np
    import tenseal as ts

    from fedbrain.filters.he import TimedEncryptor

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.global_scale = 2 ** 40
    rng = np.random.default_rng(0)
    update = {k: rng.normal(0, 1e-3, tuple(v.shape)) for k, v in settings.task.build_model().state_dict().items()}
    times = {}
    for workers in (1, 2):
        enc = TimedEncryptor(workers=workers)
        enc.tenseal_context, enc.encrypt_layers, enc.n_iter = ctx, [True], 1
        enc.encryption({k: v.copy() for k, v in update.items()}, None)  # warm-up (starts the pool)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            enc.encryption({k: v.copy() for k, v in update.items()}, None)
            runs.append(time.perf_counter() - t)
        if enc._pool is not None:
            enc._pool.shutdown()
        times[workers] = statistics.median(runs)
    return {"values": int(sum(v.size for v in update.values())), "serial_s": times[1], "pool2_s": times[2],
            "speedup": times[1] / times[2]}


def bench_he(settings) -> dict:
    """The demo plaintext, then encrypted (--he): same commit, data, seeds and settings, one run."""
    from fedbrain.demo import run_demo

    arms = {}
    for arm, he in (("plain", False), ("he", True)):
        console.rule(f"demo, {arm}")
        t = time.time()
        report = run_demo(WORK, replace(settings, task=settings.task.replace(he=he)), console=console)
        arms[arm] = he_arm(report, time.time() - t)
    return {**he_comparison(arms), "pool": bench_he_pool(settings)}


def bench_clean_demo() -> dict:
    """`make demo` exactly as a new user runs it: a fresh clone of this commit, install included."""
    import shutil
    import subprocess

    clone = WORK / "clean-clone"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    t = time.time()
    res = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True)
    seconds = time.time() - t
    reports = sorted(clone.glob("runs/demo-*/report.json"))
    report = json.loads(reports[-1].read_text()) if reports else {}
    shutil.rmtree(clone, ignore_errors=True)
    return {"commit": commit, "exit_code": res.returncode, "seconds": seconds,
            "mean_wt_dice": report.get("summary", {}).get("mean_final_wt_dice"),
            "min_wt_dice": report.get("summary", {}).get("min_final_wt_dice")}


def bench_central(data_dir: Path, settings) -> dict:
    """Centralized baseline: pooled training cases, the same loop and epochs, scored per site."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.tasks.segmentation import SegmentationTrainer

    sites = sorted(p.parent.name for p in data_dir.glob("*/datalist.json"))
    lists = {s: load_datalist(data_dir / s / "datalist.json") for s in sites}
    config = settings.task.replace(epochs_per_round=1, num_threads=1)
    pooled = [c for s in sites for c in lists[s]["training"]]
    trainer = SegmentationTrainer(pooled, [], config)
    model = trainer.build_model()
    epochs = settings.task.rounds * settings.task.epochs_per_round
    t = time.time()
    for _ in range(epochs):
        trainer.train(model)
    train_seconds = time.time() - t
    per_site = {}
    for s in sites:
        per_site[s] = SegmentationTrainer([], lists[s]["validation"], config).validate(model)
    wt = [m["val_dice_wt"] for m in per_site.values()]
    return {
        "epochs": epochs,
        "train_seconds": train_seconds,
        "mean_wt_dice": statistics.mean(wt),
        "min_wt_dice": min(wt),
        "mean_dice": statistics.mean(m["val_dice"] for m in per_site.values()),
        "per_site_wt": {s: m["val_dice_wt"] for s, m in per_site.items()},
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def bench_cli(runs: int = 5) -> dict:
    """Whole-process wall time of the command line's help: what a user waits for before anything runs
    (building the parser once imported torch and MONAI through the task modules)."""
    import subprocess

    fedbrain = str(Path(sys.executable).parent / "fedbrain")
    out = {}
    for key, args in {"help": ["--help"], "train_classify_help": ["train", "--central", "--task", "classify", "--help"]}.items():
        subprocess.run([fedbrain, *args], capture_output=True, check=True)  # warm-up: the file cache
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([fedbrain, *args], capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        out[key] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": runs}
    return out


def bench_overhead(rounds: int, demo_settings) -> dict:
    """FLARE round wall time vs the same validate+train steps run bare: one site with the demo's data
    size and settings (its own synthetic data), side by side in one run: the same job with FLARE's
    default round timing, the job as fedbrain exports it, and the bare loop."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.demo import export_job
    from fedbrain.fl.executor import CLIENT_API_POLL_INTERVAL
    from fedbrain.jobs import TASK_CHECK_PERIOD, TASK_REQUEST_INTERVAL
    from fedbrain.poc.consortium import DEFAULT_PROJECT, PocConsortium
    from fedbrain_testing.load import flare_default_timing
    from fedbrain.poc.runner import submit_and_wait
    from fedbrain.report.job_report import build_report
    from fedbrain.synthetic.cohort import synthesize_consortium
    from fedbrain.tasks.segmentation import SegmentationTrainer

    site = "hospital-a"
    run_dir = WORK / f"overhead-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True)
    project = yaml.safe_load(DEFAULT_PROJECT.read_text())
    project["participants"] = [p for p in project["participants"] if p["type"] != "client" or p["name"] == site]
    (run_dir / "one_site.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    # One hospital with the demo's number of cases and settings: a round has the demo's steps.
    data_dir = run_dir / "data"
    synthesize_consortium(data_dir, sites=1, cases=demo_settings.cases, seed=demo_settings.seed, site_names=[site])
    poc = PocConsortium(run_dir, run_dir / "one_site.yml")
    # One site: no round can be published (min_trained_sites >= 2), so every round trains from the same
    # global model; the round's machinery, which is what this measures, is the same.
    settings = replace(demo_settings, task=demo_settings.task.replace(rounds=rounds, min_clients=1))
    arms, status, beyond = {}, {}, {}
    try:
        poc.up(data_dir=data_dir)
        job = export_job(run_dir / "jobs", settings, [site])
        default_job = flare_default_timing(job, run_dir / "jobs-flare-defaults" / job.name)
        for arm, folder in (("flare_defaults", default_job), ("fedbrain", job)):
            console.print(f"[bold]{arm}[/]: {rounds} rounds")
            meta, result = submit_and_wait(poc, folder, rounds=rounds, result_dir=run_dir / f"result-{arm}",
                                           console=console)
            status[arm] = meta.get("status")
            # Round 0 also loads and caches the site's data, which the bare run does before its clock starts.
            report = build_report(result)
            arms[arm] = [r["seconds"] for r in report["round_seconds"] if r["round"] > 0]
            # Beyond the site's own validate+train time that round (its round_seconds metric): the part of a
            # round that CPU load from other programs on the machine does not stretch.
            work = {e["round"]: e.get("round_seconds") for e in report["sites"][site]["rounds"]}
            beyond[arm] = [r["seconds"] - work[r["round"]] for r in report["round_seconds"]
                           if r["round"] > 0 and work.get(r["round"]) is not None]
    finally:
        poc.clean()

    lists = load_datalist(data_dir / site / "datalist.json")
    config = settings.task.replace(num_threads=1)
    trainer = SegmentationTrainer(lists["training"], lists["validation"], config)
    model = trainer.build_model()
    bare_rounds = []
    for _ in range(rounds):
        t = time.time()
        trainer.validate(model)
        trainer.train(model)
        bare_rounds.append(time.time() - t)
    flare, default, bare = (statistics.median(arms["fedbrain"]), statistics.median(arms["flare_defaults"]),
                            statistics.median(bare_rounds[1:] or bare_rounds))
    return {
        "status": status.get("fedbrain"),
        "status_flare_defaults": status.get("flare_defaults"),
        "rounds": rounds,
        "data": f"1 site, {demo_settings.cases} synthetic cases, the demo's task settings",
        "settings": {"task_request_interval": TASK_REQUEST_INTERVAL, "task_check_period": TASK_CHECK_PERIOD,
                     "client_api_poll": CLIENT_API_POLL_INTERVAL},
        "flare_round_seconds": arms["fedbrain"],
        "default_round_seconds": arms["flare_defaults"],
        "bare_round_seconds": bare_rounds,
        "flare_median_s": flare,
        "default_median_s": default,
        "bare_median_s": bare,
        "spread": {"fedbrain": _spread(arms["fedbrain"]), "flare_defaults": _spread(arms["flare_defaults"]),
                   "bare": _spread(bare_rounds[1:] or bare_rounds)},
        "ratio": flare / bare,
        "ratio_flare_defaults": default / bare,
        "fixed_overhead_s": flare - bare,
        "fixed_overhead_flare_defaults_s": default - bare,
        "beyond_site_work_s": beyond.get("fedbrain"),
        "beyond_site_work_flare_defaults_s": beyond.get("flare_defaults"),
    }


def plot(results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    out = []
    demo, central = results.get("demo"), results.get("central")
    if demo and central:
        sites = sorted(demo["per_site_wt"])
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.38
        ax.bar([i - w / 2 for i in range(len(sites))], [demo["per_site_wt"][s] for s in sites], w, label="federated (FedAvg, POC)")
        ax.bar([i + w / 2 for i in range(len(sites))], [central["per_site_wt"][s] for s in sites], w, label="centralized (pooled)")
        ax.set_xticks(range(len(sites)), sites)
        ax.set_ylim(0, 1)
        ax.set_ylabel("WT Dice on the site's validation cases")
        ax.set_title("Federated vs centralized, same data, loop and epochs")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(IMG / "bench_fed_vs_central.png", dpi=110)
        plt.close(fig)
        out.append("img/bench_fed_vs_central.png")
    ov = results.get("overhead")
    if ov:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if ov.get("default_round_seconds"):
            ax.plot(range(1, len(ov["default_round_seconds"]) + 1), ov["default_round_seconds"], "^-",
                    label=f"FLARE POC round, FLARE's default timing ({ov['ratio_flare_defaults']:.2f})")
        ax.plot(range(1, len(ov["flare_round_seconds"]) + 1), ov["flare_round_seconds"], "o-",
                label="FLARE POC round, fedbrain's timing" if ov.get("default_round_seconds") else "FLARE POC round")
        ax.plot(range(1, len(ov["bare_round_seconds"][1:]) + 1), ov["bare_round_seconds"][1:], "s-", label="bare loop, same steps")
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
        ax.set_title(f"Round wall time, one site (ratio {ov['ratio']:.2f})")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(IMG / "bench_flare_overhead.png", dpi=110)
        plt.close(fig)
        out.append("img/bench_flare_overhead.png")
    return out


def _overhead_detail(ov: dict) -> str:
    sp = ov["spread"]
    rng = lambda k: f"{sp[k]['min']:.2f}-{sp[k]['max']:.2f}"
    return (f"; min-max {rng('fedbrain')} vs {rng('bare')} s over {len(ov['flare_round_seconds'])} rounds. Same job "
            f"with FLARE's default timing in the same run: {ov['ratio_flare_defaults']:.3f} "
            f"({ov['default_median_s']:.2f} s, {rng('flare_defaults')}); fixed overhead "
            f"{ov['fixed_overhead_flare_defaults_s']:.2f} s -> {ov['fixed_overhead_s']:.2f} s per round "
            f"(task_request_interval {ov['settings']['task_request_interval']} s, task_check_period "
            f"{ov['settings']['task_check_period']} s"
            + (f", Client API poll {ov['settings']['client_api_poll']} s in both arms" if ov["settings"].get("client_api_poll")
               else "") + "; docs/reliability.md section 5)"
            + (f"; round time beyond the site's own validate+train time, median: "
               f"{statistics.median(ov['beyond_site_work_flare_defaults_s']):.2f} s -> "
               f"{statistics.median(ov['beyond_site_work_s']):.2f} s. What is left: those "
               f"{statistics.median(ov['beyond_site_work_s']):.2f} s (FLARE carrying the global model to the site and the "
               "update back through its cell messaging, the server's aggregation and model persistence, the Client API "
               "hand-over inside the site's job process); running the site loop as a FLARE Executor instead of a script "
               "behind the Client API (issue 30, item 9) was not done. Warm job start (POC kits) shortens a job's start, "
               "not its rounds" if ov.get("beyond_site_work_s") else ""))


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def met(measured: str, goal: str) -> str:
    """'met' / 'not met' for a row whose goal is one or more '<= x' / '>= x' parts matching its measured parts."""
    import re

    goals = [g.strip() for g in goal.split("/") if g.strip()]
    if not goals:
        return ""
    values = [m.strip() for m in measured.split("/")]
    if len(goals) == 1:
        goals = goals * len(values)  # one goal for several figures (e.g. seeds): each must meet it
    if len(values) != len(goals):
        return ""
    for value, g in zip(values, goals):
        m = re.fullmatch(r"(<=|>=)\s*([+-]?[0-9.]+)", g)
        try:
            v = float(value.replace("+", ""))
        except ValueError:
            return ""
        if not m:
            return ""
        limit = float(m.group(2))
        if (m.group(1) == "<=" and v > limit) or (m.group(1) == ">=" and v < limit):
            return "**not met**"
    return "met"


def _verdict(row) -> tuple:
    """A row whose detail ends in '; met' / '; not met' (judged on an interval by its module) gets that verdict
    in the met? column; other rows are judged here from measured and goal."""
    what, measured, goal, detail, *given = row
    for verdict, shown in (("; not met", "**not met**"), ("; met", "met")):
        if not given and detail.endswith(verdict):
            return what, measured, goal, detail[: -len(verdict)], shown
    return what, measured, goal, detail, given[0] if given else met(measured, goal)


def table(rows) -> list[str]:
    return ["| what | measured | goal | met? | detail |", "|---|---|---|---|---|",
            *[f"| {r[0]} | {r[1]} | {r[2]} | {r[4]} | {r[3]} |" for r in map(_verdict, rows)]]


def write_doc(results: dict, plots: list[str]) -> None:
    demo, central, ov = results.get("demo"), results.get("central"), results.get("overhead")
    rows = []
    if demo and central:
        ratio = demo["mean_wt_dice"] / central["mean_wt_dice"] if central["mean_wt_dice"] else None
        rows.append(("Federated / centralized mean WT Dice (same data, loop, epochs)", _f(ratio), ">= 1.00",
                     f"{_f(demo['mean_wt_dice'])} vs {_f(central['mean_wt_dice'])}"))
    if ov:
        rows.append(("FLARE round / bare local round, same steps (1 site)", _f(ov["ratio"]), "<= 1.05",
                     f"{_f(ov['flare_median_s'], '{:.2f}')} s vs {_f(ov['bare_median_s'], '{:.2f}')} s (medians)"
                     + (_overhead_detail(ov) if ov.get("default_round_seconds") else "")))
    cli = results.get("cli")
    if cli:
        h, t = cli["help"], cli["train_classify_help"]
        rows.append(("`fedbrain --help`, whole process, median of " f"{h['runs']} (s)", _f(h["median_s"], "{:.2f}"), "<= 0.5",
                     f"min-max {h['min_s']:.2f}-{h['max_s']:.2f} s; `fedbrain train --central --task classify --help` "
                     f"{t['median_s']:.2f} s (measured {cli.get('measured_at', '')[:10]})"))
    clean = results.get("clean_demo")
    if clean:
        rows.append(("`make demo` from a fresh clone, install included (s)", _f(clean["seconds"], "{:.0f}"), "<= 600",
                     f"commit {clean['commit']}, exit {clean['exit_code']}, WT Dice {_f(clean['mean_wt_dice'])} / min {_f(clean['min_wt_dice'])}"))
    repro = results.get("repro")
    if repro:
        rows.append(("Two demo runs, same commit and seed: largest per-site difference in final Dice (WT/TC/ET/mean)",
                     _f(repro["max_abs_diff"], "{:.4f}"), "<= 0.01",
                     "WT per site: " + "; ".join(f"{s} " + " / ".join(_f(r[s]["val_dice_wt"]) for r in repro["runs"])
                                                 for s in sorted(repro["runs"][0]))))
    he = results.get("he")
    if he:
        rows += [
            ("HE round / plaintext round wall time, same job (medians)", _f(he["round_ratio"], "{:.2f}"), "<= 1.3",
             f"{_f(he['he']['round_seconds'], '{:.1f}')} s vs {_f(he['plain']['round_seconds'], '{:.1f}')} s"),
            ("Bytes per update, HE / fp32", _f(he["bytes_ratio_vs_fp32"], "{:.1f}"), "<= 14",
             f"{he['he']['bytes_per_update'] / 1e6:.1f} MB for {he['he']['values_per_update']:,} values"),
            ("Mean WT Dice after the same rounds, HE / plaintext", _f(he["dice_ratio"]), ">= 0.99",
             f"last-round validation at every site; largest per-site difference (WT or mean Dice): "
             f"{_f(he['max_site_dice_diff'], '{:.4f}')} (goal <= 0.02 end to end; one aggregation of fixed updates "
             "matches plaintext within 1e-5: tests/test_he.py)"),
            ("`fedbrain demo --he` time / plaintext demo time", _f(he["demo_ratio"], "{:.2f}"), "<= 1.3",
             f"{_f(he['he']['demo_seconds'], '{:.0f}')} s vs {_f(he['plain']['demo_seconds'], '{:.0f}')} s"),
        ]
        pool = he.get("pool")
        if pool:
            rows.append(("Encrypting one update: serial / pool of 2 processes (speed-up)", _f(pool["speedup"], "{:.2f}"),
                         "", f"{_f(pool['serial_s'], '{:.2f}')} s vs {_f(pool['pool2_s'], '{:.2f}')} s for "
                         f"{pool['values']:,} values; a site uses the pool when its num_threads > 1"))
    if demo:
        rows.append(("`fedbrain demo` time, install excluded (s)", _f(demo["demo_seconds"], "{:.0f}"), "<= 300", ""))
        rows.append(("`make demo`: worst site's WT Dice (the demo's data seed 0)", _f(demo["min_wt_dice"]), ">= 0.85",
                     f"{results.get('settings', {}).get('task', {}).get('rounds')} rounds; other data seeds: the "
                     "group 'Federated vs centralized, several data seeds' below"))
        rss_sum = demo.get("peak_rss_sum_gb")
        rows.append(("Peak memory of the whole POC during the demo (GB)", _f(demo["peak_memory_gb"], "{:.2f}"), "<= 6",
                     "proportional set sizes (a page shared by processes counted once); the sum of resident sizes, "
                     f"which counts the pages warm-forked job processes share once per process: {rss_sum:.2f}"
                     if rss_sum is not None and rss_sum == rss_sum else
                     "the sum of resident sizes (counts a page shared by processes once per process)"))
        rows.append(("Demo mean WT Dice / minimum site", f"{_f(demo['mean_wt_dice'])} / {_f(demo['min_wt_dice'])}", ">= 0.70 / >= 0.60", ""))
    lines = [
        "# Benchmarks",
        "",
        f"Segmentation rows measured {results.get('segmentation_measured_at', results['measured_at'])} on "
        f"{results['machine']} by `make bench` (bench/run.py); raw numbers in",
        "`bench/results.json`. Ratios compare two things measured in the same run, because these machines are",
        "shared and noisy.",
        "",
        *table(rows),
        "",
    ]
    if demo:
        lines += ["Per-site WT Dice of the final global model (federated):", ""]
        lines += [f"- {s}: {_f(v)}" + (f" (centralized: {_f(central['per_site_wt'].get(s))})" if central else "")
                  for s, v in sorted(demo["per_site_wt"].items())]
        lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots
              if "classify" not in p and not Path(p).stem.startswith(GROUP_MODULES)]
    if results.get("dp"):
        dp = results["dp"]
        when = f"step times {dp.get('measured_at', '')}" + "".join(
            f"; {what} {dp[key]}" for what, key in (("utility at scale", "utility_measured_at"),
                                                   ("demos", "demo_scale_measured_at")) if dp.get(key))
        lines += ["", "## Differential privacy", "", f"Measured: {when} (bench/dp.py; "
                  "how to read the rows below the table).", "", *table(dp_bench.rows(dp)), "",
                  *dp_bench.NOTES, ""]
    if results.get("classify_stats"):
        lines += ["", "## Classifier statistics over seeds", "", *classify_bench.stats_intro(results["classify_stats"]),
                  *table(classify_bench.stats_rows(results["classify_stats"])), ""]
    for group, module in group_modules().items():
        res = results.get(group)
        if not res:
            continue
        lines += ["", f"## {module.TITLE}", "", f"Measured {res.get('measured_at', '')} (bench/{group}.py).", "",
                  *table(module.rows(res)), "", *(module.notes(res) if hasattr(module, "notes") else [])]
        lines += [f"![{Path(p).stem}]({p})" for p in plots if Path(p).stem.startswith(group)]
    for key, title in CLASSIFY_SECTIONS.items():
        cls = results.get(key)
        if not cls:
            continue
        lines += ["", f"## {title}", "",
                  f"Measured {cls.get('measured_at', '(see work folder)')}. Settings: `{json.dumps(cls['settings'])}`; "
                  f"run folder `{cls['work']}` in bench's work folder.", ""]
        if "ct_mirror" not in cls["settings"].get("task", cls["settings"]):  # stored before the setting existed
            lines += ["**Measured with the earlier classifier** (no CT mirror channel, no per-stream loss, both added",
                      "2026-11-30): its CT-only and MRI-missing rows are that model's; the statistics over seeds above",
                      "are today's. Re-measure with `python bench/run.py --only classify`.", ""]
        lines += [*table(classify_bench.rows(cls)), ""]
        lines += classify_bench.per_site_lines(cls)
        if key == "classify":
            lines += CLASSIFY_CAVEATS
        lines += [f"![{Path(p).stem}]({p})" for p in plots if Path(p).stem.endswith(key)]
    DOC.write_text("\n".join(lines) + "\n")


def merge_into_current(results: dict, read_at_start: dict) -> dict:
    """What this run measured, put into results.json as it is NOW: a long group must not drop rows
    another run wrote while it ran (several groups may run at once in separate processes)."""
    mine = json.loads(json.dumps(results, default=str))
    changed = {k: v for k, v in mine.items() if read_at_start.get(k) != v}
    current = portable(json.loads(RESULTS.read_text())) if RESULTS.exists() else {}
    return {**current, **changed}


def group_modules() -> dict:
    """The group modules that exist (bench/<group>.py), imported by name."""
    import importlib

    here = Path(__file__).resolve().parent
    return {g: importlib.import_module(g) for g in GROUP_MODULES if (here / f"{g}.py").exists()}


def portable(obj):
    """Run folders written relative to bench's work folder, other checkout paths relative to the
    checkout: results and docs name no folder of this machine."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if isinstance(obj, str):
        for prefix in (str(WORK) + "/", "bench/work/"):
            if obj.startswith(prefix):
                return obj[len(prefix):]
        if str(ROOT) in obj:
            return obj.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")
    return obj


def main(argv=None):
    from fedbrain.demo import DemoSettings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(("cli,clean_demo,demo,repro,he,central,overhead,classify,classify_seeds,dp",
                                                *GROUP_MODULES)))
    p.add_argument("--overhead-rounds", type=int, default=6)
    p.add_argument("--classify-parts", default="federated,central")
    p.add_argument("--classify-seed-parts", default="",
                   help="classify_seeds: only these of matters,iid,central, merged per seed into the stored results "
                        "(default: all three, replacing them)")
    p.add_argument("--classify-seeds", default="", help="classify_seeds: comma-separated seeds (default 0-4)")
    p.add_argument("--dp-tasks", default="", help="dp: tasks of the utility rows at scale, e.g. "
                   "classification,segmentation (~40 min on 2 cores: 2026-12-01, 26 min classification, 9 min segmentation)")
    p.add_argument("--no-dp-demos", dest="dp_demos", action="store_false", help="dp: skip the demos with/without DP")
    p.add_argument("--dp-demo-tasks", default="segmentation,classification",
                   help="dp: tasks whose demos run with/without DP (the others keep what earlier runs measured)")
    p.add_argument("--classify-atypical", type=float, default=0.2,
                   help="fraction of atypical gliomas; 0 is stored as the separate 'typical cohort' section")
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    settings = DemoSettings()
    results = portable(json.loads(RESULTS.read_text())) if RESULTS.exists() else {}
    read_at_start = json.loads(json.dumps(results, default=str))
    if only & {"cli", "clean_demo", "demo", "repro", "he", "central", "overhead", "classify", "classify_seeds", "dp",
               *GROUP_MODULES}:  # "--only doc" re-renders
        results.update({
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores".strip(),
            "settings": settings.to_dict(),
        })
    WORK.mkdir(parents=True, exist_ok=True)
    if "cli" in only:
        console.rule("command line start-up")
        results["cli"] = {**bench_cli(), "measured_at": results["measured_at"]}
    if "clean_demo" in only:
        console.rule("make demo in a fresh clone")
        results["clean_demo"] = bench_clean_demo()
    if "demo" in only:
        console.rule("demo (federated)")
        results["demo"] = bench_demo(settings)
    if "he" in only:
        console.rule("encrypted aggregation vs plaintext")
        results["he"] = bench_he(settings)
    if "repro" in only:
        console.rule("demo reproducibility")
        results["repro"] = bench_repro(settings)
    data_dir = WORK / results["demo"]["run_dir"] / "data" if results.get("demo") else None
    if "central" in only:
        console.rule("centralized baseline")
        if data_dir is None or not data_dir.exists():
            sys.exit("the centralized row needs the demo's data: run with --only demo,central")
        results["central"] = bench_central(data_dir, settings)
    if "overhead" in only:
        console.rule("FLARE overhead")
        results["overhead"] = {**bench_overhead(a.overhead_rounds, settings), "measured_at": results["measured_at"]}
    if only & {"clean_demo", "demo", "repro", "he", "central"}:
        results["segmentation_measured_at"] = results["measured_at"]
    if "classify" in only:
        console.rule("dual-stream classifier")
        parts = tuple(a.classify_parts.split(","))
        key = "classify" if a.classify_atypical > 0 else "classify_typical"
        settings = classify_bench.ClassifyBenchSettings(atypical=a.classify_atypical)
        new = classify_bench.bench_classify(WORK, settings, console=console, parts=parts)
        results[key] = {**results.get(key, {}), **new, "measured_at": results["measured_at"]}  # keeps the other part
    if "classify_seeds" in only:
        console.rule("classifier statistics over seeds")
        stats = classify_bench.SeedBenchSettings()
        if a.classify_seeds:
            stats = replace(stats, seeds=tuple(int(x) for x in a.classify_seeds.split(",")))
        parts = tuple(a.classify_seed_parts.split(",")) if a.classify_seed_parts else ("matters", "iid", "central")
        new = classify_bench.bench_seed_statistics(WORK, stats, console=console, parts=parts)
        if a.classify_seed_parts:  # add these parts to what earlier runs measured for the same seeds
            old = results.get("classify_stats", {})
            new["seeds"] = {**old.get("seeds", {}),
                            **{k: {**old.get("seeds", {}).get(k, {}), **v} for k, v in new["seeds"].items()}}
            new["work"] = ", ".join(dict.fromkeys(portable(w) for w in (old.get("work"), new["work"]) if w))
            new["settings"] = {**new["settings"], "seeds": sorted({*old.get("settings", {}).get("seeds", ()),
                                                                    *new["settings"]["seeds"]})}
        earlier = results.get("classify_stats", {}).get("parts_measured_at", {}) if a.classify_seed_parts else {}
        when = {**earlier, **dict.fromkeys(parts, results["measured_at"])}
        results["classify_stats"] = {**new, "measured_at": results["measured_at"], "parts_measured_at": when}
    if "dp" in only:
        console.rule("differential privacy")
        dp = {**results.get("dp", {}), "step_time": dp_bench.bench_step_time(), "measured_at": results["measured_at"]}
        if a.dp_tasks:  # parts not asked for keep what earlier runs measured
            dp["utility"] = [dp_bench.bench_utility(WORK, task, console=console, **dp_bench.UTILITY[task])
                             for task in a.dp_tasks.split(",") if task]
            dp["utility_measured_at"] = results["measured_at"]
        if a.dp_demos:  # tasks not asked for keep what earlier runs measured, with their own time
            tasks = [t for t in a.dp_demo_tasks.split(",") if t]
            earlier = dp.get("demo_scale_task_measured_at") or {t: dp.get("demo_scale_measured_at")
                                                                 for t in dp.get("demo_scale", {})}
            dp["demo_scale"] = {**dp.get("demo_scale", {}),
                                **dp_bench.bench_demo_scale(WORK, console=console, tasks=tasks)}
            dp["demo_scale_task_measured_at"] = {**earlier, **{t: results["measured_at"] for t in tasks}}
            dp["demo_scale_measured_at"] = "; ".join(f"{t} {w}" for t, w in dp["demo_scale_task_measured_at"].items())
        results["dp"] = dp
    for group, module in group_modules().items():
        if group in only:
            console.rule(module.TITLE)
            # a group that re-measured only a part keeps the date of the rest (its own measured_at)
            results[group] = {"measured_at": results["measured_at"], **module.run(WORK, console)}
    results = merge_into_current(results, read_at_start)
    plots = plot(results)
    for group, module in group_modules().items():
        if results.get(group) and hasattr(module, "plot"):
            plots += module.plot(results[group], IMG)
    for key in CLASSIFY_SECTIONS:
        if results.get(key):
            plots += classify_bench.plot(results[key], IMG, key)
    results = portable(results)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    write_doc(results, plots)
    console.print(f"wrote {RESULTS} and {DOC}")


if __name__ == "__main__":
    main()
