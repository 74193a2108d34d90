"""Soak: one long job (500 rounds, 3 sites, a small model) and the memory of every process, round by round.

FLARE users report the server's memory growing over long jobs. A real POC (server, 3 site processes,
mTLS, fedbrain's site policies), the segmentation job with the load benchmark's tiny settings,
submitted through the admin API. A background thread samples, every second, the resident memory
(VmRSS) of the server's parent process, its job process, and each site's client and job processes;
each sample is then placed in the round the server's log says was running. Per round: the last
sample. Goal (issue 29): growth below 10% from round 50 to the last round, for the server and for
each site. Two arms, one after the other: FLARE's default allocator (glibc malloc, `MALLOC_ARENA_MAX=4` from
the kit's sub_start.sh) and jemalloc, FLARE's own opt-in (`NVFLARE_ENABLE_JEMALLOC_PRELOAD=true`; needs
libjemalloc2 on the machine, otherwise that arm is skipped and says so). Progress is polled as `fedbrain
watch` polls (fedbrain.poc.runner: job meta and the job's progress record every 3 s).

    python bench/run.py --only soak          # ~16 min on 2 cores (2026-12-07)
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path

from fedbrain_testing.load import Sampler

TITLE = "Soak: memory over a 500-round job"
ROUNDS = 500
FROM_ROUND = 50
GOAL_GROWTH = 0.10


class RssTimeline(Sampler):
    """Every ``interval`` seconds: (time, {process role: resident bytes}) of the POC's server and sites."""

    def __init__(self, workspace: Path, server: str, sites: list[str], interval: float = 1.0):
        super().__init__(interval)
        self.workspace, self.server, self.sites = Path(workspace), server, list(sites)
        self.samples: list[tuple[float, dict[str, int]]] = []

    def sample(self) -> None:
        import re

        from fedbrain.poc.consortium import processes_under
        from fedbrain_testing.load import _cmdline, _status_kb

        row = {}
        pids = processes_under(self.workspace)
        for name in [self.server, *self.sites]:
            pattern = re.compile(rf"/{re.escape(name)}(/|\s|$)")
            for pid in pids:
                cmd = _cmdline(pid)
                if "python" not in cmd or not pattern.search(cmd):
                    continue
                role = ("job" if "worker_process" in cmd or "runner_process" in cmd
                        else "warm" if "fedbrain.poc.warm" in cmd else "parent")
                key = f"{name} {role}"
                row[key] = row.get(key, 0) + _status_kb(pid, "VmRSS") * 1024
        self.samples.append((time.time(), row))


def per_round(samples, round_starts: list[float]) -> dict[str, list[float | None]]:
    """Process role -> resident MB at the end of each round (the last sample before the next round began).
    The last round has no next start: it ends one median round after it began (then the job's processes exit)."""
    roles = sorted({k for _, row in samples for k in row})
    out = {r: [None] * len(round_starts) for r in roles}
    gaps = sorted(b - a for a, b in zip(round_starts, round_starts[1:]))
    end = round_starts[-1] + (gaps[len(gaps) // 2] if gaps else 0.0) if round_starts else 0.0
    for t, row in samples:
        i = bisect.bisect_right(round_starts, t) - 1
        if 0 <= i < len(round_starts) and t <= max(end, round_starts[i] if i < len(round_starts) - 1 else end):
            for role, value in row.items():
                if value:
                    out[role][i] = value / 2**20
    return out


def round_starts(log_json: str) -> list[float]:
    """When each round began (epoch seconds), from the server's job log; the log's times are this machine's."""
    import re

    from fedbrain_testing.load import _records

    return [t.timestamp() for t, msg, _ in _records(log_json) if re.search(r"Round \d+ started", msg)]


def window_growth(series: list[float | None], start: int = FROM_ROUND, half: int = 5) -> float | None:
    """Mean of rounds ``start``+-``half`` against the mean of the last 2*``half`` rounds: the same growth, read
    without the round-to-round swing of one end point (the allocator returns pages in bursts)."""
    first = [v for v in series[max(0, start - half):start + half + 1] if v]
    last = [v for v in series[-2 * half:] if v]
    return None if not first or not last else (sum(last) / len(last)) / (sum(first) / len(first)) - 1


def growth(series: list[float | None], start: int = FROM_ROUND) -> float | None:
    """(last value - value at ``start``) / value at ``start``, over the rounds that have a value."""
    at = next((v for v in series[start:] if v), None)
    last = next((v for v in reversed(series) if v), None)
    return None if not at or last is None else (last - at) / at


#: The allocator arms: name -> environment of every POC process.
ARMS = {"glibc": {}, "jemalloc": {"NVFLARE_ENABLE_JEMALLOC_PRELOAD": "true"}}
#: Where FLARE's sub_start.sh looks for jemalloc (it preloads the first that exists).
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so")


def run(work: Path, console, rounds: int = ROUNDS) -> dict:
    """Both allocator arms, one after the other (each its own POC)."""
    out = {}
    for name, env in ARMS.items():
        if env and not any(Path(p).is_file() for p in JEMALLOC_PATHS):
            out[name] = {"skipped": "libjemalloc2 is not installed here (apt-get install libjemalloc2)"}
            continue
        console.print(f"[bold]soak, {name}[/]")
        out[name] = run_arm(work, console, rounds, env)
    return {"arms": out}


def run_arm(work: Path, console, rounds: int = ROUNDS, env: dict | None = None) -> dict:
    from fedbrain.jobs.segmentation import export
    from fedbrain.poc.consortium import PocConsortium
    from fedbrain.poc.runner import submit_and_wait
    from fedbrain.report.job_report import find_workspace
    from fedbrain.synthetic.cohort import synthesize_consortium
    from fedbrain_testing.load import round_timeline

    import load as load_bench  # bench/load.py: the same tiny job

    run_dir = Path(work) / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    poc = PocConsortium(run_dir)
    poc.extra_env.update(env or {})
    synthesize_consortium(run_dir / "data", sites=len(poc.sites), cases=load_bench.CASES, seed=0, spacing_mm=4.0,
                          site_names=poc.sites, progress=False)
    config = load_bench.tiny_config(len(poc.sites), rounds=rounds, name="fedbrain_soak").replace(
        min_trained_sites=2, round_timeout=120)
    job = export(config, run_dir / "jobs")
    server = next(p.name for p in poc.participants("server"))
    started = time.time()
    try:
        poc.up(data_dir=run_dir / "data", timeout=240)
        with RssTimeline(poc.workspace, server, poc.sites) as rss:
            meta, result = submit_and_wait(poc, job, rounds=rounds, result_dir=run_dir / "result", console=console)
    finally:
        poc.clean()
    ws = find_workspace(result)
    log_json = (ws / "log.json").read_text(errors="replace")
    timeline = round_timeline(log_json)
    series = per_round(rss.samples, round_starts(log_json))
    return {"status": meta.get("status"), "rounds": rounds, "rounds_seen": len(timeline), "from_round": FROM_ROUND,
            "seconds": time.time() - started,
            "round_median_s": sorted(r["seconds"] for r in timeline if r.get("seconds"))[len(timeline) // 2]
            if timeline else None,
            "rss_mb": series, "growth": {role: growth(v) for role, v in series.items()},
            "task": load_bench.TINY, "sites": poc.sites}


# ---- report ----------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:+.1f}%"


def rows(result: dict) -> list[tuple]:
    out = []
    for arm, res in result["arms"].items():
        if "skipped" in res:
            out.append((f"{arm}: memory growth", "–", "< +10%", res["skipped"], "not measured"))
            continue
        out += _arm_rows(arm, res)
    return out


def _arm_rows(arm: str, result: dict) -> list[tuple]:
    g = result["growth"]
    servers = {k: v for k, v in g.items() if k.startswith("localhost")}
    sites = {k: v for k, v in g.items() if not k.startswith("localhost")}
    worst_site = max(sites.items(), key=lambda kv: kv[1] if kv[1] is not None else -1) if sites else (None, None)

    def verdict(values):
        return "met" if values and all(v is not None and v < GOAL_GROWTH for v in values) else "**not met**"

    last = result["rounds_seen"] - 1
    steady = {k: window_growth(v, result["from_round"]) for k, v in result["rss_mb"].items()}
    worst_steady = max((v for k, v in steady.items() if k in sites and v is not None), default=None)
    detail = (f"{result['status']}; {result['rounds_seen']} rounds seen, median round {result['round_median_s']:.2f} s; "
              f"resident memory at the end of round {result['from_round']} vs round {last}; without the end points' "
              f"swing (mean of rounds {result['from_round'] - 5}-{result['from_round'] + 5} vs the last 10): parent "
              f"{_pct(steady.get('localhost parent'))}, job {_pct(steady.get('localhost job'))}")
    return [(f"{arm}: server memory growth, rounds {result['from_round']}-{last} (parent / job process)",
             " / ".join(_pct(servers.get(k)) for k in ("localhost parent", "localhost job")), "< +10%",
             detail + "; POC kits (their warm process, which forks job processes, is shown apart)",
             verdict(list(servers.values()))),
            (f"{arm}: site memory growth, rounds {result['from_round']}-{last}, worst of {len(sites)} processes",
             f"{_pct(worst_site[1])} ({worst_site[0]})", "< +10%",
             "; ".join(f"{k} {_pct(v)}" for k, v in sorted(sites.items()))
             + f"; without the end points' swing, worst {_pct(worst_steady)}", verdict(list(sites.values())))]


def plot(result: dict, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {k: v for k, v in result["arms"].items() if "rss_mb" in v}
    if not arms:
        return []
    fig, axes = plt.subplots(1, len(arms), figsize=(7 * len(arms), 4.5), sharey=True, squeeze=False)
    for ax, (arm, res) in zip(axes[0], arms.items()):
        for role, values in sorted(res["rss_mb"].items()):
            xs = [i for i, v in enumerate(values) if v]
            ax.plot(xs, [values[i] for i in xs], label=role, lw=1.2 if role.startswith("localhost") else 0.8)
        ax.axvline(res["from_round"], color="grey", ls=":", lw=1)
        ax.set_xlabel("round")
        ax.set_title(f"{arm}: {res['rounds']}-round job, 3 sites")
    axes[0][0].set_ylabel("resident memory at the end of each round (MB)")
    axes[0][-1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "soak_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f"img/{path.name}"]


def notes(result: dict) -> list[str]:
    return [
        "How to read it: each line is one process's resident memory at the end of each round (sampled every second;"
        " job processes of a POC kit are forked from its warm process, so their resident memory includes pages they"
        " share with it). The job processes grow fastest early and level off after 250-300 rounds (the 2026-12-06"
        " run: a site's job process 604 MB at round 50, 720 MB at 300, 721 MB at 499); drops are pages returned.",
        "",
        "What drove the server parent's growth: admin commands, not rounds. Every admin reply is streamed by FLARE's"
        " ByteStreamer with a 512 KB-1 MB chunk buffer, and what stays is the allocator's fragmentation (tracemalloc"
        " in the parent: ~1 MB of Python objects grew while the process grew tens of MB). Until 2026-12-07 every"
        " progress poll (this benchmark's, `fedbrain watch`'s, the demo's) downloaded the server's whole job log,"
        " megabytes after a few hundred rounds. Polls now read the running job's own progress record"
        " (`show_stats`, a few hundred bytes; fedbrain.fl.progress). Measured on the way, 300-round runs one after the"
        " other on 2026-12-07, server parent from round 50 to 299: whole log every poll +82% (glibc) / +53%"
        " (jemalloc); a small reply every poll +16% / +5%. Sites' and the server's job processes: +10-25% in all"
        " four runs (no clear allocator effect).",
        "",
        "What drove the job processes' growth: garbage in reference cycles, freed only at Python's rare full"
        " collections (the steps down in the plot). Traced in a site's job process (one full collection after 100"
        " rounds, `gc.DEBUG_SAVEALL`): 1,997 unreachable objects, among them 50 each of FLARE's `TxTask`,"
        " `BlobStream`, `StreamFuture` and `BufferList` and 153 memoryviews: every stream since the last full"
        " collection, with its 512 KB-1 MB chunk buffer. Since 2026-12-07 the"
        " site loop and the server's round controllers collect at the end of every round, having frozen what"
        " survived the first (fedbrain.fl.housekeeping). 300-round runs on the way (glibc): a collection every round"
        " alone held the job processes to +2.5-7.4% but cost 0.84 s a round (median 1.46 s against 0.62 s: each"
        " collection walked all of PyTorch, MONAI and FLARE); with the first round's survivors frozen +4.3-7.6% at"
        " a median round of 0.63 s.",
        "",
        "Tried before, not shipped: `MALLOC_ARENA_MAX=2` with `MALLOC_MMAP_THRESHOLD_=131072` for every process"
        " (parent +42% against +75% in a side-by-side 300-round run, but median round 1.45 s against 1.16 s);"
        " `malloc_trim(0)` every 10 s in the server's parent (no reliable effect). FLARE's stream error-context map grows by ~24 small"
        " entries a round, kept 300 s (docs/maintainers.md).",
        "",
    ]
