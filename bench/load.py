"""Load: 3, 6 and 12 hospitals on this one machine (2 cores), a small model and small data.

Real POC per size (FLARE server + N site processes from N provisioned kits, mTLS, fedbrain's site
policies), the segmentation job submitted through the admin API. Per size: does every round
complete (the server's audit of received updates: N per round), the server's aggregation time per
round (its job log: from the round's last update received to the model saved), the server's time
to take in each update as it arrives, the peak resident memory of each site (its client process
and its job process, sampled every second), and the fixed per-round overhead (round wall time
minus the slowest site's own validate+train time that round). At the largest size the same job
also runs with FLARE's default round timing, side by side on the same consortium.

    python bench/run.py --only load          # ~10 min on 2 cores
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

TITLE = "Load: many sites on one machine"
SIZES = (3, 6, 12)
ROUNDS = 3
CASES = 3  # per site (the synthetic cohort's minimum: 1 training and 2 validation cases)
#: A small model and small volumes: what is measured is FLARE's work per site, not training.
TINY = dict(spacing=(6.0, 6.0, 6.0), roi_size=(32, 32, 32), init_filters=4, epochs_per_round=1, max_steps=2,
            batch_size=2, seed=0)


def tiny_config(sites: int, rounds: int = ROUNDS, name: str = "fedbrain_load"):
    from fedbrain.tasks.segmentation import SegmentationConfig

    return SegmentationConfig(name=name, rounds=rounds, min_clients=sites, **TINY)


def _audit_rounds(result: Path) -> dict[int, list[str]]:
    """Round -> sites whose update the server received (its ReceivedUpdateAudit)."""
    out: dict[int, list[str]] = {}
    for path in Path(result).glob("**/received_updates.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(int(rec["round"]), []).append(rec["site"])
    return out


def _overheads(report: dict, timeline: list[dict]) -> list[float]:
    """Per round: wall time minus the slowest site's own validate+train time (its round_seconds)."""
    out = []
    for r in timeline:
        work = [e["round_seconds"] for s in report["sites"].values() for e in s["rounds"]
                if e["round"] == r["round"] and e.get("round_seconds") is not None]
        if r["seconds"] is not None and work and r["round"] > 0:  # round 0 also loads each site's data
            out.append(r["seconds"] - max(work))
    return out


def _job_figures(meta: dict, result: Path, sites: list[str], rounds: int) -> dict:
    from fedbrain_testing.load import round_timeline
    from fedbrain.report.job_report import build_report, find_workspace

    ws = find_workspace(result)
    timeline = [r for r in round_timeline((ws / "log.json").read_text(errors="replace")) if r["round"] < rounds]
    audit = _audit_rounds(result)
    report = build_report(result)
    complete = [r for r in range(rounds) if sorted(audit.get(r, [])) == sorted(sites)]
    agg = [r["aggregation_s"] for r in timeline if r["aggregation_s"] is not None]
    return {
        "status": meta.get("status"),
        "rounds_complete": len(complete),
        "rounds": rounds,
        "updates_per_round": {str(r): len(v) for r, v in sorted(audit.items())},
        "timeline": timeline,
        "aggregation_s": agg,
        "aggregation_median_s": statistics.median(agg) if agg else None,
        "accept_median_s": statistics.median(r["accept_s"] for r in timeline) if timeline else None,
        "round_median_s": statistics.median(r["seconds"] for r in timeline if r["seconds"] and r["round"] > 0)
        if len(timeline) > 1 else None,
        "overhead_s": _overheads(report, timeline),
    }


def run_size(work: Path, n: int, console, *, with_defaults: bool = False, rounds: int = ROUNDS) -> dict:
    """One consortium of ``n`` sites: up, the job (and, with_defaults, the same job with FLARE's
    default round timing), down."""
    from fedbrain.jobs.segmentation import export
    from fedbrain.poc.consortium import PocConsortium
    from fedbrain_testing.load import PeakRss, flare_default_timing, write_project
    from fedbrain.poc.runner import submit_and_wait
    from fedbrain.synthetic.cohort import synthesize_consortium

    run_dir = Path(work) / f"load-{n}-{time.strftime('%Y%m%d-%H%M%S')}"
    poc = PocConsortium(run_dir, write_project(n, run_dir / f"project-{n}-sites.yml"))
    synthesize_consortium(run_dir / "data", sites=n, cases=CASES, seed=0, spacing_mm=4.0, site_names=poc.sites,
                          progress=False)
    job = export(tiny_config(n, rounds), run_dir / "jobs")
    arms = {"fedbrain": job}
    if with_defaults:
        arms = {"flare_defaults": flare_default_timing(job, run_dir / "jobs-flare-defaults" / job.name), **arms}
    out = {"sites": n}
    try:
        t = time.time()
        poc.up(data_dir=run_dir / "data", timeout=240)
        out["poc_start_s"] = time.time() - t
        for arm, folder in arms.items():
            console.print(f"[bold]{n} sites[/], {arm}: {rounds} rounds")
            with PeakRss(poc.workspace, poc.sites) as rss:
                t = time.time()
                meta, result = submit_and_wait(poc, folder, rounds=rounds, result_dir=run_dir / f"result-{arm}",
                                               console=console)
                seconds = time.time() - t
            out[arm] = {**_job_figures(meta, result, poc.sites, rounds), "job_s": seconds,
                        "peak_rss_mb": {s: {k: v / 2**20 for k, v in p.items()} for s, p in rss.peak.items()}}
    finally:
        poc.clean()
    return out


def linear_fit(xs, ys) -> dict:
    """Least squares y = a + b x, and R^2."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    return {"intercept_s": a, "per_site_s": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def run(work: Path, console) -> dict:
    started = time.time()
    sizes = {}
    for n in SIZES:
        console.rule(f"load: {n} sites")
        try:
            sizes[str(n)] = run_size(work, n, console, with_defaults=(n == max(SIZES)))
        except Exception as e:  # one size failing must not lose the others' figures: it is reported
            console.print(f"[red]load: {n} sites failed: {e}")
            sizes[str(n)] = {"sites": n, "error": f"{type(e).__name__}: {e}"[:500]}
    failed = {n: v["error"] for n, v in sizes.items() if "error" in v}
    sizes = {n: v for n, v in sizes.items() if "error" not in v}
    if not sizes:
        return {"sizes": {}, "failed": failed, "rounds": ROUNDS, "cases_per_site": CASES, "task": TINY,
                "aggregation_fit": None, "seconds": time.time() - started}
    xs = [int(n) for n in sizes]
    agg = [sizes[str(n)]["fedbrain"]["aggregation_median_s"] for n in xs]
    fit = linear_fit(xs, agg) if len(xs) > 1 and all(v is not None for v in agg) else None
    return {"sizes": sizes, "failed": failed, "rounds": ROUNDS, "cases_per_site": CASES, "task": TINY,
            "aggregation_fit": fit, "seconds": time.time() - started}


# ---- report ----------------------------------------------------------------------------------------
def _peak_site(entry: dict) -> float:
    return max(p["total"] for p in entry["peak_rss_mb"].values())


def _fmt(v, spec="{:.2f}") -> str:
    return "–" if v is None else spec.format(v)


def _ms(v) -> str:
    return _fmt(v * 1000 if v is not None else None, "{:.0f}")


def rows(result: dict) -> list[tuple]:
    sizes = result["sizes"]
    ns = sorted(sizes, key=int)
    failed = [(f"{n} sites: the run failed", "failed", "all rounds", err, "**not met**")
              for n, err in sorted(result.get("failed", {}).items(), key=lambda kv: int(kv[0]))]
    if not ns:
        return failed
    fb = {n: sizes[n]["fedbrain"] for n in ns}
    label = " / ".join(ns)
    every = all(fb[n]["rounds_complete"] == fb[n]["rounds"] and fb[n]["status"] == "FINISHED:COMPLETED" for n in ns)
    out = [(f"Every round completes, all sites' updates received ({label} sites)",
             " / ".join(f"{fb[n]['rounds_complete']}/{fb[n]['rounds']}" for n in ns), "all rounds",
             "; ".join(f"{n}: {fb[n]['status']}, updates per round {list(fb[n]['updates_per_round'].values())}"
                       for n in ns), "met" if every else "**not met**")]
    agg = [fb[n]["aggregation_median_s"] for n in ns]
    fit = result.get("aggregation_fit")
    first, last = int(ns[0]), int(ns[-1])
    growth = agg[-1] / agg[0] if agg[0] else None
    linear_ok = growth is not None and growth <= last / first
    out.append((f"Server aggregation time per round, median (ms; {label} sites)", " / ".join(_ms(v) for v in agg),
                "linear in sites",
                f"last update received -> model saved; x{_fmt(growth)} from {first} to {last} sites (linear: "
                f"x{last / first:.0f})" + (f"; fit {fit['intercept_s'] * 1000:.0f} ms + {fit['per_site_s'] * 1000:.1f} "
                                           f"ms/site, R^2 {fit['r2']:.2f}" if fit else ""),
                "met" if linear_ok else "**not met**"))
    work = [(fb[n]["accept_median_s"] or 0) + (fb[n]["aggregation_median_s"] or 0) for n in ns]
    out.append((f"Server time taking in a round's updates as they arrive, median (ms; {label} sites)",
                " / ".join(_ms(fb[n]["accept_median_s"]) for n in ns), "",
                "result filters (the audit) and the controller's per-update step, summed over the round ("
                + " / ".join(f"{1000 * fb[n]['accept_median_s'] / int(n):.1f}" for n in ns if fb[n]["accept_median_s"])
                + " ms per update: the sites' uploads compete for the same cores); with the aggregation time, the "
                f"server's work per round: {' / '.join(_ms(w) for w in work)} ms, x{work[-1] / work[0]:.2f} from "
                f"{ns[0]} to {ns[-1]} sites"))
    out.append((f"Peak memory per site, client + job process, largest site (MB; {label} sites)",
                " / ".join(_fmt(_peak_site(fb[n]), "{:.0f}") for n in ns), "",
                "; ".join(f"{n}: client {max(p['site'] for p in fb[n]['peak_rss_mb'].values()):.0f}, job "
                          f"{max(p['job'] for p in fb[n]['peak_rss_mb'].values()):.0f}" for n in ns)))
    out.append((f"Fixed per-round overhead: round wall time - slowest site's own work, median (s; {label} sites)",
                " / ".join(_fmt(statistics.median(fb[n]["overhead_s"]) if fb[n]["overhead_s"] else None) for n in ns),
                "", "rounds after the first; fedbrain's round timing"))
    big = sizes[ns[-1]]
    if big.get("flare_defaults"):
        d, f = big["flare_defaults"], big["fedbrain"]
        med = lambda e: statistics.median(e["overhead_s"]) if e["overhead_s"] else None
        out.append((f"Fixed per-round overhead at {ns[-1]} sites: FLARE's default timing / fedbrain's (s)",
                    f"{_fmt(med(d))} / {_fmt(med(f))}", "",
                    f"same job, same consortium, one after the other; round wall time {_fmt(d['round_median_s'])} s "
                    f"vs {_fmt(f['round_median_s'])} s (medians)"))
    out += failed
    out.append(("POC start until every site connected (s)", " / ".join(_fmt(sizes[n]["poc_start_s"], "{:.0f}") for n in ns),
                "", f"{label} sites"))
    return out


def notes(result: dict) -> list[str]:
    t = result["task"]
    return [
        f"Small model and data on purpose: a UNet with {t['init_filters']} initial filters on {t['roi_size'][0]}^3 crops "
        f"at {t['spacing'][0]:.0f} mm, one epoch (at most {t['max_steps']} steps) a round, {result['cases_per_site']} synthetic "
        f"cases per site, {result['rounds']} rounds; all sites and the server share the machine's cores, so a site's own work "
        "stretches with the number of sites while the server's per-round work is what is compared.",
        "",
        "Aggregation time includes FLARE's wait loops that notice the round is complete (the workflow's "
        "task_check_period, 0.1 s in fedbrain's jobs; FLARE's task monitor, 0.2 s, fixed); docs/reliability.md section 5 "
        "explains each figure and docs/admin-guide.md the settings.",
        "",
    ]


def _per_site_axes(ax, xs, ylabel: str, title: str) -> None:
    ax.set_xlabel("sites")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot(result: dict, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    ns = sorted(sizes, key=int)
    if not ns:
        return []
    xs = [int(n) for n in ns]
    fb = [sizes[n]["fedbrain"] for n in ns]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    med = [e["aggregation_median_s"] * 1000 for e in fb]
    lo = [m - min(e["aggregation_s"]) * 1000 for m, e in zip(med, fb)]
    hi = [max(e["aggregation_s"]) * 1000 - m for m, e in zip(med, fb)]
    ax1.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=4, label="median, min-max over rounds")
    fit = result.get("aggregation_fit")
    if fit:
        ax1.plot([0, max(xs)], [fit["intercept_s"] * 1000, (fit["intercept_s"] + fit["per_site_s"] * max(xs)) * 1000],
                 "--", label=f"fit {fit['intercept_s'] * 1000:.0f} + {fit['per_site_s'] * 1000:.1f}·N ms")
    _per_site_axes(ax1, xs, "ms, last update -> model saved", "Server aggregation time per round")
    ax2.plot(xs, [max(p["site"] for p in e["peak_rss_mb"].values()) for e in fb], "s-", label="site client process")
    ax2.plot(xs, [max(p["job"] for p in e["peak_rss_mb"].values()) for e in fb], "o-", label="site job process")
    ax2.plot(xs, [_peak_site(e) for e in fb], "^-", label="both")
    _per_site_axes(ax2, xs, "MB, largest site", "Peak resident memory per site")
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(img_dir / "load_sites.png", dpi=110)
    plt.close(fig)
    return ["img/load_sites.png"]
