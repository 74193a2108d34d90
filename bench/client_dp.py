"""Client-level DP (DP-FedAvg, issue 9): utility vs noise at 3 and 12 sites, and the epsilon it buys.

Each site clips its whole round update to L2 norm ``clip`` and adds N(0, (noise * clip)^2) to every
value: the product's own functions (:func:`fedbrain.privacy.client_dp.clip_update`,
:func:`~fedbrain.privacy.client_dp.add_gaussian_noise`, the RDP accountant of
:func:`fedbrain.privacy.accounting.epsilon_of`), exactly what the ``ClientLevelDP`` filter does
on the wire. The federation runs in process (FedAvg of the noisy differences, equal weights), with
a small model on a synthetic tabular task (a 3-class mixture with a site-dependent class mix), so
the rows isolate what client-level DP does to an aggregate; the product's networks have 10^5-10^6
values per update, which only makes the noise (per value) larger relative to the clipped signal.

The point the rows make: the server averages n noisy updates, so the noise on the mean has norm
about ``noise * clip * sqrt(d / n)`` against a signal of norm at most ``clip``. The epsilon bought
depends on the noise and rounds only (each site is released once per round), not on n.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TITLE = "Client-level DP (DP-FedAvg filter): utility vs noise at 3, 12 and 100 sites"


@dataclass
class ClientDPSettings:
    site_counts: tuple = (3, 12, 100)  # the issue asks 3 and 12; 100 shows where it starts to pay
    noises: tuple = (0.0, 0.3, 1.0, 3.0, 10.0)  # noise multiplier; 0: clip only (no epsilon)
    clip: float = 1.0
    rounds: int = 20
    local_epochs: int = 1
    per_site: int = 300  # training samples per site (test: a separate balanced set)
    features: int = 20
    hidden: int = 32
    lr: float = 0.1
    delta: float = 1e-5
    seeds: tuple = (0, 1, 2)


def _task(seed: int, n_sites: int, s: ClientDPSettings):
    """Per-site training sets with a Dirichlet(1) class mix, and one balanced test set (numpy)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.0, size=(3, s.features))

    def draw(labels):
        return (means[labels] + rng.normal(0, 1.6, size=(len(labels), s.features))).astype(np.float32), labels

    sites = [draw(rng.choice(3, size=s.per_site, p=rng.dirichlet(np.ones(3)))) for _ in range(n_sites)]
    return sites, draw(np.repeat(np.arange(3), 400))


def _model(s: ClientDPSettings, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(s.features, s.hidden), torch.nn.ReLU(), torch.nn.Linear(s.hidden, 3))


def _balanced_accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float(np.mean([np.mean(pred[y == c] == c) for c in range(3)]))


def federate(n_sites: int, noise: float, seed: int, s: ClientDPSettings) -> float:
    """Balanced accuracy of the final global model after ``s.rounds`` of clipped (+ noisy) FedAvg."""
    import copy

    import torch

    from fedbrain.privacy.client_dp import add_gaussian_noise, clip_update

    sites, (x_test, y_test) = _task(seed, n_sites, s)
    global_model = _model(s, seed)
    rng = np.random.default_rng(seed + 7919)
    for _ in range(s.rounds):
        before = {k: v.clone() for k, v in global_model.state_dict().items()}
        total = {k: torch.zeros_like(v) for k, v in before.items()}
        for x, y in sites:
            model = copy.deepcopy(global_model)
            opt = torch.optim.SGD(model.parameters(), lr=s.lr)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            for _ in range(s.local_epochs):
                for i in range(0, len(xt), 32):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xt[i:i + 32]), yt[i:i + 32]).backward()
                    opt.step()
            diff = {k: v - before[k] for k, v in model.state_dict().items()}
            diff, _ = clip_update(diff, s.clip)
            if noise > 0:
                diff = add_gaussian_noise(diff, noise * s.clip, rng)
            for k in total:
                total[k] += diff[k]
        global_model.load_state_dict({k: before[k] + total[k] / n_sites for k in before})
    return _balanced_accuracy(global_model, x_test, y_test)


def run(work: Path, console) -> dict:
    from rich.progress import Progress

    from fedbrain.privacy.accounting import epsilon_of

    s = ClientDPSettings()
    d = sum(p.numel() for p in _model(s, 0).parameters())
    arms = []
    with Progress(console=console) as progress:
        bar = progress.add_task("client-level DP", total=len(s.site_counts) * len(s.noises) * len(s.seeds))
        for n in s.site_counts:
            for noise in s.noises:
                accs = []
                for seed in s.seeds:
                    accs.append(federate(n, noise, seed, s))
                    progress.advance(bar)
                eps = epsilon_of([(noise, 1.0, s.rounds)], s.delta) if noise > 0 else None
                arms.append({"sites": n, "noise": noise, "bacc": accs, "mean_bacc": statistics.mean(accs),
                             "epsilon": eps, "noise_to_clip_on_mean": noise * (d / n) ** 0.5})
    return {"settings": {**asdict(s), "params": d}, "arms": arms}


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    s = r["settings"]
    ref = {a["sites"]: a["mean_bacc"] for a in r["arms"] if a["noise"] == 0}
    out = []
    for a in r["arms"]:
        if a["noise"] == 0:
            what, goal = f"{a['sites']} sites, clip only (no noise, no epsilon): balanced accuracy", ""
            detail = ", ".join(f"{v:.3f}" for v in a["bacc"]) + f" over seeds {s['seeds']}"
        else:
            eps = a["epsilon"]
            what = (f"{a['sites']} sites, noise {a['noise']:g} x clip (epsilon {eps:.1f} at delta {s['delta']:g} "
                    f"per site over {s['rounds']} rounds): balanced accuracy / clip only")
            goal = ""
            detail = (f"{a['mean_bacc']:.3f} vs {ref[a['sites']]:.3f} (seeds: " + ", ".join(f"{v:.3f}" for v in a["bacc"])
                      + f"); noise norm on the average ~{a['noise_to_clip_on_mean']:.1f} x clip")
        measured = f"{a['mean_bacc']:.3f}" if a["noise"] == 0 else f"{a['mean_bacc'] / ref[a['sites']]:.3f}"
        out.append((what, measured, goal, detail))
    return out


def notes(r: dict) -> list[str]:
    s = r["settings"]
    return [
        f"How to read these rows: a {s['features']}-{s['hidden']}-3 network ({s['params']} values per update), "
        f"{s['per_site']} samples per site with a Dirichlet(1) class mix per site, {s['rounds']} rounds of "
        f"{s['local_epochs']} local epoch, clip {s['clip']:g}; each update clipped and noised with the product's own "
        "functions, averaged in process (equal weights); balanced accuracy on a separate balanced test set, mean over "
        f"{len(s['seeds'])} seeds (3 classes: chance is 0.333). Epsilon is per site, for adding or removing that "
        "site's whole contribution, and does not depend on how many sites there are.",
        "",
        "When client-level DP is useful: it protects a *hospital's* participation as a whole, and the server averages "
        "n noisy updates, so the noise left on the average shrinks only as 1/sqrt(n). With 3 or 12 hospitals, the "
        "noise that buys a single-digit epsilon swamps the update (and fedbrain's networks send 10^5-10^6 values "
        "per update, these rows 771: the noise per value is the same, the signal per value far smaller); it becomes useful with hundreds to thousands of participants (the "
        "cross-device setting it was designed for). For a consortium of a few hospitals, sample-level DP (DP-SGD at "
        "each site, protecting each patient) with enough patients per site, or encrypted aggregation, is the "
        "meaningful control; the clip alone (no noise) still bounds any one site's influence.",
        "",
    ]
