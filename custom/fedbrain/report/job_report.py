"""Per-site report of a finished FLARE job, from its downloaded result folder alone.

Reads what FLARE 2.9 writes into a job's server workspace:
  workspace/metrics/round_metrics.jsonl   every site's metrics for every round (client-reported)
  workspace/cross_site_val/cross_val_results.json   the final global model validated at each site
  workspace/log.json                      server log, for "Round N started" times
  workspace/app_server/*.pt               global and best global model
and the job's meta (status, timing; see _job_meta), and writes report.json, report.md and PNG plots.
"""

from __future__ import annotations

import json
import math
import statistics
from datetime import datetime, timedelta
from pathlib import Path

from fedbrain.contracts import (AUDIT_FILE, ROUND_FILE, DATA_COUNTS, DP_DELTA, DP_EPSILON_SPENT, DP_WITHHELD, DP_WITHHELD_REASONS,
                                GUARD_FILE, HE_AGGREGATION_FILE, REGIONS, SITE_ERROR, VAL_DICE, VAL_DICE_REGIONS,
                                VAL_HD95_REGIONS, SECAGG_MASKED, epsilon_from_wire)
from fedbrain.tasks.seg_metrics import convergence_score
from fedbrain import terminal

# Per task: the metrics shown (key, column label) and the primary one (flags, minimum-site figure).
TASKS = {
    "segmentation": {"metrics": (*zip(VAL_DICE_REGIONS, (r.upper() for r in REGIONS)), (VAL_DICE, "mean"),
                                 *zip(VAL_HD95_REGIONS, (f"{r.upper()} HD95 mm" for r in REGIONS))),
                     "primary": "val_dice_wt", "primary_label": "WT Dice", "curve": VAL_DICE, "curve_label": "mean Dice (TC/WT/ET)"},
    "classification": {"metrics": (("val_acc", "acc"), ("val_bacc", "bal. acc"), ("val_auc", "AUC")),
                       "primary": "val_bacc", "primary_label": "balanced accuracy", "curve": "val_auc", "curve_label": "macro AUC"},
}
DICE_KEYS = tuple(k for k, _ in TASKS["segmentation"]["metrics"] if k.startswith(VAL_DICE))
DATA_KEYS = DATA_COUNTS
# Sites are flagged against the *other* sites: with 3 sites a plain z-score can never reach 2.
FLAG_SD = 2.0
# Floor of that SD: with 3 sites it comes from 2 values and can be tiny, and a site's metric on a
# 7-12-case validation set moves 8-14 points per case; below a 10-point gap a flag means nothing.
MIN_SD = 0.05


class ReportError(RuntimeError):
    pass


def find_workspace(result_dir: Path) -> Path:
    """Accept the job folder, its workspace/, or a folder holding one downloaded job."""
    result_dir = Path(result_dir)
    for cand in (result_dir / "workspace", result_dir, *sorted(result_dir.glob("*/workspace"))):
        if (cand / "metrics" / "round_metrics.jsonl").is_file():
            return cand
    raise ReportError(f"{result_dir}: no workspace/metrics/round_metrics.jsonl found; is this a downloaded job result?")


def _round_start_times(workspace: Path) -> dict[int, datetime]:
    starts = {}
    log = workspace / "log.json"
    if not log.is_file():
        return starts
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        msg = rec.get("message", "")
        if "Round " in msg and " started" in msg:
            try:
                rnd = int(msg.split("Round ")[1].split(" started")[0])
                starts[rnd] = datetime.strptime(rec["asctime"], "%Y-%m-%d %H:%M:%S,%f")
            except (ValueError, KeyError, IndexError):
                continue
        if "Finished FedAvg." in msg or "Finished Scaffold." in msg:  # end of the last round
            try:
                starts.setdefault(-1, datetime.strptime(rec["asctime"], "%Y-%m-%d %H:%M:%S,%f"))
            except (ValueError, KeyError):
                pass
    return starts


def _read_json_dict(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# JobMetaKey values (nvflare/apis/job_def.py) that are stale in the deploy-time copy workspace/meta.json.
_RUN_STATE_KEYS = ("status", "start_time", "duration")


def _job_meta(workspace: Path) -> dict:
    """The finished job's meta: what the job store holds once the job ended.

    FLARE 2.9's job download (``nvflare job download``, Session.download_job_result; server side
    JobCommandModule._download_job_comps, client side FileTransferModule.pull_folder) writes
    ``<job_id>/meta.json`` (the job store's meta at download time: status "FINISHED:COMPLETED", submit_time,
    start_time, duration...), ``<job_id>/job/`` (the job as submitted) and ``<job_id>/workspace/`` (the
    server's run folder). ``workspace/meta.json`` is only the copy AppDeployer wrote when the job was
    deployed: status SUBMITTED, start_time "", duration "N/A"; only its job_id and name are used.
    ``fedbrain demo`` also writes ``job_meta.json`` (what the admin API returned) beside them; it wins.
    """
    job_dir = workspace.parent
    deployed = _read_json_dict(workspace / "meta.json")
    meta = {k: v for k, v in deployed.items() if k not in _RUN_STATE_KEYS}
    downloaded = _read_json_dict(job_dir / "meta.json")
    if "job_id" in downloaded or "status" in downloaded:  # not some other meta.json (a job definition's)
        meta.update(downloaded)
    meta.update(_read_json_dict(job_dir / "job_meta.json"))
    return meta


def _parse_duration(value) -> float | None:
    """Seconds of FLARE's duration, str(timedelta) ("0:02:13.512345", "1 day, 2:00:00"), or a number; None for "N/A"."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and value >= 0 else None
    text = str(value).strip()
    days = 0
    if "day" in text:
        head, _, text = text.partition(",")
        try:
            days = int(head.split()[0])
        except (ValueError, IndexError):
            return None
        text = text.strip()
    parts = text.split(":")
    if len(parts) != 3:
        return None
    try:
        h, m, sec = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    return days * 86400 + h * 3600 + m * 60 + sec


def _parse_asctime(text) -> datetime | None:
    for fmt in ("%Y-%m-%d %H:%M:%S,%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(str(text), fmt)
        except ValueError:
            continue
    return None


def _server_log_span(workspace: Path) -> float | None:
    """Seconds from the first to the last record of the server's job log (log.json and its rotated copies).

    Both ends come from the same clock, so no time zone is involved (the job meta's start_time is UTC, the
    log's asctime the server's local time, and the meta has no end time at all).
    """
    stamps = []
    for path in workspace.glob("log.json*"):
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            t = _parse_asctime(rec.get("asctime")) if isinstance(rec, dict) else None
            if t is not None:
                stamps.append(t)
    if len(stamps) < 2:
        return None
    return (max(stamps) - min(stamps)).total_seconds()


def _job_duration(meta: dict, workspace: Path) -> tuple[str, float | None, str]:
    """(shown duration, seconds, where it came from).

    FLARE sets meta["duration"] (str of a timedelta from start_time) when the job ends COMPLETED, ABORTED,
    ABNORMAL or EXECUTION_EXCEPTION; it stays "N/A" otherwise (and in the deploy-time copy). Then the
    duration is the span of the server's job log.
    """
    seconds = _parse_duration(meta.get("duration"))
    if seconds is not None:
        raw = meta.get("duration")
        return (raw if isinstance(raw, str) else str(timedelta(seconds=round(seconds)))), seconds, "job meta"
    seconds = _server_log_span(workspace)
    if seconds is not None:
        return str(timedelta(seconds=round(seconds))), seconds, "server log"
    return "", None, ""


def _final_eval(workspace: Path) -> dict[str, dict]:
    """Metrics of the last global model at each site (FLARE's final global evaluation)."""
    path = workspace / "cross_site_val" / "cross_val_results.json"
    if not path.is_file():
        return {}
    out = {}
    for site, by_model in json.loads(path.read_text()).items():
        for model_name, metrics in (by_model or {}).items():
            if isinstance(metrics, dict) and "best" not in model_name.lower():
                out[site] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return out


def flag_sites(values: dict[str, float]) -> dict[str, str]:
    """Sites more than 2 SD below the mean of the other sites (leave-one-out), with the reason."""
    flags = {}
    for site, v in values.items():
        others = [x for s, x in values.items() if s != site and not math.isnan(x)]
        if len(others) < 2 or math.isnan(v):
            continue
        mean, sd = statistics.mean(others), max(statistics.stdev(others), MIN_SD)
        if v < mean - FLAG_SD * sd:
            flags[site] = f"{v:.3f} is {(mean - v) / sd:.1f} SD below the other sites' mean {mean:.3f}"
    return flags


def build_report(result_dir: Path) -> dict:
    ws = find_workspace(result_dir)
    rows = [json.loads(line) for line in (ws / "metrics" / "round_metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ReportError(f"{ws}: round_metrics.jsonl is empty: the job finished no round")
    task = "classification" if any(m["name"] == "val_bacc" for r in rows for s in r.get("sites", []) for m in s.get("metrics", [])) else "segmentation"
    spec = TASKS[task]
    keys = tuple(k for k, _ in spec["metrics"])
    primary = spec["primary"]
    sites: dict[str, dict] = {}
    global_curve = []
    for row in rows:
        rnd = row["round"]
        agg = {m["name"]: m["value"] for m in row.get("aggregated_metrics", [])}
        global_curve.append({"round": rnd, **{k: agg.get(k) for k in keys}})
        for site in row.get("sites", []):
            metrics = epsilon_from_wire({m["name"]: m["value"] for m in site.get("metrics", [])})
            entry = sites.setdefault(site["name"], {"rounds": []})
            entry["rounds"].append({"round": rnd, **{k: metrics.get(k) for k in (*keys, "train_loss", "round_seconds",
                                                                                 "he_decrypt_seconds", SITE_ERROR,
                                                                                 *PRIVACY_KEYS)}})
            for k in DATA_KEYS:
                if k in metrics:
                    entry[k] = int(metrics[k])
    final_eval = _final_eval(ws)
    for name, entry in sites.items():
        entry["final"] = final_eval.get(name) or {k: entry["rounds"][-1].get(k) for k in keys}
        entry["final_source"] = "final global model" if name in final_eval else f"global model of round {entry['rounds'][-1]['round']}"
        entry["first"] = {k: entry["rounds"][0].get(k) for k in keys}

    final_primary = {s: float(e["final"].get(primary) if e["final"].get(primary) is not None else float("nan")) for s, e in sites.items()}
    flags = flag_sites(final_primary)
    for s, e in sites.items():
        e["flagged"] = s in flags
        e["flag_reason"] = flags.get(s, "")

    starts = _round_start_times(ws)
    ordered = sorted(r for r in starts if r >= 0)
    round_seconds = []
    for i, r in enumerate(ordered):
        end = starts.get(ordered[i + 1]) if i + 1 < len(ordered) else starts.get(-1)
        if end is not None:
            round_seconds.append({"round": r, "seconds": (end - starts[r]).total_seconds()})

    convergence = None
    if starts and -1 in starts and ordered:
        t0 = starts[ordered[0]]
        curve = [((starts[g["round"]] - t0).total_seconds(), g.get(spec["curve"])) for g in global_curve
                 if g["round"] in starts]
        convergence = convergence_score(curve, (starts[-1] - t0).total_seconds())

    meta = _job_meta(ws)
    duration, duration_s, duration_source = _job_duration(meta, ws)
    values = [v for v in final_primary.values() if not math.isnan(v)]
    app_server = ws / "app_server"
    notes = _site_notes(ws)
    report = {
        "job_id": meta.get("job_id", ws.parent.name),
        "job_name": meta.get("name", ""),
        "task": task,
        "metrics": [list(m) for m in spec["metrics"]],
        "primary": primary,
        "primary_label": spec["primary_label"],
        "status": meta.get("status", "unknown"),
        "duration": duration,
        "duration_s": duration_s,
        "duration_source": duration_source,
        "rounds": len(global_curve),
        "sites": sites,
        "global": global_curve,
        "round_seconds": round_seconds,
        # FeTS-style: area under the global validation curve over the job's wall time, divided by that time
        "convergence": {"score": convergence, "metric": spec["curve"], "label": spec["curve_label"]},
        "best_model": str(app_server / "best_FL_global_model.pt") if (app_server / "best_FL_global_model.pt").is_file() else None,
        "final_model": str(app_server / "FL_global_model.pt") if (app_server / "FL_global_model.pt").is_file() else None,
        "summary": {
            "mean_final": statistics.mean(values) if values else None,
            "min_final": min(values) if values else None,
            # a site without a value is never the minimum (NaN compares false: min() once named such a site)
            "min_site": min((s for s in final_primary if not math.isnan(final_primary[s])),
                            key=lambda s: final_primary[s]) if values else None,
            "sites_without_value": {s: _why_no_value(sites[s], notes.get(s)) for s in final_primary
                                    if math.isnan(final_primary[s])},
            "flagged_sites": sorted(flags),
        },
    }
    report["start_model"] = _start_model(ws)
    report["exchange"] = _exchange(ws, sites)
    report["privacy"] = _privacy(sites)
    report["guard"] = _guard(ws)
    report["unpublished"] = _unpublished(ws)
    report["site_notes"] = notes
    if task == "segmentation":  # the names benchmarks and the README quote
        report["summary"].update(mean_final_wt_dice=report["summary"]["mean_final"], min_final_wt_dice=report["summary"]["min_final"],
                                 mean_final_dice=_mean([e["final"].get("val_dice") for e in sites.values()]))
    return report


def _start_model(ws: Path) -> dict | None:
    """Where the job's initial global model came from: the public start it carried (its provenance), or None."""
    from fedbrain.models.start import record_in_run

    record = record_in_run(ws)
    if record is None:
        return None
    return {"sha256": record.get("sha256"), "task": record.get("task"), "created": record.get("created"),
            "epochs": record.get("epochs"), "public_validation": record.get("public_validation", {}),
            "public_data": [{k: d.get(k) for k in ("site", "n_training", "n_validation", "datalist_sha256")}
                            for d in record.get("public_data", [])]}


def _start_markdown(start: dict | None) -> list[str]:
    if not start:
        return ["Initial global model: the network's seeded random weights (no public start)."]
    data = ", ".join(f"{d['site']} ({d['n_training']} training cases, datalist sha256 {str(d['datalist_sha256'])[:12]})"
                     for d in start["public_data"])
    scores = ", ".join(f"{k} {_fmt(v)}" for k, v in start["public_validation"].items())
    return [f"Initial global model: the public start sha256 `{str(start['sha256'])[:16]}` ({start['epochs']} epochs on "
            f"{data}; on its public validation cases {scores}; made {start['created']}). No hospital data is in it."]


def _exchange(ws: Path, sites: dict) -> dict:
    """What crossed the wire per round and site (the server's audit), and HE timings when encrypted."""
    audit_file = ws / AUDIT_FILE
    rows, refused = [], []
    if audit_file.is_file():
        decrypt = {(name, r["round"]): r.get("he_decrypt_seconds") for name, e in sites.items() for r in e["rounds"]}
        for line in audit_file.read_text().splitlines():
            e = json.loads(line)
            if e.get("refused"):
                refused.append({"round": e.get("round"), "site": e.get("site"), "reason": e["refused"]})
                continue
            dtypes = {p.get("dtype") for p in e.get("params", {}).values()}
            masked = set(e.get("params", {})) == {SECAGG_MASKED}
            rows.append({"round": e.get("round"), "site": e.get("site"), "bytes": e.get("bytes"),
                         "encrypted": dtypes == {"CKKSVector"}, "masked": masked, "tensors": len(e.get("params", {})),
                         "encrypt_s": (e.get("timings") or {}).get("he_encrypt_seconds"),
                         "decrypt_s": decrypt.get((e.get("site"), e.get("round")))})
    agg_file = ws / HE_AGGREGATION_FILE
    aggregation = [json.loads(line) for line in agg_file.read_text().splitlines()] if agg_file.is_file() else []
    return {"updates": rows, "he_aggregation": aggregation, "refused": refused}


PRIVACY_KEYS = (DP_EPSILON_SPENT, DP_DELTA, DP_WITHHELD)


def _carried_as(update: dict) -> str:
    """How an update crossed the wire, in the words of the privacy guide."""
    if update.get("encrypted"):
        return "ciphertext"
    return "masked (secure aggregation)" if update.get("masked") else "plaintext"


def _site_notes(ws: Path) -> dict[str, list[str]]:
    """Each site's notes for the admin (its reasons, paths redacted at the site), from the server's audit."""
    out: dict[str, list[str]] = {}
    path = ws / AUDIT_FILE
    for line in (path.read_text().splitlines() if path.is_file() else []):
        e = json.loads(line)
        for note in e.get("notes") or []:
            if note not in out.setdefault(e.get("site"), []):
                out[e.get("site")].append(note)
    return out


def _why_no_value(entry: dict, notes: list[str] | None = None) -> str:
    """Why a site has no final value, from what it reported and the notes it sent (paths redacted)."""
    rounds = entry.get("rounds", [])
    if any(r.get(SITE_ERROR) for r in rounds):
        said = "; ".join(n for n in (notes or []) if n.startswith("cannot use its data"))
        return f"site error: {said}" if said else "site error: its data could not be used (the reason is in the site's job log)"
    withheld = next((r.get(DP_WITHHELD) for r in reversed(rounds) if r.get(DP_WITHHELD)), None)
    if withheld:
        return f"updates withheld: {DP_WITHHELD_REASONS.get(int(withheld), 'withheld')}"
    return ("no validation value reported (a site sends none with fewer validation cases than its "
            "min_validation_cases, default 5, or with share_metrics minimal)")


def _unpublished(ws: Path) -> list[dict]:
    """Rounds the server did not publish (fewer trained sites than min_trained_sites), from its round record."""
    path = ws / ROUND_FILE
    if not path.is_file():
        return []
    rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"round": r["round"], "why": r.get("why_unpublished", "")} for r in rounds if r.get("published") is False]


def _guard(ws: Path) -> dict:
    """The server's update guard and aggregation, per round (update_guard.jsonl): who was refused and why,
    and the sites flagged (refused guard_flag_after rounds in a row). Empty when the job had no guard file
    (encrypted and SCAFFOLD jobs are not screened)."""
    path = ws / GUARD_FILE
    if not path.is_file():
        return {}
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line))
        except ValueError:
            continue
    refusals = [{"round": r.get("round"), "site": site, "reason": reason}
                for r in rounds for site, reason in sorted((r.get("refused") or {}).items())]
    flagged: dict[str, int] = {}
    for r in rounds:
        for site in r.get("flagged") or []:
            flagged.setdefault(site, r.get("round"))
    return {"method": rounds[-1].get("method") if rounds else None, "guard": rounds[-1].get("guard") if rounds else None,
            "rounds": rounds, "refusals": refusals, "flagged": flagged}


def _guard_markdown(guard: dict) -> list[str]:
    if not guard:
        return []
    lines = ["## Update guard and aggregation", "",
             f"Aggregation **{guard['method']}**, update guard **{'on' if guard['guard'] else 'off'}** "
             f"(server's `{GUARD_FILE}`).", ""]
    if guard["refusals"]:
        lines += ["| round | site | refused because |", "|---|---|---|"]
        lines += [f"| {r['round']} | {r['site']} | {r['reason']} |" for r in guard["refusals"]]
    else:
        lines.append("No update was refused.")
    lines.append("")
    for site, rnd in sorted(guard["flagged"].items()):
        lines.append(f"- ⚑ **{site} flagged** in round {rnd}: refused in consecutive rounds up to the limit "
                     "(guard_flag_after); ask that hospital what changed")
    return lines + [""]


def _privacy(sites: dict) -> dict:
    """Per site: epsilon spent after each round (all jobs on its data so far) and the rounds it withheld."""
    out = {}
    for name, e in sites.items():
        rounds = e["rounds"]
        if not any(r.get(k) is not None for r in rounds for k in PRIVACY_KEYS):
            continue
        withheld = [{"round": r["round"], "reason": DP_WITHHELD_REASONS.get(int(r[DP_WITHHELD]), "?")}
                    for r in rounds if r.get(DP_WITHHELD)]
        spent = [r.get(DP_EPSILON_SPENT) for r in rounds if r.get(DP_EPSILON_SPENT) is not None]
        out[name] = {"epsilon": {r["round"]: r.get(DP_EPSILON_SPENT) for r in rounds},
                     "final_epsilon": spent[-1] if spent else None,
                     "delta": next((r[DP_DELTA] for r in reversed(rounds) if r.get(DP_DELTA) is not None), None),
                     "withheld": withheld}
    return out


def _privacy_markdown(privacy: dict) -> list[str]:
    if not privacy:
        return []
    names = sorted(privacy)
    rounds = sorted({r for p in privacy.values() for r in p["epsilon"]})
    lines = ["## Differential privacy", "",
             "Epsilon each site's data has spent after each round, over every job on that data so far (the site's "
             "ledger), at the delta shown. Sites stop sending updates before their budget would be exceeded.", "",
             "| round | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rounds:
        lines.append(f"| {r} | " + " | ".join(_fmt(privacy[n]["epsilon"].get(r)) for n in names) + " |")
    lines.append("| delta | " + " | ".join(f"{privacy[n]['delta']:.1e}" if privacy[n]["delta"] else "–" for n in names)
                 + " |")
    lines.append("")
    for n in names:
        for w in privacy[n]["withheld"]:
            lines.append(f"- {n} withheld its update in round {w['round']}: {w['reason']} (zero weight)")
    return lines + [""]


def _mean(values):
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.mean(vals) if vals else None


def _fmt(v) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "∞"  # e.g. epsilon after a release without DP
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """Primary metric per round per site with the global curve; final metrics by site; wall time per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    spec = TASKS[report["task"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], spec["curve"], spec["curve_label"]), (axes[1], spec["primary"], spec["primary_label"])):
        for site, e in sorted(report["sites"].items()):
            xs = [r["round"] for r in e["rounds"]]
            ax.plot(xs, [r.get(key) for r in e["rounds"]], marker="o", label=site)
        g = report["global"]
        ax.plot([r["round"] for r in g], [r.get(key) for r in g], "k--", lw=2, label="global (weighted)")
        finals = [(len(e["rounds"]), e["final"].get(key)) for e in report["sites"].values() if e["final_source"] == "final global model"]
        if finals:
            ax.scatter([f[0] for f in finals], [f[1] for f in finals], marker="*", s=120, c="k", zorder=5, label="final model")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (global model received)")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Validation of the global model at each site, per round")
    fig.tight_layout()
    paths.append(out_dir / "metrics_per_round.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    site_names = sorted(report["sites"])
    shown = [m for m in spec["metrics"] if m[0] != "val_dice" and not m[0].startswith("val_hd95")]  # scores in [0, 1]
    width = 0.8 / len(shown)
    for i, (key, label) in enumerate(shown):
        vals = [report["sites"][s]["final"].get(key) or 0.0 for s in site_names]
        ax.bar([x + (i - (len(shown) - 1) / 2) * width for x in range(len(site_names))], vals, width, label=label)
    ax.set_xticks(range(len(site_names)), [s + (" ⚑" if report["sites"][s]["flagged"] else "") for s in site_names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice" if report["task"] == "segmentation" else "score")
    ax.set_title("Final global model at each site")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "final_by_site.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if report["round_seconds"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["round"] for r in report["round_seconds"]], [r["seconds"] for r in report["round_seconds"]])
        ax.set_xlabel("round")
        ax.set_ylabel("wall time (s)")
        ax.set_title("Wall time per round (server)")
        fig.tight_layout()
        paths.append(out_dir / "round_time.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def render_markdown(report: dict, plots: list[Path], extra: dict | None = None) -> str:
    metrics, primary, plabel = report["metrics"], report["primary"], report["primary_label"]
    lines = [
        f"# fedbrain report — {report['job_name'] or 'job'} `{report['job_id']}`",
        "",
        f"Status **{report['status']}**, {report['rounds']} rounds, duration {report['duration'] or 'n/a'}"
        + (" (span of the server log)" if report.get("duration_source") == "server log" else "") + ".",
        "",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    if extra:
        lines.append("")
    lines += [*_start_markdown(report.get("start_model")), ""]
    cols = [label for _, label in metrics]
    lines += [
        "## Per site",
        "",
        f"| site | train | val | skipped | {plabel} round 0 | " + " | ".join(cols) + " | flag |",
        "|---|---|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for site, e in sorted(report["sites"].items()):
        f = e["final"]
        lines.append(
            f"| {site} | {e.get('n_train', '–')} | {e.get('n_val', '–')} | {e.get('n_skipped', '–')} | "
            f"{_fmt(e['first'].get(primary))} | " + " | ".join(_fmt(f.get(k)) for k, _ in metrics) + f" | {e['flag_reason'] or ''} |"
        )
    s = report["summary"]
    source = next(iter(report["sites"].values()))["final_source"] if report["sites"] else ""
    lines += [
        "",
        f"Final columns: the {source} on each site's validation cases.",
        f"Mean final {plabel} **{_fmt(s['mean_final'])}**, minimum site **{_fmt(s['min_final'])}** ({s['min_site'] or '–'}).",
        *[f"- **{site}: no value** ({why})." for site, why in s.get("sites_without_value", {}).items()],
        *[f"- **{r['site']} refused round {r['round']}**: {r['reason']}" for r in report.get("exchange", {}).get("refused", [])],
        *[f"- **Round {r['round']} not published**: {r['why']}." for r in report.get("unpublished", [])],
        *[f"- {site} says: {note}" for site, ns in sorted(report.get("site_notes", {}).items()) for note in ns],
        f"Flagged sites (more than {FLAG_SD:g} SD below the other sites' mean {plabel}): {', '.join(s['flagged_sites']) or 'none'}.",
        *([f"Convergence score **{_fmt(report['convergence']['score'])}**: area under the global "
           f"{report['convergence']['label']} curve over the job's wall time, divided by that time (FeTS-style; higher: "
           f"good sooner)."] if (report.get("convergence") or {}).get("score") is not None else []),
        "",
        "## Global model per round (weighted mean of the sites)",
        "",
        "| round | " + " | ".join(cols) + " | wall time (s) |",
        "|---|" + "---|" * len(cols) + "---|",
    ]
    secs = {r["round"]: r["seconds"] for r in report["round_seconds"]}
    for g in report["global"]:
        lines.append(f"| {g['round']} | " + " | ".join(_fmt(g.get(k)) for k, _ in metrics) + f" | {_fmt(secs.get(g['round']))} |")
    lines += ["", f"Best global model: `{report['best_model'] or 'not saved'}`", ""]
    updates = report.get("exchange", {}).get("updates", [])
    if updates:
        lines += ["## What the server received", "",
                  "From the server's audit (`received_updates.jsonl`): size on the wire and what it crossed as (plaintext, CKKS ciphertext, or masked);"
                  " with `--he`, the site's encryption and decryption seconds.", "",
                  "| round | site | tensors | MB | as | encrypt s | decrypt s |", "|---|---|---|---|---|---|---|"]
        for u in sorted(updates, key=lambda u: (u["round"] or 0, u["site"] or "")):
            lines.append(f"| {u['round']} | {u['site']} | {u['tensors']} | {_fmt((u['bytes'] or 0) / 1e6)} | "
                         f"{_carried_as(u)} | {_fmt(u['encrypt_s'])} | {_fmt(u['decrypt_s'])} |")
        lines.append("")
    lines += _privacy_markdown(report.get("privacy", {}))
    lines += _guard_markdown(report.get("guard", {}))
    for a in report.get("exchange", {}).get("he_aggregation", []):
        lines.append(f"- round {a.get('round')}: the server added {a.get('updates')} encrypted updates in "
                     f"{_fmt(a.get('add_seconds'))} s and took their weighted mean in {_fmt(a.get('mean_seconds'))} s")
    lines.append("")
    for p in plots:
        lines.append(f"![{p.stem}]({p.name})")
    return "\n".join(lines) + "\n"


def write_report(result_dir: Path, out_dir: Path | None = None, extra: dict | None = None) -> dict:
    """Build, plot and write report.json + report.md; returns the report dict."""
    report = build_report(result_dir)
    out_dir = Path(out_dir) if out_dir else Path(result_dir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    if extra:
        report["run"] = extra
    plots = plot_report(report, out_dir)
    report["plots"] = [str(p) for p in plots]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(render_markdown(report, plots, extra))
    return report


def print_site_table(report: dict, console=None) -> None:
    from rich.table import Table

    console = console or terminal.console()
    metrics, primary = report["metrics"], report["primary"]
    table = Table(title=f"{report['job_name']} {report['job_id'][:8]} — {report['status']}, duration {report.get('duration') or 'n/a'}")
    table.add_column("site", no_wrap=True)
    for col in ("train", "val", "skip", "r0", *(label for _, label in metrics)):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("flag")
    for site, e in sorted(report["sites"].items()):
        f = e["final"]
        table.add_row(
            site, str(e.get("n_train", "–")), str(e.get("n_val", "–")), str(e.get("n_skipped", "–")),
            _fmt(e["first"].get(primary)), *(_fmt(f.get(k)) for k, _ in metrics),
            "⚑ " + e["flag_reason"] if e["flagged"] else "",
        )
    console.print(table)
    s = report["summary"]
    console.print(f"{report['primary_label']} of the final model: mean {_fmt(s['mean_final'])}, "
                  f"minimum site {_fmt(s['min_final'])} ({s['min_site'] or '–'}); r0 = round 0 (untrained)")
    conv = report.get("convergence") or {}
    if conv.get("score") is not None:
        console.print(f"convergence score {_fmt(conv['score'])}: area under the global {conv['label']} curve over the "
                      f"job's wall time, divided by that time (higher: good sooner)", highlight=False)
    for site, why in s.get("sites_without_value", {}).items():
        console.print(f"{site}: no value ({why})", highlight=False)
    for r in report.get("exchange", {}).get("refused", []):
        console.print(f"{r['site']} refused round {r['round']}: {r['reason']}", highlight=False)
    for r in report.get("unpublished", []):
        console.print(f"round {r['round']} not published: {r['why']}", highlight=False)
    for site, ns in sorted(report.get("site_notes", {}).items()):
        for note in ns:
            console.print(f"{site} says: {note}", highlight=False)
    guard = report.get("guard") or {}
    for r in guard.get("refusals", []):
        console.print(f"update guard: round {r['round']}: refused {r['site']}: {r['reason']}")
    for site, rnd in sorted(guard.get("flagged", {}).items()):
        console.print(f"[bold red]⚑ {site} flagged by the update guard in round {rnd}[/] (refused in consecutive rounds)")
    for site, p in sorted(report.get("privacy", {}).items()):
        stops = ", ".join(f"round {w['round']}: {w['reason']}" for w in p["withheld"])
        console.print(f"{site}: epsilon spent {_fmt(p['final_epsilon'])} at delta {p['delta'] or float('nan'):.1e}"
                      + (f"; withheld {stops}" if stops else ""))
