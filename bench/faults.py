"""Faults injected into a real POC federation (issue 14): a crashed site, a rebooted site, a rebooted
server, a straggler, a cut network link; each job's rounds completed and lost, time to recover and
final Dice against a clean run of the same job.

One provisioned consortium (mTLS kits) of three synthetic hospitals runs the segmentation job of
every scenario in turn; hospital-c is always the victim and reaches the server through a TCP proxy
(:class:`fedbrain_testing.faults.TcpProxy`) so its link can be cut without root. Faults are injected
2 s after the server starts round 1 (round 2 for the server). The harness is
:mod:`fedbrain_testing.faults` (tests/test_poc_faults.py runs a fast subset of it).

    python bench/run.py --only faults      # ~14 min on 2 cores
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TITLE = "Faults injected and survived (POC, 3 sites, segmentation)"
ROUNDS = 5


def settings():
    from fedbrain.tasks.segmentation import SegmentationConfig

    # Small but real: every round trains and validates; round_timeout is the policy under test.
    return SegmentationConfig(rounds=ROUNDS, epochs_per_round=1, max_steps=4, min_clients=2, min_trained_sites=2,
                              round_timeout=30.0, dead_site_grace=20.0)


PLAN = [  # (scenario, config changes, at_round)
    ("clean", {}, 1),
    ("site_crash_min2", {}, 1),
    ("site_crash_min3", {"min_clients": 3}, 1),
    ("straggler", {}, 1),
    ("network_cut", {}, 1),
    ("site_restart", {}, 1),
    ("server_restart", {}, 2),
]


def run(work: Path, console) -> dict:
    from fedbrain_testing import faults as F
    from fedbrain.poc.consortium import PocConsortium
    from fedbrain.synthetic.cohort import synthesize_consortium

    run_dir = Path(work) / f"faults_{time.strftime('%Y%m%d_%H%M%S')}"
    poc = PocConsortium(run_dir / "poc")
    data = run_dir / "data"
    synthesize_consortium(data, sites=3, cases=4, seed=1, site_names=poc.sites, progress=False)
    base = settings()
    out = {"settings": base.to_dict(), "victim": F.VICTIM, "scenarios": {}, "run_dir": str(run_dir)}
    proxy = None
    started = time.time()
    try:
        poc.prepare(data_dir=data)
        proxy = F.TcpProxy(F.server_port(poc))
        F.route_site_through(poc, F.VICTIM, proxy.port)
        poc.start()
        for name, changes, at_round in PLAN:
            console.print(f"[bold]faults:[/] {name}: {F.SCENARIOS[name]}")
            t = time.time()
            try:
                res = F.run_scenario(poc, name, base.replace(**changes), run_dir, proxy=proxy, at_round=at_round,
                                     timeout=300)
            except Exception as e:  # one broken scenario must not lose the others' figures
                res = {"scenario": name, "what": F.SCENARIOS[name], "error": f"{type(e).__name__}: {e}"[:400]}
            res["scenario_seconds"] = round(time.time() - t, 1)
            out["scenarios"][name] = res
            (run_dir / "partial.json").write_text(json.dumps(out, indent=1, default=str))  # salvage if cut short
            console.print({k: v for k, v in res.items() if k not in ("per_round", "result")})
            _settle(poc, F)
    finally:
        poc.stop()
        if proxy is not None:
            proxy.close()
    clean = out["scenarios"].get("clean", {}).get("final_dice")
    for res in out["scenarios"].values():
        if clean and res.get("final_dice") is not None:
            res["dice_vs_clean"] = round(res["final_dice"] - clean, 4)
    out["total_seconds"] = round(time.time() - started, 1)
    return out


def _settle(poc, F, timeout: float = 120) -> None:
    """Between scenarios: every participant up and connected again (a later scenario needs all three)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name in ["localhost", *poc.sites]:
            if F.flare_pid(poc, name) is None and F.wrapper_pid(poc, name) is None:
                F.start_participant(poc, name)
        try:
            status = poc.status()
            if all(v == "connected" for v in status["sites"].values()) and not status.get("jobs"):
                return
        except Exception:
            pass
        time.sleep(3)


def _f(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def rows(result: dict) -> list[tuple]:
    out = []
    for name, r in result.get("scenarios", {}).items():
        if r.get("error"):
            out.append((f"{name}: {r['what']}", "harness error", "", r["error"][:160]))
            continue
        survived = r.get("status") == "FINISHED:COMPLETED"
        goal = "ends with a clear reason" if name == "site_crash_min3" else "0 rounds lost"
        detail = (f"status {r.get('status')}; rounds completed {r.get('rounds_completed')}/{r.get('rounds')}; "
                  f"recovery {_f(r.get('recovery_seconds'), '{:.0f}')} s; final Dice {_f(r.get('final_dice'))} "
                  f"({_f(r.get('dice_vs_clean'), '{:+.3f}')} vs clean); {hospital_note(r)}")
        if not survived and r.get("reason"):
            detail += f"; reason: {r['reason'][:140]}"
        if name == "site_crash_min3":  # too few sites left: the goal is a clear end, not a survived job
            ok = str(r.get("status", "")).startswith("FINISHED") and bool(r.get("reason"))
        else:
            ok = r.get("rounds_lost") == 0
        out.append((f"{name}: {r['what']}", f"{r.get('rounds_lost')} lost", goal, detail, "met" if ok else "**not met**"))
    return out


def hospital_note(r: dict) -> str:
    victim = r.get("victim_rounds")
    text = f"{'hospital-c'} in rounds {victim}" if victim is not None else ""
    if r.get("next_job"):
        text += f"; next job status {r['next_job']['status']}, aggregated {r['next_job']['aggregated']}"
    if r.get("interrupted_status"):
        text += (f"; interrupted job after the restart: {r['interrupted_status']}; resumed by the "
                 f"{r.get('resumed_by', 'admin (fedbrain job resume)')} after round {r.get('resumed_from_round')}, "
                 f"rounds trained twice {r.get('rounds_trained_twice')}")
    return text


def notes(result: dict) -> list[str]:
    s = result.get("settings", {})
    return [
        f"Settings: {ROUNDS} rounds, `min_clients` {s.get('min_clients')} of 3 (3 where the row says so), "
        f"`round_timeout` {s.get('round_timeout')} s, `dead_site_grace` {s.get('dead_site_grace')} s, "
        f"`max_steps` {s.get('max_steps')} per round (Dice is low in absolute terms: the rows compare runs).",
        "Rounds lost = planned rounds that were never aggregated; recovery = seconds from the fault to the first "
        "round that closed after it. Per-round detail (who was aggregated, why each round closed) is in "
        "bench/results.json and each job's `round_contributions.jsonl`. What FLARE does on each fault, and why: "
        "[reliability](reliability.md).",
    ] + [f"{name}: {r['note']}." for name, r in result.get("scenarios", {}).items() if r.get("note")]


def plot(result: dict, img_dir: Path) -> list[str]:
    """One bar per scenario: its rounds end to end (width = seconds the round waited), coloured by why it closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"all answered": "#4c9a2a", "round_timeout": "#e69f00", "missing sites deemed dead": "#c0392b",
               "missing sites never fetched": "#8e44ad", "error replies": "#7f8c8d"}
    scenarios = [(n, r) for n, r in result.get("scenarios", {}).items() if r.get("per_round")]
    if not scenarios:
        return []
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(scenarios) + 1.2))
    for y, (name, r) in enumerate(scenarios):
        x = 0.0
        for rnd in r["per_round"]:
            why = next((k for k in colours if str(rnd.get("closed_by", "")).startswith(k)), "error replies")
            ax.barh(y, rnd["seconds"], left=x, color=colours[why], edgecolor="white")
            ax.text(x + rnd["seconds"] / 2, y, str(rnd["round"]), ha="center", va="center", fontsize=7, color="white")
            x += rnd["seconds"]
        lost = r.get("rounds_lost") or 0
        if lost:
            ax.text(x + 1, y, f"{lost} lost", va="center", fontsize=8)
    ax.set_yticks(range(len(scenarios)), [n for n, _ in scenarios])
    ax.invert_yaxis()
    ax.set_xlabel("seconds each round waited (numbers: round)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()], labels=list(colours),
              fontsize=7, loc="lower right")
    ax.set_title("Rounds under each fault, coloured by why the round closed")
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "faults_rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f"img/{path.name}"]
