"""Federated vs centralized on the demo cohort over several data seeds (issue 28, item 1).

The `demo`/`central` rows of the main table compare one run: the demo (real POC, FedAvg) against the
pooled baseline with the same data, loop and epochs. The final round's Dice swings by up to 0.1 from one
round to the next on this cohort (docs/maintainers.md), so one seed cannot say whether federated training
keeps up. Here each data seed is a new synthetic demo cohort: the demo exactly as `fedbrain demo` runs it
(POC, 3 hospitals) and the centralized baseline on its data; the goal's ratio is taken per seed, then
its mean with a 95% interval.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

TITLE = "Federated vs centralized, several data seeds (segmentation demo cohort)"
SEEDS = (0, 1, 2, 3, 4)
GOAL = 1.00
DEMO_SITE_GOAL = 0.85  # issue 28: `make demo` WT Dice at every site


def _interval(values):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from classify import interval

    return interval(values)


def run(work: Path, console) -> dict:
    import run as bench  # bench/run.py: the demo and centralized arms, exactly as the main rows run them

    from fedbrain.demo import DemoSettings, run_demo

    arms = []
    for seed in SEEDS:
        settings = replace(DemoSettings(), seed=seed)
        console.rule(f"data seed {seed}: demo (federated)")
        t = time.time()
        report = run_demo(Path(work), settings, console=console)
        fed_seconds = time.time() - t
        fed = {s: e["final"].get("val_dice_wt") for s, e in report["sites"].items()}
        console.rule(f"data seed {seed}: centralized")
        central = bench.bench_central(Path(report["run"]["run folder"]) / "data", settings)
        arms.append({"seed": seed, "federated": fed, "centralized": central["per_site_wt"],
                     "federated_mean": statistics.mean(fed.values()), "centralized_mean": central["mean_wt_dice"],
                     "federated_seconds": fed_seconds, "centralized_seconds": central["train_seconds"]})
        console.print(f"  seed {seed}: federated {arms[-1]['federated_mean']:.3f}, centralized "
                      f"{arms[-1]['centralized_mean']:.3f}")
    return {"seeds": list(SEEDS), "arms": arms, "rounds": settings.task.rounds,
            "epochs_per_round": settings.task.epochs_per_round}


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    arms = r["arms"]
    ratios = [a["federated_mean"] / a["centralized_mean"] for a in arms]
    mean, lo, hi = _interval(ratios)
    per_seed = ", ".join(f"{a['federated_mean']:.3f}/{a['centralized_mean']:.3f}" for a in arms)
    worst = [min(a["federated"].values()) / min(a["centralized"].values()) for a in arms]
    return [
        (f"Federated / centralized mean WT Dice, {len(arms)} data seeds (same data, loop, epochs)",
         f"{mean:.3f} [{lo:.3f}, {hi:.3f}]", f">= {GOAL:.2f}",
         f"federated/centralized per seed {per_seed}; met when the whole interval clears the goal"
         f"; {'met' if lo >= GOAL else 'not met'}"),
        ("Worst site: federated / centralized WT Dice (mean over seeds)", f"{statistics.mean(worst):.3f}", "",
         "per seed " + ", ".join(f"{w:.3f}" for w in worst)),
        demo_row(arms),
    ]


def demo_row(arms: list[dict]) -> tuple[str, str, str, str]:
    """Issue 28's demo goal over data seeds: the federated arm is `fedbrain demo --seed S` itself."""
    worst = [min(a["federated"].values()) for a in arms]
    below = [a["seed"] for a, w in zip(arms, worst) if w < DEMO_SITE_GOAL]
    return (f"`fedbrain demo`: worst site's WT Dice, {len(arms)} data seeds", ", ".join(f"{w:.3f}" for w in worst),
            f">= {DEMO_SITE_GOAL:.2f} every site, every seed",
            f"seeds {', '.join(str(a['seed']) for a in arms)}; demo {min(a['federated_seconds'] for a in arms):.0f}-"
            f"{max(a['federated_seconds'] for a in arms):.0f} s; seed 0 is what `make demo` runs; "
            + (f"below the goal: seed {', '.join(map(str, below))}; not met" if below else "met"))


def notes(r: dict) -> list[str]:
    rounds, epochs = r.get("rounds", 6), r.get("epochs_per_round", 4)  # results before these were stored: 6 x 4
    return [
        "Each seed is a new synthetic demo cohort (`fedbrain demo` with that data seed): the federated arm is the "
        f"demo itself (real POC, FedAvg, {rounds} rounds x {epochs} local epochs); the centralized arm trains the "
        f"pooled training cases for the same {rounds * epochs} epochs with the same loop; both are scored on each "
        "site's validation cases. Server-side optimisers and an lr schedule tried in process did not help FedAvg "
        "(docs/maintainers.md).",
    ]
