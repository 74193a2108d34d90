"""Benchmark rows of differential privacy (issue 9).

* DP-SGD step time / plain step time for both models at the task configs' defaults (batch and
  input size), on random inputs: forward, backward and optimizer step, data loading excluded.
* Utility at epsilon in {1, 3, 8, inf}: one synthetic site of ``cases`` patients trained
  with the task's loop for ``epochs`` (noise calibrated to spend epsilon over exactly those
  epochs), then scored once on its validation cases, as a ratio to the same run without DP. One
  site with n patients is what sample-level DP depends on: the n is in the row.
"""

from __future__ import annotations

import json

import time
from pathlib import Path

import torch

EPSILONS = (None, 8.0, 3.0, 1.0)  # None: no DP (first: the reference)
#: Per task: cases of the one site (3/4 train), epochs and batch of the utility rows (sized for 2 CPU
#: cores). The batch is larger than the task's default for every arm, DP or not: DP-SGD's noise is
#: added to the batch's sum, so its signal-to-noise grows with the batch at the same epsilon. ``lr``
#: None: the task's default; the classifier at batch 64 needs 1e-3 (at 3e-4 its 60 steps left even the
#: non-DP arm at chance).
UTILITY = {"classification": {"cases": 400, "epochs": 12, "batch_size": 64, "lr": 1e-3},
           "segmentation": {"cases": 120, "epochs": 6, "batch_size": 4, "lr": None}}


#: Printed under the table: how to read the DP rows.
NOTES = [
    "How to read these rows: step times are medians of steps run interleaved (plain, DP model without DP-SGD,",
    "DP-SGD, DP-SGD with Opacus' hooks, in turn) on random inputs of the task's default size (batch 2 / 4) on a",
    "2-core machine. DP-SGD takes each case's gradient with torch.func's vmap (the product's way when a",
    "convolution trains); Opacus' hooks, the way until 2026-12-07, unfold every input patch of a 3D convolution",
    "(2.8x / 3.9x on a quiet machine on 2026-12-01, 2.3x / 2.9x at load 7-8).",
    "Utility rows: one site of 300 (classification) or 90 (segmentation) training cases, centralized with the",
    "task's loop, noise calibrated to spend exactly epsilon over the arm's epochs, every arm at the same batch.",
    "At every epsilon <= 8 both models stay where they started (balanced accuracy at chance, Dice ~0.04): the",
    "noise on each step's mean gradient (noise x clip / batch, in each of ~0.6 M (classifier) or ~1.2 M",
    "(UNet) coordinates) swamps the signal of 4-64 clipped per-patient gradients. Tried on the classifier",
    "(2026-11-30/12-01, all at chance at epsilon 8): batch 16 and 64, AdamW, and SGD with momentum at lr 0.1",
    "(lr 0.5 diverged). Sample-level DP at these sizes buys a guarantee, not a model; it needs thousands of patients",
    "per site, or a model pretrained on public data with only a small part trained under DP (not built).",
    "Demo rows are `fedbrain demo` as shipped (6-22 training cases per site) with and without `--dp-epsilon 8`: "
    "with DP both tasks fine-tune the public start; without DP the classify demo fine-tunes it too, the "
    "segmentation demo trains from random weights.",
]


def _stepper(config, loss_fn, per_sample: str | None, part: str | None = None):
    """One training step of ``config``'s network on a given batch: plain (``per_sample`` None), or DP-SGD
    with per-sample gradients the product's way for what trains (``auto``), by ``vmap`` or by Opacus' ``hooks``; with
    ``part``, only that part of the network trains (the rest frozen, as under ``dp_part``)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedbrain.privacy.dpsgd import Stateless, default_per_sample_mode, per_sample_gradients
    from fedbrain.tasks.loop import apply_trainable_part

    model = config.build_model()
    if part is not None:
        apply_trainable_part(model, config.replace(dp_noise_multiplier=1.0, dp_part=part))
    if per_sample == "auto":
        per_sample = default_per_sample_mode(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    net = model
    if per_sample is not None:
        net = GradSampleModule(model) if per_sample == "hooks" else Stateless(model)
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=config.batch_size)

    def step(inputs, target) -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if per_sample == "vmap":
            batch = {"target": target, **{f"in{i}": x for i, x in enumerate(inputs)}}
            grads, _ = per_sample_gradients(
                lambda b: {"loss": loss_fn(net(*(b[f"in{i}"] for i in range(len(inputs)))), b["target"])}, net, batch)
            for name, p in model.named_parameters():
                if name in grads:
                    p.grad_sample = grads[name]
        else:
            loss_fn(net(*inputs), target).backward()
        opt.step()
        return time.perf_counter() - t

    return step


def bench_step_time(steps: int = 10, threads: int = 2) -> dict:
    """Median step seconds of the plain model, the DP model (segmentation: LeakyReLU) without and with
    DP-SGD (per-sample gradients the product's way, and by Opacus' hooks), measured interleaved (one step
    of each in turn): shared machines drift."""
    from monai.losses import DiceFocalLoss

    from fedbrain.tasks.classification import ClassificationConfig
    from fedbrain.tasks.segmentation import SegmentationConfig

    torch.set_num_threads(threads)
    out = {}
    seg = SegmentationConfig()
    seg_batch = lambda: ((torch.randn(seg.batch_size, 4, *seg.roi_size),),  # noqa: E731
                         (torch.rand(seg.batch_size, 3, *seg.roi_size) > 0.9).float())
    cls = ClassificationConfig()
    b, size = cls.batch_size, cls.spatial_size
    cls_batch = lambda: ((torch.randn(b, 4, *size), torch.randn(b, 2, *size), torch.ones(b), torch.ones(b)),  # noqa: E731
                         torch.randint(0, 3, (b,)))
    for name, config, batch, loss in (("segmentation", seg, seg_batch, DiceFocalLoss(sigmoid=True)),
                                      ("classification", cls, cls_batch, torch.nn.CrossEntropyLoss())):
        dp_config = config.replace(dp_noise_multiplier=1.0)  # the DP model spec (segmentation: LeakyReLU)
        arms = {"plain_s": _stepper(config, loss, None), "plain_dp_model_s": _stepper(dp_config, loss, None),
                "dp_s": _stepper(dp_config, loss, "auto"), "dp_hooks_s": _stepper(dp_config, loss, "hooks")}
        times = {k: [] for k in arms}
        for i in range(steps + 3):  # three warm-up rounds (first steps build kernels: seconds)
            inputs, target = batch()
            for k, step in arms.items():
                seconds = step(inputs, target)
                if i >= 3:
                    times[k].append(seconds)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        out[name] = {**med, "ratio": med["dp_s"] / med["plain_s"], "batch_size": config.batch_size}
    return out


def bench_utility(work: Path, task: str, cases: int, epochs: int, batch_size: int, lr: float | None = None,
                  seed: int = 0, epsilons=EPSILONS, delta: float = 1e-5, console=None) -> dict:
    """Centralized training of one synthetic site at each epsilon (see the module docstring)."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.privacy.dpsgd import DPSGD
    from fedbrain.synthetic.cohort import synthesize_consortium

    if task == "classification":
        from fedbrain.tasks.classification import ClassificationConfig as Config
        from fedbrain.tasks.classification import ClassificationTrainer as Trainer
        metric = "val_bacc"
        base = Config(algorithm="fedavg", seed=seed, num_threads=2, batch_size=batch_size)
    else:
        from fedbrain.tasks.segmentation import SegmentationConfig as Config
        from fedbrain.tasks.segmentation import SegmentationTrainer as Trainer
        metric = "val_dice_wt"
        base = Config(seed=seed, num_threads=2, batch_size=batch_size)
    if lr is not None:
        base = base.replace(lr=lr)
    data = Path(work) / f"dp_{task}_{cases}_{seed}"
    if not (data / "hospital-a" / "datalist.json").exists():
        synthesize_consortium(data, sites=1, cases=cases, seed=seed, site_names=["hospital-a"], progress=False)
    lists = load_datalist(data / "hospital-a" / "datalist.json")
    arms = {}
    for eps in epsilons:
        config = base.replace(dp_epsilon=eps, dp_delta=delta) if eps is not None else base
        trainer = Trainer(lists["training"], lists["validation"], config)
        if eps is not None:
            DPSGD.attach(trainer, planned_steps=epochs * trainer.round_steps(epochs=1))
        start = time.time()
        model = trainer.build_model()
        last = {**trainer.train(model, epochs=epochs), **trainer.validate(model)}
        if console is not None:
            console.print(f"{task} epsilon {eps}: {metric} {last.get(metric)} in {time.time() - start:.0f} s")
        arms["inf" if eps is None else f"{eps:g}"] = {
            metric: last.get(metric), "epsilon_spent": last.get("dp_epsilon_spent"),
            "noise_multiplier": last.get("dp_noise_multiplier"), "seconds": time.time() - start}
    plain = arms["inf"][metric]
    for arm in arms.values():
        arm["ratio"] = arm[metric] / plain if plain else None
    return {"task": task, "metric": metric, "n_train": len(lists["training"]), "n_val": len(lists["validation"]),
            "epochs": epochs, "delta": delta, "batch_size": base.batch_size, "lr": base.lr, "arms": arms}


#: Issue 26's demo goal: under DP at epsilon 8, every site at least this (segmentation WT Dice, classifier
#: balanced accuracy).
DEMO_SITE_FLOOR = {"segmentation": 0.70, "classification": 0.60}


def summarize_demo(report: dict) -> dict:
    """A demo report's primary metric (mean and minimum site), cases and epsilon per site."""
    privacy = report.get("privacy", {})
    return {"primary": report["primary"], "mean_final": report["summary"]["mean_final"],
            "min_final": report["summary"]["min_final"],
            "n_train": {s: e.get("n_train") for s, e in report["sites"].items()},
            "epsilon": {s: p["final_epsilon"] for s, p in privacy.items()},
            "delta": {s: p["delta"] for s, p in privacy.items()},
            "start": (report.get("start_model") or {}).get("sha256"),
            "batch_size": json.loads(report.get("run", {}).get("settings", "{}")).get("task", {}).get("batch_size")}


def bench_demo_scale(runs: Path, epsilon: float = 8.0, console=None,
                     tasks=("segmentation", "classification")) -> dict:
    """`fedbrain demo` with and without DP-SGD at ``epsilon``, for ``tasks``: what its small sites get."""
    from fedbrain.demo import ClassifyDemoSettings, DemoSettings, run_demo, with_dp_batch

    out = {}
    for task, settings_cls in (("segmentation", DemoSettings), ("classification", ClassifyDemoSettings)):
        if task not in tasks:
            continue
        arms = {}
        for eps in (None, epsilon):
            settings = settings_cls()
            settings.task = with_dp_batch(settings.task.replace(dp_epsilon=eps))  # as `fedbrain demo --dp-epsilon`
            arms["inf" if eps is None else f"{eps:g}"] = summarize_demo(run_demo(runs, settings, console=console))
        out[task] = arms
    return out


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Benchmark table rows (what, measured, goal, detail) from this module's results."""
    out = []
    for name, s in (r.get("step_time") or {}).items():
        out.append((f"DP-SGD step / plain step, {name} (batch {s['batch_size']}, same DP model)",
                    f"{s['dp_s'] / s['plain_dp_model_s']:.2f}", "<= 2.0",
                    f"{s['dp_s']:.2f} s vs {s['plain_dp_model_s']:.2f} s; vs the non-DP model "
                    f"({'PReLU' if name == 'segmentation' else 'same'}): {s['ratio']:.2f}x"
                    + (f"; Opacus' hooks instead of vmap: {s['dp_hooks_s'] / s['plain_dp_model_s']:.2f}x"
                       if "dp_hooks_s" in s else "")
                    + ("; met" if s['dp_s'] / s['plain_dp_model_s'] <= 2.0 else "; not met")))
    for u in r.get("utility", []):
        for eps, arm in u["arms"].items():
            if eps == "inf":
                continue
            out.append((f"{u['task']} {u['metric']} at epsilon {eps} / no DP (one site, n = {u['n_train']})",
                        f"{arm['ratio']:.3f}" if arm["ratio"] is not None else "–",
                        ">= 0.90" if float(eps) <= 8 else "",
                        f"{arm[u['metric']]:.3f} vs {u['arms']['inf'][u['metric']]:.3f}; noise {arm['noise_multiplier']:.2f}, "
                        f"spent {arm['epsilon_spent']:.2f} at delta {u['delta']:g}, {u['epochs']} epochs, batch {u['batch_size']}"
                        + (f", lr {u['lr']:g}" if u.get("lr") else "")))
    for task, arms in (r.get("demo_scale") or {}).items():
        plain = arms["inf"]
        for eps, arm in arms.items():
            if eps == "inf":
                continue
            ratio = arm["mean_final"] / plain["mean_final"] if plain["mean_final"] else None
            n = ", ".join(f"{s} {n}" + (f" (no DP: {plain['n_train'].get(s)})" if plain["n_train"].get(s) != n else "")
                          for s, n in sorted(arm["n_train"].items()))
            spent = ", ".join(f"{e:.2f}" for _, e in sorted(arm["epsilon"].items()))
            out.append((f"`fedbrain demo` {task} {plain['primary']} at epsilon {eps} / no DP (training cases: {n})",
                        f"{ratio:.3f}" if ratio is not None else "–", ">= 0.90",
                        f"{arm['mean_final']:.3f} vs {plain['mean_final']:.3f} (mean of sites); epsilon spent {spent}"))
            floor = DEMO_SITE_FLOOR[task]
            out.append((f"`fedbrain demo` {task} at epsilon {eps}: worst site's {plain['primary']} (one run)",
                        f"{arm['min_final']:.3f}", f">= {floor:.2f}",
                        f"{'from the public start ' + arm['start'][:12] + ', ' if arm.get('start') else ''}"
                        f"batch {arm.get('batch_size', '?')}; {'met' if arm['min_final'] >= floor else 'not met'}"))
    return out
