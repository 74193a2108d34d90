"""DP from a public start (issue 26): what a hospital's DP-SGD fine-tuning keeps of the non-private result.

One public start per task (``fedbrain.tasks.pretrain`` on the synthetic public cohort: other
scanners and protocol, mostly large HGG, no CT; nobody from a hospital), made once. Per seed, one
synthetic hospital (another cohort per seed) of ``n`` training cases, trained centrally with the
product's loop from that start:

* ``public``: the start alone, no hospital training;
* ``plain``: non-DP fine-tuning of the whole network (the reference);
* ``eps <e>``: DP-SGD on the task's declared part (``DP_PART_DEFAULT``), noise calibrated to spend
  exactly epsilon over its epochs; delta 1e-5.

Every arm: same epochs and batch, unless the task's spec gives DP its own (``dp_batch_size``, ``dp_epochs``). Step time: plain vs DP-SGD, the declared part trained in both and
the whole network in both, steps interleaved on the same random batch of the task's default size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TITLE = "DP from a public start: DP-SGD on a declared part vs non-DP fine-tuning"
METRIC = {"segmentation": "val_dice_wt", "classification": "val_bacc"}


@dataclass
class DPStartSettings:
    seeds: tuple = (0, 1, 2)
    epsilons: tuple = (8.0,)  # every seed
    #: the curve's other epsilons (per task), on the first seed only (2 cores: each DP arm costs minutes)
    curve_epsilons: dict = field(default_factory=lambda: {"segmentation": (3.0, 1.0), "classification": ()})
    delta: float = 1e-5
    #: per task: hospital sizes (training cases), epochs, batch, lr (None: the task's) of every arm
    tasks: dict = field(default_factory=lambda: {
        # DP arms at batch 16: the noise is added to a batch's sum, so a larger batch at the same epsilon
        # has more signal per step (measured at epsilon 8: WT 0.756 at batch 16 vs 0.734 at 4, 2026-12-07)
        # eight seeds: each seed is another hospital, and how far a hospital sits from the public data varies
        # (the start-alone gap per hospital spread 0.05-0.33 over the first five)
        "segmentation": {"n_train": (100,), "epochs": 6, "batch_size": 4, "dp_batch_size": 16, "lr": None,
                         "seeds": (0, 1, 2, 3, 4, 5, 6, 7)},
        # DP arms train 4x the epochs: at the same epsilon, more and noisier steps learned more (seeds 0-2 at
        # n = 100, balanced accuracy mean 0.924 at 12 epochs, 0.943 at 24, 0.951 at 48; 2026-12-07); non-DP
        # fine-tuning is at 0.98-1.0 after 12. Eight hospitals at n = 100 (a seed takes a minute), three at 300.
        "classification": {"n_train": (100, 300), "epochs": 12, "dp_epochs": 48, "batch_size": 64,
                           "dp_batch_size": 64, "lr": 1e-3, "seeds": {100: (0, 1, 2, 3, 4, 5, 6, 7), 300: (0, 1, 2)}},
    })
    steps_timed: int = 30  # paired rounds per process
    #: processes the step times are measured in, one after the other: the ratio's interval is over them (one
    #: process's 30 paired steps gave intervals of +-0.02 while three processes of the same commit on the same
    #: machine gave 1.27, 1.41 and 1.48 for the decoder, 2026-12-07)
    timing_processes: int = 3


def _interval(values):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from classify import interval  # the classifier benchmark's 95% interval (t distribution)

    return interval(values)


def _classes(task: str):
    if task == "classification":
        from fedbrain.tasks.classification import ClassificationConfig, ClassificationTrainer

        return ClassificationConfig, ClassificationTrainer
    from fedbrain.tasks.segmentation import SegmentationConfig, SegmentationTrainer

    return SegmentationConfig, SegmentationTrainer


def _base(task: str, spec: dict, seed: int):
    config_cls, _ = _classes(task)
    extra = {"algorithm": "fedavg"} if task == "classification" else {}
    base = config_cls(seed=seed, num_threads=2, batch_size=spec["batch_size"], **extra)
    return base.replace(lr=spec["lr"]) if spec["lr"] is not None else base


def public_start(work: Path, task: str, spec: dict, console):
    from fedbrain.tasks.pretrain import cached_start

    _, trainer_cls = _classes(task)
    t = time.time()
    start = cached_start(work / "dp_start" / "public-start", _base(task, spec, 0), trainer_cls, console=console)
    console.print(f"  {task} public start {start.sha256[:12]} ({time.time() - t:.0f} s): {start.record['public_validation']}")
    return start


def hospital(work: Path, n_train: int, seed: int) -> dict:
    """One synthetic hospital with about ``n_train`` training cases (a quarter more for validation)."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.synthetic.cohort import synthesize_consortium

    data = work / "dp_start" / f"hospital-{n_train}-seed{seed}"
    if not (data / "hospital-a" / "datalist.json").exists():
        synthesize_consortium(data, sites=1, cases=round(n_train / 0.75), seed=100 + seed, site_names=["hospital-a"],
                              progress=False)
    return load_datalist(data / "hospital-a" / "datalist.json")


def one_arm(task: str, spec: dict, lists: dict, start, seed: int, epsilon: float | None, delta: float,
            train: bool = True) -> dict:
    from fedbrain.privacy.dpsgd import DPSGD

    _, trainer_cls = _classes(task)
    config = _base(task, spec, seed).replace(start_model=str(start.weights))
    epochs = spec["epochs"]
    if epsilon is not None:
        config = config.replace(dp_epsilon=epsilon, dp_delta=delta, batch_size=spec["dp_batch_size"])
        epochs = spec.get("dp_epochs", epochs)
    trainer = trainer_cls(lists["training"], lists["validation"], config)
    if epsilon is not None:
        DPSGD.attach(trainer, planned_steps=epochs * trainer.round_steps(epochs=1))
    model = trainer.build_model()
    t = time.time()
    out = trainer.train(model, epochs=epochs) if train else {}
    out.update(trainer.validate(model))
    keep = ("val_dice_wt", "val_dice", "val_hd95_wt", "val_bacc", "val_auc", "dp_epsilon_spent",
            "dp_noise_multiplier", "steps")
    clip = {"clip": config.dp_clip()} if epsilon is not None else {}
    return {**{k: out[k] for k in keep if k in out}, **clip, "epochs": epochs, "seconds": time.time() - t,
            "part": config.trained_part if epsilon is not None else "all", "batch_size": config.batch_size,
            "n_train": len(trainer.train_ds),
            "n_val": len(trainer.val_ds)}


def step_times(task: str, steps: int) -> dict:
    """Median step seconds: plain vs DP-SGD (per-sample gradients the product's way, vmap, and by Opacus' hooks)
    with the declared part trained, and with all of it (bench/dp.py's stepper, steps interleaved on one random
    batch of the task's default size)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dp import _stepper

    from fedbrain.privacy.dpsgd import PER_SAMPLE_MODES, default_per_sample_mode
    from fedbrain.tasks.loop import apply_trainable_part

    torch.set_num_threads(2)
    config_cls, _ = _classes(task)
    config = config_cls(dp_ready=True)
    g = torch.Generator().manual_seed(0)
    if task == "segmentation":
        from fedbrain.tasks.segmentation import _make_loss

        b = config.batch_size
        inputs = (torch.randn(b, 4, *config.roi_size, generator=g),)
        target = (torch.rand(b, 3, *config.roi_size, generator=g) > 0.9).float()
        loss_fn = _make_loss(config.loss)
    else:
        b, size = config.batch_size, config.spatial_size
        inputs = (torch.randn(b, 4, *size, generator=g), torch.randn(b, 2, *size, generator=g), torch.ones(b),
                  torch.ones(b))
        target = torch.randint(0, 3, (b,), generator=g)
        loss_fn = torch.nn.CrossEntropyLoss()
    part = config_cls.DP_PART_DEFAULT
    modes = {}
    arms = {}
    for scope, trained in (("part", part), ("all", None)):
        model = config.build_model()
        if trained is not None:
            apply_trainable_part(model, config.replace(dp_noise_multiplier=1.0, dp_part=trained))
        modes[scope] = default_per_sample_mode(model)  # the way the product takes for what trains
        arms[f"plain_{scope}_s"] = _stepper(config, loss_fn, None, trained)
        for mode in PER_SAMPLE_MODES:
            arms[f"dp_{scope}_{mode}_s"] = _stepper(config, loss_fn, mode, trained)
    times = {k: [] for k in arms}
    for i in range(steps + 2):  # two warm-up rounds
        for k, step in arms.items():
            seconds = step(inputs, target)
            if i >= 2:
                times[k].append(seconds)
    out = {**{k: statistics.median(v) for k, v in times.items()}, "part": part, "batch_size": b, "steps": steps}
    for scope, mode in modes.items():
        # each round's DP step over the plain step run just before it: a paired ratio, mean with a 95% interval
        paired = [d / p for d, p in zip(times[f"dp_{scope}_{mode}_s"], times[f"plain_{scope}_s"])]
        mean, lo, hi = _interval(paired)
        out.update({f"mode_{scope}": mode, f"dp_{scope}_s": out[f"dp_{scope}_{mode}_s"], f"ratio_{scope}": mean,
                    f"ratio_{scope}_interval": [lo, hi]})
    return out


def step_times_over_processes(task: str, steps: int, processes: int) -> dict:
    """:func:`step_times` in ``processes`` fresh processes, one after the other: each ratio is the mean of the
    processes' ratios with a 95% interval over processes (the run-to-run spread, which one process's paired
    steps do not show); the medians are the first process's, and ``runs`` keeps every process's result."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from dp_start import step_times; "
            "print(json.dumps(step_times(sys.argv[2], int(sys.argv[3]))))")
    runs = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), task, str(steps)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {**runs[0], "processes": processes, "runs": runs}
    for scope in ("part", "all"):
        mean, lo, hi = _interval([r[f"ratio_{scope}"] for r in runs])
        out.update({f"ratio_{scope}": mean, f"ratio_{scope}_interval": [lo, hi]})
    return out


def run(work: Path, console, settings: DPStartSettings | None = None) -> dict:
    """Every task of the settings, or those named in ``FEDBRAIN_BENCH_DP_START_TASKS`` (comma-separated; the
    other tasks keep what bench/results.json holds for them). With ``FEDBRAIN_BENCH_DP_START_STEP_TIMES_ONLY`` set,
    only the step times are measured again (minutes) and everything else is kept. With
    ``FEDBRAIN_BENCH_DP_START_RESUME`` set, a seed whose arms are all in bench/results.json is kept (a stopped run
    goes on where it stopped)."""
    import json
    import os
    from datetime import datetime, timezone

    s = settings or DPStartSettings()
    chosen = [t for t in os.environ.get("FEDBRAIN_BENCH_DP_START_TASKS", "").split(",") if t] or list(s.tasks)
    stored = Path(__file__).resolve().parent / "results.json"
    kept_all = json.loads(stored.read_text()).get("dp_start", {}) if stored.exists() else {}
    kept = kept_all.get("tasks", {})
    resume = bool(os.environ.get("FEDBRAIN_BENCH_DP_START_RESUME"))
    if os.environ.get("FEDBRAIN_BENCH_DP_START_STEP_TIMES_ONLY"):  # minutes: the rest is kept as measured
        from datetime import date

        out = {"measured_at": kept_all.get("measured_at"), "settings": {**kept_all.get("settings", {}),
                            "step_time_note": f"measured on their own on {date.today().isoformat()} "
                                              f"(bench/dp_start.py step_times, {s.timing_processes} processes of {s.steps_timed} "
                                              f"interleaved steps; each ratio is a mean over processes with its 95% "
                                              f"interval, met when "
                                              f"the interval's high end is within the goal)"},
               "tasks": {t: dict(v) for t, v in kept.items()}}
        for task in chosen:
            console.print(f"  {task}: step times")
            out["tasks"].setdefault(task, {})["step_time"] = step_times_over_processes(task, s.steps_timed,
                                                                                       s.timing_processes)
        return out
    # a task not measured now keeps its own time (the group's, for results written before tasks had one)
    out = {"settings": asdict(s), "tasks": {t: {"measured_at": kept_all.get("measured_at"), **v}
                                            for t, v in kept.items() if t not in chosen}}
    added = []  # with resume: what this run measured
    if resume:
        out["measured_at"] = kept_all.get("measured_at")
        out["settings"] = {**kept_all.get("settings", {}), **asdict(s)}
    for task, spec in s.tasks.items():
        if task not in chosen:
            continue
        start = public_start(work, task, spec, console)
        metric = METRIC[task]
        sizes = {}
        for n_train in spec["n_train"]:
            seeds = {}
            stored_seeds = kept.get(task, {}).get("sizes", {}).get(str(n_train), {}) if resume else {}
            task_seeds = spec.get("seeds", s.seeds)
            task_seeds = task_seeds.get(n_train, s.seeds) if isinstance(task_seeds, dict) else task_seeds
            for seed in task_seeds:
                extra = s.curve_epsilons.get(task, ()) if seed == task_seeds[0] else ()
                wanted = {"public", "plain", *(f"eps {eps:g}" for eps in (*s.epsilons, *extra))}
                if wanted <= set(stored_seeds.get(str(seed), {})):  # a stopped run's seed: kept as measured
                    seeds[str(seed)] = stored_seeds[str(seed)]
                    continue
                lists = hospital(work, n_train, seed)
                arms = {"public": one_arm(task, spec, lists, start, seed, None, s.delta, train=False),
                        "plain": one_arm(task, spec, lists, start, seed, None, s.delta)}
                for eps in (*s.epsilons, *extra):
                    arms[f"eps {eps:g}"] = one_arm(task, spec, lists, start, seed, eps, s.delta)
                seeds[str(seed)] = arms
                added.append(f"{task} n = {n_train} seed {seed}")
                console.print(f"  {task} n={n_train} seed {seed}: " + ", ".join(
                    f"{k} {v[metric]:.3f}" for k, v in arms.items()))
            sizes[str(n_train)] = seeds
        from fedbrain.privacy.clip import RECORD_KEY

        out["tasks"][task] = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "start": {**{k: start.record[k] for k in ("sha256", "epochs", "public_validation",
                                                                          "public_data", "n_train")},
                                        RECORD_KEY: start.record.get(RECORD_KEY)},
                              "sizes": sizes,
                              "step_time": step_times_over_processes(task, s.steps_timed, s.timing_processes)}
    if resume:
        from datetime import date

        when = date.today().isoformat()
        out["settings"]["note"] = "; ".join(filter(None, (
            out["settings"].get("note"), f"resumed on {when}, measuring {', '.join(added) or 'nothing'}")))
        out["settings"]["step_time_note"] = (f"measured again with the resumed run on {when} ({s.timing_processes} "
                                             f"processes of {s.steps_timed} interleaved steps; each ratio a mean over "
                                             f"processes with its 95% "
                                             f"interval)")
    return out


def _values(seeds: dict, arm: str, metric: str) -> list[float]:
    return [v[arm][metric] for v in seeds.values()]


def _ratios(seeds: dict, arm: str, metric: str) -> list[float]:
    return [v[arm][metric] / v["plain"][metric] for v in seeds.values()]


def _met(lo: float, goal: float) -> str:
    return "met" if lo >= goal else "not met"


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    out = []
    goals = {"segmentation": 0.90, "classification": 0.95}
    for task, t in r["tasks"].items():
        metric = METRIC[task]
        for n, seeds in t["sizes"].items():
            k = len(seeds)
            first = next(iter(seeds.values()))
            part = first["eps 8"]["part"] if "eps 8" in first else ""
            pub, plain = _interval(_values(seeds, "public", metric)), _interval(_values(seeds, "plain", metric))
            spread = f"; public [{pub[1]:.3f}, {pub[2]:.3f}], non-DP [{plain[1]:.3f}, {plain[2]:.3f}]" if k > 1 else ""
            gaps = [p - q for p, q in zip(_values(seeds, "plain", metric), _values(seeds, "public", metric))]
            gap = _interval(gaps) if k > 1 else (gaps[0], None, None)
            out.append((f"{task} {metric}: public start alone / non-DP fine-tuning ({k} seed{'s' if k > 1 else ''}, "
                        f"n = {first['plain']['n_train']})",
                        f"{pub[0]:.3f} vs {plain[0]:.3f}", "gap >= 0.05" if task == "segmentation" else "",
                        f"gap {gap[0]:+.3f}" + (f" [{gap[1]:+.3f}, {gap[2]:+.3f}] (per seed, paired)" if k > 1 else "")
                        + spread + (f"; {_met(gap[1] if k > 1 else gap[0], 0.05)}" if task == "segmentation" else "")))
            for arm in [a for a in first if a.startswith("eps ")]:
                having = {k: v for k, v in seeds.items() if arm in v}
                if len(having) < 2:  # a curve point of one seed: its value, no interval
                    v = next(iter(having.values()))
                    out.append((f"{task} {metric} at epsilon {arm.split()[1]} (DP on '{v[arm]['part']}') / non-DP "
                                f"fine-tuning (n = {v[arm]['n_train']}, one seed)",
                                f"{v[arm][metric] / v['plain'][metric]:.3f}", "",
                                f"{v[arm][metric]:.3f} vs {v['plain'][metric]:.3f}; spent {v[arm]['dp_epsilon_spent']:.2f}, "
                                f"batch {v[arm]['batch_size']}"))
                    continue
                mean, lo, hi = _interval(_ratios(seeds, arm, metric))
                eps = float(arm.split()[1])
                goal = goals[task] if eps <= 8 and arm == "eps 8" else None
                abs_mean = statistics.mean(_values(seeds, arm, metric))
                spent = max(v[arm]["dp_epsilon_spent"] for v in seeds.values())
                extra = ""
                if task == "classification" and "val_auc" in first[arm]:
                    auc = _interval([v[arm]["val_auc"] / v["plain"]["val_auc"] for v in seeds.values()])
                    extra = f"; AUROC ratio {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}]"
                out.append((f"{task} {metric} at epsilon {arm.split()[1]} (DP on '{part}') / non-DP fine-tuning "
                            f"(n = {first[arm]['n_train']}, {k} seeds)",
                            f"{mean:.3f} [{lo:.3f}, {hi:.3f}]", f">= {goal:.2f}" if goal else "",
                            f"{abs_mean:.3f} mean; spent <= {spent:.2f} at delta {r['settings']['delta']:g}, batch "
                            f"{first[arm]['batch_size']}" + (f", clip {first[arm]['clip']:g}" if "clip" in first[arm]
                                                             else "")
                            + (f", {first[arm]['epochs']} epochs (non-DP {first['plain']['epochs']})"
                               if first[arm].get("epochs", 0) != first["plain"].get("epochs", 0) else "") + extra
                            + (f"; {_met(lo, goal)}" if goal else "")))
        st = t.get("step_time")
        if not st:
            continue
        for scope, what, goal in (("part", f"declared part '{st['part']}' trained in both", 1.3),
                                  ("all", "whole network", 2.0)):
            ratio, interval = st[f"ratio_{scope}"], st.get(f"ratio_{scope}_interval")
            ways = (f"; per-sample gradients by {st[f'mode_{scope}']} (the product's way for this part); medians: "
                    f"vmap {st[f'dp_{scope}_vmap_s'] / st[f'plain_{scope}_s']:.2f}x, Opacus' hooks "
                    f"{st[f'dp_{scope}_hooks_s'] / st[f'plain_{scope}_s']:.2f}x") if f"mode_{scope}" in st else ""
            out.append((f"{task} DP-SGD step / plain step, {what}",
                        f"{ratio:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else f"{ratio:.2f}",
                        f"<= {goal}", f"{st[f'dp_{scope}_s']:.3f} s vs {st[f'plain_{scope}_s']:.3f} s (medians), batch "
                        f"{st['batch_size']}, " + (f"{st['processes']} processes of {st['steps']} paired steps (process ratios "
                        + ", ".join(f"{run[f'ratio_{scope}']:.2f}" for run in st["runs"]) + "; interval over processes)"
                        if st.get("processes") else f"{st['steps']} paired steps") + f"{ways}; "
                        f"{_met(-(interval[1] if interval else ratio), -goal)}"))
    return out


def notes(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        "How to read these rows: one public start per task, pretrained once on the synthetic public cohort (two "
        "public centres, other protocol and scanners, mostly large HGG, no CT; never a hospital's patients). Per seed "
        "a new synthetic hospital is fine-tuned centrally with the product's loop from that start; every arm has the "
        "same epochs and batch unless the row's detail says otherwise (DP arms' batch and epochs are the task's DP recipe); DP arms train only the task's declared part (the rest frozen at the start) with noise "
        f"calibrated to spend exactly epsilon over those epochs (delta {s['delta']:g}). Ratios are per seed (DP / non-DP "
        "of the same hospital), mean with a 95% interval (t); a goal is met only when the interval's low end clears it.",
    ]
    if s.get("note"):
        timed = all(t.get("step_time") for t in r["tasks"].values())
        lines.append(f"This run: {s['note']}; where rebuilt from the log, ε spent is the calibrated target, as the "
                     "log gives it. "
                     + (f"Step times: {s['step_time_note']}." if timed and s.get("step_time_note") else
                        "Step times: the whole-network DP-SGD rows of *Differential privacy* above; the declared "
                        "part's were not measured."))
    seg = r["tasks"].get("segmentation", {}).get("sizes", {})
    for n, seeds in seg.items():
        gaps = {k: v["plain"]["val_dice_wt"] - v["public"]["val_dice_wt"] for k, v in seeds.items()}
        close = [k for k, g in gaps.items() if g < 0.05]
        if close:
            lines.append(f"Caveat (segmentation, n = {n}): how far a hospital sits from the public data varies; at "
                         f"seed{'s' if len(close) > 1 else ''} {', '.join(close)} the start alone comes within "
                         f"{max(gaps[k] for k in close):.3f} Dice of non-DP fine-tuning, so there the ratio mostly "
                         "measures the start. Each task pretrains on its own public cohort "
                         "(fedbrain.synthetic.cohort.PUBLIC_ACQUISITION).")
    times = {task: t["measured_at"] for task, t in r["tasks"].items() if t.get("measured_at")}
    if len(set(times.values())) > 1:
        lines.append("Measured per task: " + "; ".join(f"{task} {when}" for task, when in times.items()) + ".")
    for task, t in r["tasks"].items():
        st = t["start"]
        norms = st.get("public_gradient_norms") or {}
        first = next(iter(next(iter(t["sizes"].values())).values()))
        dp = first.get("eps 8", {})
        clip = ""
        if dp.get("part") in norms:
            n = norms[dp["part"]]
            chosen = dp.get("clip") == n["clip"]
            clip = (f" DP-SGD clip {dp.get('clip', 1.0):g}" + (
                f", the start's median per-case gradient norm of '{dp['part']}' on {n['n_cases']} public validation "
                f"cases (10th-90th percentile {n['p10']:.2g}-{n['p90']:.2g}; fedbrain.privacy.clip)" if chosen else
                f" (the task keeps 1.0: its start's median per-case norm of '{dp['part']}' on public cases is "
                f"{n['median']:.2g}, which says nothing of a hospital's)") + ".")
        lines.append(f"{task} public start `{st['sha256'][:12]}`: {st['epochs']} epochs on {st['n_train']} public "
                     f"training cases; on its own public validation cases "
                     + ", ".join(f"{k} {v:.3f}" for k, v in st["public_validation"].items()
                                 if k in ("val_dice_wt", "val_bacc", "val_auc")) + "." + clip)
    return [*lines, ""]


def plot(r: dict, img_dir: Path) -> list[str]:
    """Utility vs epsilon per task (mean with the 95% interval), public alone and non-DP as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(r["tasks"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4))
    axes = [axes] if len(tasks) == 1 else list(axes)
    for ax, (task, t) in zip(axes, tasks):
        metric = METRIC[task]
        for n, seeds in t["sizes"].items():
            arms = [a for a in next(iter(seeds.values())) if a.startswith("eps ")]
            eps = [float(a.split()[1]) for a in arms]
            stats = [_interval(_values({k: v for k, v in seeds.items() if a in v}, a, metric)) for a in arms]
            low = [m - lo if lo == lo else 0.0 for m, lo, _ in stats]  # one seed: no interval
            high = [hi - m if hi == hi else 0.0 for m, _, hi in stats]
            ax.errorbar(eps, [m for m, _, _ in stats], yerr=[low, high],
                        marker="o", capsize=3, label=f"DP-SGD, n = {n}")
            ax.axhline(statistics.mean(_values(seeds, "plain", metric)), linestyle="--", color="grey")
            ax.axhline(statistics.mean(_values(seeds, "public", metric)), linestyle=":", color="black")
        ax.text(0.02, 0.02, "dashed: non-DP fine-tuning; dotted: public start alone", transform=ax.transAxes, fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "dp_start.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f"img/{path.name}"]
