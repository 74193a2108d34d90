"""The `fedbrain` command: data tools, centralized baseline, POC consortium, demo, reports."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console

console = Console()


def cmd_data_check(a) -> int:
    from fedbrain.data.check import run_data_check

    return run_data_check(a.datalist, root=a.root, console=console)


def cmd_data_synth(a) -> int:
    from fedbrain.data.synth import synthesize_consortium

    manifest = synthesize_consortium(a.out, sites=a.sites, cases=a.cases, seed=a.seed, spacing_mm=a.spacing,
                                     atypical=a.atypical)
    console.print(f"wrote {a.out}/manifest.json and one datalist per site:")
    for site in manifest.get("sites", []):
        name = site.get("name") if isinstance(site, dict) else site
        console.print(f"  {Path(a.out) / name / 'datalist.json'}")
    return 0


def _datalists(paths: list[str]) -> list[Path]:
    """Accept datalist files or folders (a synth output folder holds one datalist per site)."""
    out = []
    for p in map(Path, paths):
        out += sorted(p.glob("*/datalist.json")) if p.is_dir() else [p]
    if not out:
        raise SystemExit(f"no datalist found in {paths}")
    return out


def cmd_train(a) -> int:
    from fedbrain.data.datalist import load_datalist
    from fedbrain.training.segment import SegmentationConfig, train_central

    if not a.central:
        raise SystemExit("federated training runs as a FLARE job: use `fedbrain demo` or submit jobs/segmentation")
    train, val = [], []
    for dl in _datalists(a.datalists):
        cases = load_datalist(dl)
        train += cases["training"]
        val += cases["validation"]
    config = SegmentationConfig(arch=a.arch, init_filters=a.init_filters, lr=a.lr, seed=a.seed)
    history = train_central(train, val, config, epochs=a.epochs, log_dir=a.out, progress=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "history.json").write_text(json.dumps(history, indent=2))
    console.print(f"final: {history[-1] if history else 'no epoch'}; TensorBoard logs in {a.out}")
    return 0


def _poc(a):
    from fedbrain.poc.consortium import PocConsortium

    return PocConsortium(Path(a.run_dir))


def cmd_poc(a) -> int:
    poc = _poc(a)
    if a.action == "up":
        data = Path(a.data) if a.data else None
        if data is None:
            from fedbrain.data.synth import synthesize_consortium

            data = Path(a.run_dir) / "data"
            if not data.exists():
                synthesize_consortium(data, sites=len(poc.sites), cases=a.cases, seed=0, site_names=poc.sites)
        poc.up(data_dir=data)
        console.print(f"POC consortium up in {poc.run_dir}: server localhost, sites {', '.join(poc.sites)}")
        console.print(f"admin startup kit: {poc.kit(poc.admin)}  (user {poc.admin})")
        return 0
    if a.action == "status":
        st = poc.status()
        console.print_json(json.dumps(st))
        return 0 if st["running"] else 1
    if a.action == "down":
        poc.clean() if not a.keep else poc.stop()
        console.print(f"POC consortium in {poc.run_dir} stopped; no process left")
        return 0
    raise SystemExit(f"unknown action {a.action}")


def cmd_demo(a) -> int:
    from fedbrain.demo import ClassifyDemoSettings, DemoSettings, run_demo

    given = {k: v for k, v in (("cases", a.cases), ("rounds", a.rounds), ("local_epochs", a.local_epochs)) if v is not None}
    if a.task == "classify":
        settings = ClassifyDemoSettings(seed=a.seed, keep_workspace=a.keep, algorithm=a.algorithm, alpha=a.alpha,
                                        atypical=a.atypical, **given)
    else:
        settings = DemoSettings(seed=a.seed, keep_workspace=a.keep, **given)
    run_demo(Path(a.runs), settings, console=console)
    return 0


def cmd_report(a) -> int:
    from fedbrain.report.job_report import print_site_table, write_report

    out = Path(a.out) if a.out else Path(a.result) / "report"
    report = write_report(Path(a.result), out)
    print_site_table(report, console)
    console.print(f"wrote {out / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbrain", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="check or synthesize site data").add_subparsers(dest="data_cmd", required=True)
    c = data.add_parser("check", help="validate every case of a datalist; exit 1 if any problem")
    c.add_argument("datalist")
    c.add_argument("--root", default=None, help="data root (default: the datalist's folder)")
    c.set_defaults(func=cmd_data_check)
    s = data.add_parser("synth", help="write a synthetic multi-hospital BraTS-style consortium")
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--cases", type=int, default=12, help="mean cases per site (sites differ)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spacing", type=float, default=3.0, help="voxel size in mm (2-3)")
    s.add_argument("--atypical", type=float, default=0.0,
                   help="fraction of gliomas that look like the other grade on MRI (0: MRI grades every case)")
    s.set_defaults(func=cmd_data_synth)

    t = sub.add_parser("train", help="centralized baseline with the same data/model/loop code")
    t.add_argument("--central", action="store_true", required=True)
    t.add_argument("datalists", nargs="+", help="datalist files, or a synth output folder")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--arch", default="unet", choices=["unet", "segresnet"])
    t.add_argument("--init-filters", dest="init_filters", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/central")
    t.set_defaults(func=cmd_train)

    pc = sub.add_parser("poc", help="a POC consortium on this machine")
    pc.add_argument("action", choices=["up", "status", "down"])
    pc.add_argument("--run-dir", dest="run_dir", default="runs/poc")
    pc.add_argument("--data", default=None, help="synth output folder (default: generate into RUN_DIR/data)")
    pc.add_argument("--cases", type=int, default=12)
    pc.add_argument("--keep", action="store_true", help="down: keep the provisioned workspace")
    pc.set_defaults(func=cmd_poc)

    d = sub.add_parser("demo", help="main job end to end: data, POC, submit, watch, report, teardown")
    d.add_argument("--task", default="segment", choices=["segment", "classify"])
    d.add_argument("--runs", default="runs")
    d.add_argument("--cases", type=int, default=None, help="mean cases per hospital (default: 12 segment, 24 classify)")
    d.add_argument("--rounds", type=int, default=None)
    d.add_argument("--local-epochs", dest="local_epochs", type=int, default=None)
    d.add_argument("--algorithm", default="personal", choices=["personal", "fedavg", "fedprox", "scaffold"], help="classify only")
    d.add_argument("--alpha", type=float, default=0.5, help="classify only: Dirichlet label-skew alpha")
    d.add_argument("--atypical", type=float, default=0.2,
                   help="classify only: fraction of gliomas that look like the other grade on MRI")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--keep", action="store_true", help="keep the provisioned workspace after the run")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="render the per-site report of any downloaded job result")
    r.add_argument("result", help="downloaded job result folder")
    r.add_argument("--out", default=None)
    r.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    # FLARE's own INFO chatter (connections, cells) drowns the progress bar: keep it at WARNING.
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedbrain").setLevel(logging.DEBUG if a.verbose else logging.INFO)
    return a.func(a) or 0


if __name__ == "__main__":
    sys.exit(main())
