"""Poisoned updates: one hospital sends a scaled (x100), sign-flipped or random update every round.

Real POC (FLARE server + 3 site processes, mTLS kits, admin API), synthetic non-IID segmentation
data (the synthetic cohort's site profiles: case counts, scanner gain, gamma, noise and grade mix
differ per hospital), same data, seed and job size in every arm; only the server's aggregation,
the guard and the injected attack (fault-injection filter ``fedbrain_testing.attack.PoisonUpdate``
at hospital-b) change. The arms run side by side (at most 3 jobs at once on the one consortium):
results are those of separate runs, wall time is shared.

Arms: the clean reference (FedAvg, guard on: the product default; it refuses nobody on clean data,
and FedAvg with the guard and no refusal is FLARE's own FedAvg arithmetic), then per attack: plain
FedAvg without guard, guard + FedAvg, and median, trimmed mean, multi-Krum each WITHOUT the guard
(what the method does by itself); and the robust methods on clean data (their cost).

    python bench/run.py --only attacks        # ~15 min on 2 cores
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

TITLE = "Poisoned updates: update guard and robust aggregation"
ATTACKER = "hospital-b"
ATTACKS = {"x100": {"kind": "scale", "factor": 100}, "sign flip": {"kind": "sign_flip"},
           "random": {"kind": "random"}}
#: arm name -> (aggregation, guard)
DEFENCES = {"plain FedAvg": ("fedavg", False), "guard + FedAvg": ("fedavg", True), "median": ("median", False),
            "trimmed mean": ("trimmed_mean", False), "Krum": ("krum", False)}
GOAL = 0.02  # the issue: within 0.02 of the clean run's final Dice
CASES, ROUNDS, EPOCHS = 12, 4, 2


def _arms() -> dict:
    arms = {"clean | guard + FedAvg": (None, "fedavg", True)}
    for attack_name, attack in ATTACKS.items():
        for defence, (aggregation, guard) in DEFENCES.items():
            arms[f"{attack_name} | {defence}"] = (attack, aggregation, guard)
    for defence in ("median", "trimmed mean", "Krum"):
        aggregation, guard = DEFENCES[defence]
        arms[f"clean | {defence}"] = (None, aggregation, guard)
    return arms


def _final_dice(report: dict) -> float | None:
    """Mean over sites of the final global model's Dice; None when a site has none (the model broke: NaN)."""
    values = [e["final"].get("val_dice") for e in report["sites"].values()]
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return sum(values) / len(values)


def run(work: Path, console) -> dict:
    from fedbrain.poc.consortium import PocConsortium
    from fedbrain.poc.runner import run_jobs_side_by_side
    from fedbrain.report.job_report import build_report
    from fedbrain.synthetic.cohort import synthesize_consortium
    from fedbrain.tasks.segmentation import SegmentationConfig
    from fedbrain_testing.attack import admit_attack_filter, export_with_attack

    run_dir = Path(work) / f"attacks_{time.strftime('%Y%m%d_%H%M%S')}"
    poc = PocConsortium(run_dir)
    started = time.time()
    synthesize_consortium(run_dir / "data", sites=3, cases=CASES, seed=0, site_names=poc.sites, progress=False)
    # min_trained_sites 2: a guard or robust method that leaves the attacker out still publishes the two others' round
    task = SegmentationConfig(rounds=ROUNDS, epochs_per_round=EPOCHS, min_clients=3, min_trained_sites=2)
    jobs, arms = {}, _arms()
    for i, (arm, (attack, aggregation, guard)) in enumerate(arms.items()):
        cfg = task.replace(name=f"attacks_{i:02d}", aggregation=aggregation, guard=guard)
        jobs[arm] = export_with_attack(cfg, run_dir / "jobs" / f"{i:02d}",
                                       None if attack is None else {"site": ATTACKER, **attack})
    try:
        poc.prepare(data_dir=run_dir / "data")
        admit_attack_filter(poc)  # the poisoned site's filter: test support, admitted in this POC only
        poc.start()
        done = run_jobs_side_by_side(poc, jobs, run_dir / "results", max_active=3, timeout=2400, console=console)
    finally:
        poc.clean()
    out = {}
    for arm, (meta, path, seconds) in done.items():
        entry = {"status": meta.get("status"), "seconds": round(seconds, 1), "final_dice": None, "refused": {},
                 "result": str(path) if path else None}
        if path is not None:
            try:
                report = build_report(path)
                entry["final_dice"] = _final_dice(report)
                entry["per_site"] = {s: e["final"].get("val_dice") for s, e in report["sites"].items()}
                guard = report.get("guard") or {}
                for r in guard.get("refusals", []):
                    entry["refused"].setdefault(r["site"], []).append(r["round"])
                entry["flagged"] = sorted(guard.get("flagged", {}))
                entry["krum_selected"] = [r.get("krum_selected") for r in guard.get("rounds", []) if "krum_selected" in r]
            except Exception as e:  # a broken arm is a result too: say why
                entry["error"] = f"{type(e).__name__}: {e}"
        out[arm] = entry
    return {"arms": out, "attacker": ATTACKER, "settings": {**{k: v for k, v in task.to_dict().items()
                                                             if k in ("rounds", "epochs_per_round", "roi_size", "batch_size", "lr", "guard_z",
                                                                      "trim_fraction", "krum_byzantine")},
                                                          "cases_per_site": CASES, "sites": 3},
            "wall_seconds": round(time.time() - started, 1), "run_dir": str(run_dir)}


def _fmt(v, spec="{:.3f}") -> str:
    return "–" if v is None else spec.format(v)


def rows(result: dict) -> list[tuple]:
    arms = result["arms"]
    clean = arms.get("clean | guard + FedAvg", {}).get("final_dice")
    out = [("Clean run: FedAvg with the guard (reference final Dice)", _fmt(clean), "",
            f"refused: {arms.get('clean | guard + FedAvg', {}).get('refused') or 'none'}", "")]
    for attack_name in ATTACKS:
        for defence in DEFENCES:
            a = arms.get(f"{attack_name} | {defence}")
            if a is None:
                continue
            dice = a.get("final_dice")
            gap = None if dice is None or clean is None else dice - clean
            refused = ", ".join(f"{s} in rounds {r}" for s, r in a.get("refused", {}).items()) or "none"
            detail = f"final Dice {_fmt(dice)}" + ("; model broke (NaN)" if dice is None and a.get("result") else "")
            if defence == "guard + FedAvg":
                detail += f"; refused: {refused}"
            if a.get("krum_selected"):
                picks = {tuple(p) for p in a["krum_selected"]}
                detail += f"; Krum kept {', '.join('+'.join(p) for p in sorted(picks))}"
            if defence == "plain FedAvg":
                # The issue: plain FedAvg degrades (Dice at least 0.02 below clean); a broken model (no Dice) does.
                what = f"{attack_name} at {result['attacker']}, {defence} (no guard): Dice - clean"
                if gap is None:
                    out.append((what, "broken", f"<= -{GOAL}", detail, "met"))
                else:
                    out.append((what, _fmt(gap, "{:+.3f}"), f"<= -{GOAL}", detail))
            else:
                # "Stays within 0.02 of the clean run" read as: loses at most 0.02 (a higher Dice is no damage;
                # the notes say where an arm ended more than 0.02 above).
                what = f"{attack_name} at {result['attacker']}, {defence}: Dice - clean"
                if gap is None:  # no Dice at all: the model broke
                    out.append((what, "broken", f">= -{GOAL}", detail, "**not met**"))
                else:
                    out.append((what, _fmt(gap, "{:+.3f}"), f">= -{GOAL}", detail))
    for defence in ("median", "trimmed mean", "Krum"):
        a = arms.get(f"clean | {defence}")
        if a is None:
            continue
        dice = a.get("final_dice")
        gap = None if dice is None or clean is None else dice - clean
        out.append((f"Cost with no attack (non-IID): {defence} Dice - FedAvg Dice", _fmt(gap, "{:+.3f}"), "",
                    f"final Dice {_fmt(dice)} vs {_fmt(clean)}", ""))
    return out


def notes(result: dict) -> list[str]:
    s = result["settings"]
    arms = result["arms"]
    clean = (arms.get("clean | guard + FedAvg") or {}).get("final_dice")
    above = [f"{arm} ({a['final_dice'] - clean:+.3f})" for arm, a in arms.items()
             if clean is not None and a.get("final_dice") is not None and a["final_dice"] - clean > GOAL]
    return [
        "Goal: the issue's \"final Dice stays within 0.02 of the clean run\" is read as *loses at most 0.02* "
        "(Dice - clean >= -0.02); arms that ended more than 0.02 *above* the clean run: "
        + (", ".join(above) if above else "none") + ".",
        "",
        f"Real POC, 3 hospitals, synthetic non-IID segmentation data ({s['cases_per_site']} cases per hospital before "
        f"the cohort's per-site quantity skew: 12/9/6 training and 4/3/2 validation cases), {s['rounds']} rounds x "
        f"{s['epochs_per_round']} epochs, roi {s['roi_size']}; {result['attacker']} poisons its update every round "
        "through the fault-injection filter (`fedbrain_testing.attack.PoisonUpdate`; x100 = update times 100, sign "
        "flip = times -1, random = Gaussian noise with the honest update's L2 norm). Final Dice: mean over the 3 sites "
        "of the final global model's mean Dice (TC/WT/ET) on each site's validation cases (one case moves a site by "
        "tens of points: differences of a few hundredths between arms are within noise).",
        "",
        "Met (loses at most 0.02) by defence: " + "; ".join(
            f"{d}: " + (", ".join(a for a in ATTACKS if _gap(arms, f"{a} | {d}", clean) is not None
                                  and _gap(arms, f"{a} | {d}", clean) >= -GOAL) or "none")
            for d in DEFENCES if d != "plain FedAvg") + ".",
        "",
        "How to read it: the guard refuses by norm, so it stops a scaled update (hospital-b refused every round and "
        "flagged after guard_flag_after rounds) but not a sign flip or noise of the honest norm, which look like "
        "honest updates by size. With 3 sites the coordinate-wise median and the trimmed mean are the same thing "
        "(one value cut per end), and on non-IID data the two honest hospitals often disagree on a coordinate, so "
        "the poisoned value is the middle one there: a whole-update method (multi-Krum, which drops the update "
        "farthest from the others) is the one that held against every attack here. Cost without attack: the robust "
        "methods lost nothing on this data (within noise); NVFLARE's median aggregator example lost ~15 points on "
        "non-IID CIFAR-10, and with 3 sites Krum averages only 2 hospitals every round. Robust arms ran without the "
        "guard to show the method alone. All "
        f"{len(arms)} arms ran side by side, 3 at a time, on one consortium: "
        f"{result['wall_seconds'] / 60:.1f} min wall in total.",
        "",
    ]


def _gap(arms: dict, arm: str, clean) -> float | None:
    dice = (arms.get(arm) or {}).get("final_dice")
    return None if dice is None or clean is None else dice - clean


def plot(result: dict, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    clean = arms.get("clean | guard + FedAvg", {}).get("final_dice")
    if clean is None:
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    defences = list(DEFENCES)
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(defences)
    for i, defence in enumerate(defences):
        vals = [(arms.get(f"{a} | {defence}") or {}).get("final_dice") for a in ATTACKS]
        xs = [j + (i - (len(defences) - 1) / 2) * w for j in range(len(ATTACKS))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], w, label=defence)
    ax.axhline(clean, color="k", ls="--", lw=1.5, label=f"clean FedAvg {clean:.3f}")
    ax.axhspan(clean - GOAL, clean + GOAL, color="k", alpha=0.08)
    ax.set_xticks(range(len(ATTACKS)), [f"{a} at {result['attacker']}" for a in ATTACKS])
    ax.set_ylabel("final Dice (mean of 3 sites)")
    ax.set_ylim(0, max(0.8, clean + 0.25))
    ax.set_title("One poisoned hospital: final Dice by defence (band: clean +- 0.02)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(img_dir / "attacks_dice.png", dpi=110)
    plt.close(fig)
    return ["img/attacks_dice.png"]


if __name__ == "__main__":  # the rows of a finished run: python bench/attacks.py bench/results.json
    import sys

    res = json.loads(Path(sys.argv[1]).read_text())["attacks"]
    for r in rows(res):
        print(r)
