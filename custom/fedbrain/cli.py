"""The `fedbrain` command: data tools, centralized baseline, POC consortium, demo, reports."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from fedbrain import terminal

console = terminal.console()


def cmd_data_check(a) -> int:
    """A datalist file, or a folder holding one per site (as `train --central` accepts)."""
    from fedbrain.data.check import run_data_check

    return max(run_data_check(dl, root=a.root, console=console) for dl in _datalists([a.datalist]))


def cmd_data_build(a) -> int:
    from fedbrain.data.build import run_build_datalist

    out = a.out or str(Path(a.folder) / "datalist.json")
    # Both BraTS namings are recognised file by file; a named layout fixes its label convention.
    convention = a.label_convention if a.label_convention != "auto" or a.layout == "auto" else a.layout
    return run_build_datalist(a.folder, out, console=console, val_fraction=a.val_fraction, seed=a.seed,
                              ct_dir=a.ct_dir, label_convention=convention)


def cmd_data_synth(a) -> int:
    from fedbrain.synthetic.cohort import synthesize_consortium

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


TASKS = {"segment": "segmentation", "classify": "classification"}


def _config(name: str):
    """A task's config class (no torch import: building the parser stays fast)."""
    if name == "classify":
        from fedbrain.tasks.classification_config import ClassificationConfig

        return ClassificationConfig
    from fedbrain.tasks.segmentation_config import SegmentationConfig

    return SegmentationConfig


def _trainer(name: str):
    if name == "classify":
        from fedbrain.tasks.classification import ClassificationTrainer

        return ClassificationTrainer
    from fedbrain.tasks.segmentation import SegmentationTrainer

    return SegmentationTrainer


def cmd_train(a) -> int:
    import torch

    from fedbrain.data.datalist import load_datalist
    from fedbrain.tasks.config import config_from_arguments
    from fedbrain.tasks.loop import train_central

    if not a.central:
        raise SystemExit("federated training runs as a FLARE job: use `fedbrain demo` or submit jobs/segmentation")
    if a.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, got {a.epochs}")
    config_cls, trainer_cls = _config(a.task), _trainer(a.task)
    train, val = [], []
    for dl in _datalists(a.datalists):
        cases = load_datalist(dl)
        train += cases["training"]
        val += cases["validation"]
    config = config_from_arguments(config_cls, a)
    trainer = trainer_cls(train, val, config, progress=True)
    if config.dp:  # noise calibrated to dp_epsilon over these epochs
        from fedbrain.privacy.dpsgd import DPSGD

        DPSGD.attach(trainer, planned_steps=a.epochs * trainer.round_steps(epochs=1))
    model = trainer.build_model()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    history = train_central(trainer, epochs=a.epochs, model=model, log_dir=a.out, progress=True,
                            best_path=out / "best_model.pt")
    (out / "history.json").write_text(json.dumps(history, indent=2))
    (out / "config.json").write_text(config.to_json() + "\n")
    torch.save(model.state_dict(), out / "model.pt")
    best = next((h["epoch"] for h in reversed(history) if h.get("best")), None)
    console.print(f"final: {history[-1]}; final model {out / 'model.pt'}"
                  + (f", best model (epoch {best}) {out / 'best_model.pt'}" if best else "")
                  + f", config {out / 'config.json'}, TensorBoard logs in {out}")
    return 0


def cmd_pretrain(a) -> int:
    from fedbrain.tasks.config import config_from_arguments
    from fedbrain.tasks.pretrain import BATCH, EPOCHS, LR, pretrain, synthesize_public

    config_cls = _config(a.task)
    epochs = a.epochs if a.epochs is not None else EPOCHS[config_cls.TASK]
    if epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, got {epochs}")
    out = Path(a.out)
    if a.datalists:
        datalists = _datalists(a.datalists)
    else:
        console.print(f"no public data given: synthesizing the synthetic public cohort into {out / 'public_data'}")
        datalists = synthesize_public(out / "public_data", task=config_cls.TASK, cases=a.cases, seed=a.data_seed)
    # The recipe the demo's and the benchmark's starts use, where the user gives no batch or lr.
    recipe = {k: v[config_cls.TASK] for k, v in (("batch_size", BATCH), ("lr", LR))
              if getattr(a, f"config_{k}", None) is None}
    config = config_from_arguments(config_cls, a, **recipe)
    start = pretrain(config, datalists, out, epochs=epochs, trainer_cls=_trainer(a.task))
    shown = ", ".join(f"{k} {v:.3f}" for k, v in start.record["public_validation"].items())
    console.print(f"start model {start.weights} (sha256 {start.sha256[:16]}), provenance {start.weights.with_suffix('.json')}")
    console.print(f"on the public validation cases: {shown}")
    part, clips = config_cls.DP_PART_DEFAULT, start.record.get("public_gradient_norms", {})
    if part in clips:
        console.print(f"DP-SGD clip for '{part}', the median per-case gradient norm on the public "
                      f"{start.record['public_gradient_norms_cases']} cases: {clips[part]['clip']:g}"
                      + ("" if config_cls.PUBLIC_CLIP else f" (recorded only: {config_cls.TASK} jobs clip at 1.0)"))
    console.print(f"use it: fedbrain job export-{a.task} --start-model {start.weights} --dp-epsilon 8 --sites SITE ...")
    return 0


def cmd_job_export(a) -> int:
    import importlib

    from fedbrain.tasks.config import config_from_arguments

    config_cls = _config(a.task)
    job = importlib.import_module(f"fedbrain.jobs.{TASKS[a.task]}")
    extra = {"sites": a.sites} if getattr(a, "sites", None) else {}
    try:
        config = config_from_arguments(config_cls, a)
        console.print(str(job.export(config, a.out, **extra)))
    except ValueError as e:
        raise SystemExit(f"cannot export the job: {e}") from None
    for note in getattr(job, "export_notes", lambda _: [])(config):
        console.print(note, soft_wrap=True)
    return 0


def cmd_job_resume(a) -> int:
    from fedbrain.jobs.resume import ResumeError, resume_job

    try:
        folder, found = resume_job(Path(a.job), Path(a.out), Path(a.server_run_dir))
    except ResumeError as e:
        raise SystemExit(f"cannot resume: {e}") from None
    console.print(f"{folder}  (starts at round {found['round'] + 1} of {found['total_rounds']} from {found['checkpoint']}; "
                  f"submit it as the interrupted job was)")
    return 0


def _poc(a):
    from fedbrain.poc.consortium import PocConsortium

    return PocConsortium(Path(a.run_dir))


def cmd_poc(a) -> int:
    poc = _poc(a)
    if a.action == "up":
        if poc.is_running():  # re-provisioning would issue new certificates under the running processes
            console.print(f"a POC consortium is already running in {poc.run_dir} (sites {', '.join(poc.sites)}); "
                          f"`fedbrain poc status` shows it, `fedbrain poc down` stops it")
            return 1
        data = Path(a.data) if a.data else None
        if data is None:
            from fedbrain.synthetic.cohort import synthesize_consortium

            data = Path(a.run_dir) / "data"
            if not data.exists():
                synthesize_consortium(data, sites=len(poc.sites), cases=a.cases, seed=0, site_names=poc.sites)
        poc.up(data_dir=data, timeout=a.start_timeout)
        console.print(f"POC consortium up in {poc.run_dir}: server localhost, sites {', '.join(poc.sites)}")
        console.print(f"admin startup kit: {poc.kit(poc.admin)}  (user {poc.admin})")
        return 0
    if a.action == "status":
        st = poc.status()
        console.print_json(json.dumps(st))
        return 0 if st["running"] else 1
    if a.action == "submit":
        from fedbrain.poc.runner import submit_and_wait
        from fedbrain.report.job_report import print_site_table, write_report

        if not a.job or not (Path(a.job) / "meta.json").is_file():
            raise SystemExit(f"poc submit needs --job FOLDER, an exported job (fedbrain job export-...): {a.job!r}")
        if not poc.is_running():
            raise SystemExit(f"no POC consortium running in {poc.run_dir}: start it with `fedbrain poc up`")
        rounds = _job_rounds(Path(a.job))
        result_dir = Path(a.result or Path(a.run_dir) / "results")
        meta, result = submit_and_wait(poc, Path(a.job), rounds=rounds, result_dir=result_dir, console=console)
        report = write_report(result, result / "report")
        print_site_table(report, console)
        console.print(f"job {meta.get('job_id')} {meta.get('status')}; result {result}, report {result / 'report'}")
        return 0 if meta.get("status") == "FINISHED:COMPLETED" else 1
    if a.action == "down":
        poc.clean() if a.remove else poc.stop()
        console.print(f"POC consortium in {poc.run_dir} stopped; no process left; "
                      + ("kits removed" if a.remove else f"kits kept in {poc.workspace} (--remove deletes them)"))
        return 0
    raise SystemExit(f"unknown action {a.action}")


def _job_rounds(job: Path) -> int:
    """The number of rounds an exported job runs (for the progress bar)."""
    for config in sorted(job.glob("app*/config/config_fed_server.json")):
        for workflow in json.loads(config.read_text()).get("workflows", []):
            if "num_rounds" in workflow.get("args", {}):
                return int(workflow["args"]["num_rounds"])
    return 1


def cmd_demo(a) -> int:
    from fedbrain.demo import ClassifyDemoSettings, DemoSettings, demo_config, run_demo, with_dp_batch
    from fedbrain.tasks.config import config_from_arguments

    config = config_from_arguments(_config(a.task), a, defaults=demo_config(a.task))
    config = with_dp_batch(config, batch_given=getattr(a, "config_batch_size", None) is not None)
    cases = {"cases": a.cases} if a.cases is not None else {}
    start = {"public_start": a.public_start} if a.public_start is not None else {}
    if a.task == "classify":
        data = {k: v for k, v in (("alpha", a.alpha), ("atypical", a.atypical), ("min_per_grade", a.min_per_grade))
                if v is not None}
        settings = ClassifyDemoSettings(seed=config.seed, keep_workspace=a.keep, task=config, **cases, **data, **start)
    else:
        settings = DemoSettings(seed=config.seed, keep_workspace=a.keep, task=config, **cases, **start)
    run_demo(Path(a.runs), settings, console=console)
    return 0


def cmd_report(a) -> int:
    from fedbrain.report.job_report import print_site_table, write_report

    out = Path(a.out) if a.out else Path(a.result) / "report"
    report = write_report(Path(a.result), out)
    print_site_table(report, console)
    console.print(f"wrote {out / 'report.md'}")
    return 0


def cmd_provision(a) -> int:
    import yaml

    from fedbrain.ops.kit import KitError
    from fedbrain.ops.provision import provision, trial_project

    project = Path(a.project)
    try:
        if a.trial:
            try:
                loaded = yaml.safe_load(project.read_text())
            except (OSError, yaml.YAMLError) as e:
                raise KitError(f"{project}: cannot read the project file ({e})") from None
            Path(a.out).mkdir(parents=True, exist_ok=True)
            trial = trial_project(loaded, Path(a.out))
            project = Path(a.out) / "trial.project.yml"
            project.write_text(yaml.safe_dump(trial, sort_keys=False))
        if a.distributed:  # with --trial: the same flow on this machine, server on localhost
            return _provision_distributed(project, Path(a.out))
        prod = provision(project, Path(a.out))
    except KitError as e:
        console.print(f"[red]provisioning failed:[/] {e}")
        return 1
    _print_kits(prod, "kits written to")
    if a.trial:
        admin = next((p["name"] for p in trial["participants"] if p.get("role") == "project_admin"), None)
        _print_trial_steps(prod, admin, Path(a.data) if a.data else None)
        return 0
    console.print("Send each participant only its own folder (it holds its private key); keep "
                  f"{prod.parent / 'state'} (the root CA key) offline. Hospitals: docs/hospital-it.md.")
    return 0


def _print_kits(prod: Path, heading: str) -> None:
    """The kits provisioned in ``prod`` and the root CA fingerprint to publish (one line each, never wrapped)."""
    from fedbrain.ops.kit import root_fingerprint

    console.print(f"{heading} [bold]{prod}[/]:")
    for kit in sorted(p for p in prod.iterdir() if p.is_dir()):
        console.print(f"  {kit.name}")
    first = next(p for p in sorted(prod.iterdir()) if (p / "startup" / "rootCA.pem").is_file())
    console.print(f"root CA SHA-256 fingerprint (publish it to every participant out of band): {root_fingerprint(first)}")


def _provision_distributed(project: Path, out: Path) -> int:
    """The consortium's own kits, the CA folder for approving, a participant file per hospital participant."""
    from fedbrain.ops.distributed import provision_distributed
    from fedbrain.ops.kit import KitError

    try:
        prod, ca, _ = provision_distributed(project, out)
    except KitError as e:
        console.print(f"[red]provisioning failed:[/] {e}")
        return 1
    _print_kits(prod, "the consortium's own kits (keys made here, for its server and project admin) in")
    console.print(f"Every other participant makes its own key. Send each the file made for it ({ca.parent / 'requests'}/"
                  f"NAME.yml) and these steps (docs/hospital-it.md, distributed provisioning):")
    console.print("  at the hospital:   fedbrain kit request NAME.yml --out REQUEST_DIR      (send back NAME.request.zip)")
    console.print(f"  here:              fedbrain kit approve NAME.request.zip --consortium {ca.parent}")
    console.print("  at the hospital:   fedbrain kit package NAME.signed.zip --request-dir REQUEST_DIR --out KITS "
                  "--fingerprint FINGERPRINT")
    console.print(f"Keep {ca.parent / 'ca'} and {ca.parent / 'state'} (the root CA key) on this machine, offline.")
    return 0


def cmd_kit_request(a) -> int:
    from fedbrain.ops.distributed import request_kit
    from fedbrain.ops.kit import KitError

    try:
        request, key = request_kit(Path(a.file), Path(a.out), name=a.name)
    except KitError as e:
        console.print(f"[red]kit request:[/] {e}")
        return 1
    console.print(f"your private key: {key} (readable by you only; it never leaves this machine)")
    console.print(f"send to the consortium: {request} (the certificate request, no key)")
    console.print(f"then, with the signed zip it returns: fedbrain kit package SIGNED.zip --request-dir {key.parent} "
                  f"--out KITS --fingerprint FINGERPRINT")
    return 0


def cmd_kit_approve(a) -> int:
    from fedbrain.ops.distributed import approve_request
    from fedbrain.ops.kit import KitError

    try:
        signed = approve_request(Path(a.request), Path(a.consortium), Path(a.project) if a.project else None,
                                 Path(a.out) if a.out else None)
    except KitError as e:
        console.print(f"[red]kit approve:[/] {e}")
        return 1
    console.print(f"signed: {signed}; return it to the requester (it holds their certificate, no key)")
    return 0


def cmd_kit_package(a) -> int:
    from fedbrain.ops.distributed import package_kit
    from fedbrain.ops.kit import KitError
    from fedbrain.ops.kit_guard import guard

    try:
        kit = package_kit(Path(a.signed), Path(a.request_dir), Path(a.out), a.fingerprint)
    except KitError as e:
        console.print(f"[red]kit package:[/] {e}")
        return 1
    console.print(f"your kit: {kit} (its key is the one you made; secrets readable by you only)")
    if guard(kit, probe_server=False):
        return 1
    console.print(f"next: docs/hospital-it.md (tell the site where its data is), then bash {kit / 'startup' / 'start.sh'}")
    return 0


def cmd_kit_k8s(a) -> int:
    from fedbrain.ops.k8s import prepare_chart
    from fedbrain.ops.kit import KitError

    try:
        chart = prepare_chart(Path(a.kit), Path(a.out), image=a.image, namespace=a.namespace,
                              workspace_claim=a.workspace_claim, data_claim=a.data_claim, gpus=a.gpus,
                              server_cidr=a.server_cidr)
    except KitError as e:
        console.print(f"[red]kit k8s:[/] {e}")
        return 1
    console.print(f"Helm chart: {chart.chart} (from nvflare deploy prepare; no key in it)")
    console.print(f"the kit as a Kubernetes Secret: {chart.secret} (private key inside: readable by you only)")
    if chart.role == "client" and not a.data_claim:
        console.print("[yellow]no --data-claim: the site starts without data and says so in every job; "
                      "see docs/hospital-it.md (Kubernetes)[/]")
    console.print("Then, with kubectl and helm pointed at your cluster (the last command deletes the Secret's file, "
                  "which holds the private key: keep no copy beside the chart):")
    for line in chart.commands():
        console.print(f"  {line}")
    return 0


def _print_trial_steps(prod: Path, admin: str | None, data: Path | None) -> None:
    """What to run, in order, to try the production kits on this machine (one line per command)."""
    from fedbrain.fl.site import write_site_config

    kits = {p.name: p for p in sorted(prod.iterdir()) if (p / "startup").is_dir()}
    roles = {"server": [], "client": [], "admin": []}
    for name, kit in kits.items():
        startup = kit / "startup"
        kind = "server" if (startup / "fed_server.json").exists() else "client" if (startup / "fed_client.json").exists() \
            else "admin"
        roles[kind].append(name)
    admin = admin or (roles["admin"] or ["?"])[0]
    configured = []
    if data:
        for site in roles["client"]:
            datalist = data / site / "datalist.json"
            if datalist.is_file():
                write_site_config(kits[site], datalist)
                configured.append(site)
    console.print(f"Trial kits (production policies, server on localhost) in {prod}. Run each in its own terminal:")
    for name in roles["server"] + roles["client"]:
        console.print(f"  bash {kits[name] / 'startup' / 'start.sh'}")
    for site in roles["client"]:
        if site not in configured:
            console.print(f"  (before starting {site}: cp {kits[site] / 'local' / 'fedbrain_site.json.template'} "
                          f"{kits[site] / 'local' / 'fedbrain_site.json'} and set its datalist; or provision again "
                          f"with --data from `fedbrain data synth --sites {len(roles['client'])} --out DIR`)")
    console.print(f"Then, as the consortium admin: fedbrain status --admin-kit {kits.get(admin, prod / admin)}")
    console.print("To stop: docs/runbook.md (the orderly way, from the admin console); as a last resort, for each kit:")
    for name in roles["client"] + roles["server"]:
        console.print(f"  bash {kits[name] / 'startup' / 'stop_fl.sh'}")


def cmd_export_bundle(a) -> int:
    from fedbrain.bundle import BundleError, export_bundle

    try:
        out = export_bundle(Path(a.source), Path(a.out), a.config)
    except BundleError as e:
        console.print(f"[red]cannot export the bundle:[/] {e}")
        return 1
    console.print(f"MONAI bundle written to [bold]{out}[/] (run: python -m monai.bundle run --config_file "
                  f"{out / 'configs' / 'inference.json'} --t1 ... --t1ce ... --t2 ... --flair ...)")
    return 0


def cmd_kit_verify(a) -> int:
    from fedbrain.ops.kit_guard import guard

    return 1 if guard(Path(a.kit), probe_server=not a.offline) else 0


def cmd_site_check(a) -> int:
    """Rows on the console, or only JSON on stdout with --json; exit 1 when any row fails."""
    from fedbrain.ops.site_check import Needs, render, run_site_check

    needs = Needs(disk_gib=a.need_disk_gib, ram_gib=a.need_ram_gib, gpu_gib=a.need_gpu_gib)
    check = run_site_check(Path(a.kit), datalist=a.data, expect_version=a.expect_version, python=a.python,
                           allow_server_down=a.allow_server_down, workspace=Path(a.workspace) if a.workspace else None,
                           needs=needs, preflight=not a.no_preflight, progress=not a.json and console.is_terminal)
    if a.json:
        print(json.dumps(check.to_json(), indent=1))
    else:
        render(check, console)
    return 0 if check.ok else 1


def cmd_site_install_service(a) -> int:
    from fedbrain.ops.service import ServiceError, install_service

    try:
        path, next_steps = install_service(Path(a.kit), user=a.user, output=Path(a.output) if a.output else None,
                                           workspace=Path(a.workspace) if a.workspace else None, datalist=a.data)
    except ServiceError as e:
        console.print(f"[red]install-service:[/] {e}")
        return 1
    console.print(f"wrote {path}; then, as root:")
    for step in next_steps:
        console.print(f"  {step}")
    return 0


def cmd_status(a) -> int:
    """Only JSON on stdout with --json."""
    from fedbrain.ops.status import StatusError, consortium_status, render_status

    try:
        status = consortium_status(Path(a.admin_kit), timeout=a.timeout)
    except StatusError as e:
        if a.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        else:
            console.print(f"[red]status:[/] {e}")
        return 1
    if a.json:
        print(json.dumps(status, indent=1, default=str))
    else:
        render_status(status, console)
    return 0


def cmd_watch(a) -> int:
    from fedbrain.ops.status import StatusError, watch

    try:
        watch(Path(a.admin_kit), job=a.job, interval=a.interval, console=console, timeout=a.timeout)
    except StatusError as e:
        console.print(f"[red]watch:[/] {e}")
        return 1
    return 0


def _chosen_task(argv: list[str] | None) -> str:
    """The ``--task`` on the command line (so help and flags are that task's), else the default."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv) and argv[i + 1] in TASKS:
            return argv[i + 1]
        if arg.startswith("--task=") and arg.split("=", 1)[1] in TASKS:
            return arg.split("=", 1)[1]
    return "segment"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every command and flag; only the task settings that apply to a command, with the chosen task's defaults."""
    from fedbrain import __version__
    from fedbrain.tasks.config import add_config_arguments

    from fedbrain.demo import ClassifyDemoSettings, DemoSettings, demo_config

    task = _chosen_task(argv)

    p = argparse.ArgumentParser(prog="fedbrain", description=__doc__)
    p.add_argument("--version", action="version", version=f"fedbrain {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="check or synthesize site data").add_subparsers(dest="data_cmd", required=True)
    c = data.add_parser("check", help="validate every case of a datalist; exit 1 if any problem")
    c.add_argument("datalist", help="a datalist file, or a folder with one <site>/datalist.json per site")
    c.add_argument("--root", default=None, help="data root (default: the datalist's folder)")
    c.set_defaults(func=cmd_data_check)
    b = data.add_parser("index", aliases=["build-datalist"],
                        help="write a datalist from a folder tree of cases; prints every guess and what it could not place")
    b.add_argument("folder", metavar="ROOT", help="cases as BraTS 2021 (…_t1.nii.gz) / 2023 (…-t1n.nii.gz) files or "
                                                  "per-case folders (t1, t1ce, t2, flair, seg)")
    b.add_argument("--out", default=None, help="datalist file to write, paths relative to its folder "
                                               "(default: ROOT/datalist.json)")
    b.add_argument("--layout", default="auto", choices=["auto", "brats2021", "brats2023"],
                   help="file naming and label convention of the tree (auto: recognised per file, labels from their "
                        "values)")
    b.add_argument("--val-fraction", dest="val_fraction", type=float, default=0.2)
    b.add_argument("--seed", type=int, default=0, help="which cases go to validation")
    b.add_argument("--ct-dir", dest="ct_dir", default=None, help="CT DICOM folders named by case_id")
    from fedbrain.contracts import LABEL_CONVENTIONS
    b.add_argument("--label-convention", dest="label_convention", default="auto",
                   choices=["auto", *LABEL_CONVENTIONS], help="auto: from the label values")
    b.set_defaults(func=cmd_data_build)
    s = data.add_parser("synth", help="write a synthetic multi-hospital BraTS-style consortium")
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--cases", type=int, default=DemoSettings.cases, help="mean cases per site (sites differ)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spacing", type=float, default=3.0, help="voxel size in mm (2-3)")
    s.add_argument("--atypical", type=float, default=0.0,
                   help="fraction of gliomas that look like the other grade on MRI (0: MRI grades every case)")
    s.set_defaults(func=cmd_data_synth)

    t = sub.add_parser("train", help="centralized baseline with the same data/model/loop code")
    t.add_argument("--central", action="store_true", required=True)
    t.add_argument("datalists", nargs="+", help="datalist files, or a synth output folder")
    t.add_argument("--task", default="segment", choices=sorted(TASKS), help="shows that task's settings with --help")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--out", default="runs/central")
    # Training settings only (and DP-SGD, which trains centrally too): no federation, HE or round policy.
    add_config_arguments(t, _config(task), groups=("training",), also=_config(task).CENTRAL_PRIVACY)
    t.set_defaults(func=cmd_train)

    pt = sub.add_parser("pretrain", help="train a task's starting model on public data (what DP jobs fine-tune)")
    pt.add_argument("datalists", nargs="*", help="public datalists (e.g. BraTS indexed with `fedbrain data index`), "
                    "or a folder of them; none: the synthetic public cohort")
    pt.add_argument("--task", default="segment", choices=sorted(TASKS), help="shows that task's settings with --help")
    pt.add_argument("--out", required=True, help="folder for start.pt and start.json")
    pt.add_argument("--epochs", type=int, default=None,
                    help="default: the task's pretraining recipe (segmentation 8, classification 20; batch 4 / 16, "
                         "lr 1e-2 / 1e-3 unless given), the one `fedbrain demo --dp-epsilon` uses")
    pt.add_argument("--cases", type=int, default=100, help="synthetic public cohort: cases per public centre")
    pt.add_argument("--data-seed", dest="data_seed", type=int, default=0, help="synthetic public cohort: its seed")
    add_config_arguments(pt, _config(task), groups=("training",), skip=("start_model", "dp_ready"))
    pt.set_defaults(func=cmd_pretrain)

    j = sub.add_parser("job", help="export a job folder to submit (settings from the task config)")
    j_sub = j.add_subparsers(dest="job_cmd", required=True)
    for job_task in sorted(TASKS):
        je = j_sub.add_parser(f"export-{job_task}", help=f"export the {TASKS[job_task]} job")
        je.add_argument("--out", default=".", help="folder to export into")
        if job_task == "classify":
            je.add_argument("--sites", nargs="+", default=None, help="one app per site (default: the POC's)")
        else:
            je.add_argument("--sites", nargs="+", default=None, help="the consortium's sites; needed with "
                            "--start-model (the start goes to the server app only)")
        add_config_arguments(je, _config(job_task))
        je.set_defaults(func=cmd_job_export, task=job_task)

    jr = j_sub.add_parser("resume", help="after a server restart: the interrupted job, from its last saved round "
                          "(run on the server machine)")
    jr.add_argument("job", help="the job folder that was submitted (an export of the same settings)")
    jr.add_argument("--server-run-dir", "--server_run_dir", required=True,
                    help="the interrupted job's folder in the server's workspace: <server kit>/<job id>")
    jr.add_argument("--out", default=".", help="folder to write the resumed job into")
    jr.set_defaults(func=cmd_job_resume)

    pc = sub.add_parser("poc", help="a POC consortium on this machine")
    pc.add_argument("action", choices=["up", "status", "submit", "down"])
    pc.add_argument("--job", default=None, help="submit: an exported job folder")
    pc.add_argument("--result", default=None, help="submit: where to download the result (default RUN_DIR/results)")
    pc.add_argument("--run-dir", dest="run_dir", default="runs/poc")
    pc.add_argument("--data", default=None, help="synth output folder (default: generate into RUN_DIR/data)")
    pc.add_argument("--cases", type=int, default=DemoSettings.cases, help="mean cases per site when it synthesizes data")
    pc.add_argument("--remove", action="store_true", help="down: also delete the provisioned kits (default: keep)")
    pc.add_argument("--start-timeout", type=float, default=90.0,
                    help="up: seconds to wait for every site to connect (a busy machine may need more)")
    pc.set_defaults(func=cmd_poc)

    d = sub.add_parser("demo", help="main job end to end: data, POC, submit, watch, report, teardown")
    d.add_argument("--task", default="segment", choices=sorted(TASKS), help="shows that task's settings with --help")
    d.add_argument("--runs", default="runs")
    d.add_argument("--cases", type=int, default=None, help=f"mean cases per hospital (default: {DemoSettings.cases} "
                                                           f"segment, {ClassifyDemoSettings.cases} classify)")
    d.add_argument("--alpha", type=float, default=None,
                   help=f"classify only: Dirichlet label-skew alpha (default {ClassifyDemoSettings.alpha})")
    d.add_argument("--atypical", type=float, default=None,
                   help="classify only: fraction of gliomas that look like the other grade on MRI "
                        f"(default {ClassifyDemoSettings.atypical})")
    d.add_argument("--min-per-grade", dest="min_per_grade", type=int, default=None,
                   help="classify only: every hospital holds at least this many cases of every grade "
                        f"(default {ClassifyDemoSettings.min_per_grade})")
    d.add_argument("--keep", action="store_true", help="keep the provisioned workspace after the run")
    d.add_argument("--public-start", dest="public_start", action=argparse.BooleanOptionalAction, default=None,
                   help="fine-tune the task's public start (pretrained once, cached in RUNS/public-start) instead of "
                        "random weights (default: classify yes; segment only with --dp-epsilon); --start-model FILE "
                        "names another start")
    # The job's settings are the task config's own flags (--seed also seeds the synthetic hospitals).
    add_config_arguments(d, _config(task), defaults=demo_config(task))
    d.add_argument("--local-epochs", dest="config_epochs_per_round", type=int, default=None, help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)

    pv = sub.add_parser("provision", help="production startup kits for every participant (FLARE provisioning "
                        "plus site policies and a signed kit manifest)")
    pv.add_argument("project", help="project file, e.g. provisioning/consortium/project.yml")
    pv.add_argument("--out", required=True, help="folder for the kits (and the consortium's root CA state)")
    pv.add_argument("--trial", action="store_true", help="a one-machine trial of the production kits: the server "
                    "named localhost on free ports, its storage under --out; prints what to run")
    pv.add_argument("--data", default=None, help="with --trial: a folder from `fedbrain data synth` (DIR/<site>/"
                    "datalist.json); each site kit's local/fedbrain_site.json then points at its part")
    pv.add_argument("--distributed", action="store_true", help="keys stay with their owners: kits here for the "
                    "consortium's server and project admin only, a CA folder for approving, a file per other "
                    "participant for `fedbrain kit request` (no HE: it needs a key every site shares)")
    pv.set_defaults(func=cmd_provision)

    kv = sub.add_parser("kit", help="startup kit tools").add_subparsers(dest="kit_cmd", required=True)
    kvv = kv.add_parser("verify", help="check a kit against its signed manifest, its certificate and the server "
                                       "(what the kit's start script runs); exit 1 if refused")
    kvv.add_argument("kit", help="the participant's kit folder (holding startup/ and local/)")
    kvv.add_argument("--offline", action="store_true", help="skip the TLS handshake with the server")
    kvv.set_defaults(func=cmd_kit_verify)
    kvr = kv.add_parser("request", help="distributed provisioning, at the hospital: make your private key and a "
                                        "certificate request to send to the consortium")
    kvr.add_argument("file", help="the participant file the consortium sent (or its project file, with --name)")
    kvr.add_argument("--name", default=None, help="which participant of the file you are")
    kvr.add_argument("--out", required=True, help="folder for your key and the request (keep it: packaging needs it)")
    kvr.set_defaults(func=cmd_kit_request)
    kva = kv.add_parser("approve", help="distributed provisioning, at the consortium: sign a participant's request")
    kva.add_argument("request", help="NAME.request.zip from `fedbrain kit request`")
    kva.add_argument("--consortium", required=True, help="the folder `fedbrain provision` wrote for the project "
                     "(DIR/<project name>, holding state/ and ca/)")
    kva.add_argument("--project", default=None, help="the project file, when it changed (a hospital added) or the "
                     "consortium was provisioned in one step")
    kva.add_argument("--out", default=None, help="signed zip (default: NAME.signed.zip beside the request)")
    kva.set_defaults(func=cmd_kit_approve)
    kvp = kv.add_parser("package", help="distributed provisioning, at the hospital: assemble your kit from the "
                                        "signed zip and your own key")
    kvp.add_argument("signed", help="NAME.signed.zip from the consortium")
    kvp.add_argument("--request-dir", required=True, help="the folder of `fedbrain kit request --out` (your key)")
    kvp.add_argument("--out", required=True, help="folder for the kit")
    kvp.add_argument("--fingerprint", required=True, help="the root CA's SHA-256 fingerprint the consortium "
                     "published out of band (AA:BB:...)")
    kvp.set_defaults(func=cmd_kit_package)

    kvk = kv.add_parser("k8s", help="a Helm chart (from FLARE's nvflare deploy prepare) and the kit as a Secret, "
                                    "for running this server or site on Kubernetes")
    kvk.add_argument("kit", help="the server's or a site's kit folder")
    kvk.add_argument("--out", required=True, help="folder for chart/ and kit-secret.yaml")
    kvk.add_argument("--image", default=None, help="the image to run (default: fedbrain-server or fedbrain-site "
                     "at this fedbrain's version, as docker/Dockerfile builds them; prefix your registry)")
    kvk.add_argument("--namespace", default="fedbrain", help="the namespace of the Secret and the release "
                     "(default: fedbrain)")
    kvk.add_argument("--data-claim", default=None, help="sites: the PersistentVolumeClaim holding this hospital's "
                     "data (mounted read-only at /data, datalist /data/datalist.json)")
    kvk.add_argument("--workspace-claim", default=None, help="the claim for FLARE's workspace (job folders, the "
                     "privacy ledger; the server's job store); default NAME-workspace, made by the chart")
    kvk.add_argument("--gpus", type=int, default=0, help="GPUs the pod requests (nvidia.com/gpu)")
    kvk.add_argument("--server-cidr", default=None, help="sites: the server's address block (e.g. 203.0.113.7/32); "
                     "the pod may then dial the server's port there only, not on any host")
    kvk.set_defaults(func=cmd_kit_k8s)

    from fedbrain.ops import site_check as sc
    st = sub.add_parser("site", help="run a hospital site: pre-flight check, system service")
    st_sub = st.add_subparsers(dest="site_cmd", required=True)
    sck = st_sub.add_parser("check", help="will this machine work as a site? one row per check; exit 1 if any fails",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            epilog="example: fedbrain site check --kit /srv/flare/hospital-a --json")
    sck.add_argument("--kit", required=True, help="the site's kit folder (holding startup/ and local/)")
    sck.add_argument("--data", default=None, help="datalist to check (default: the one local/fedbrain_site.json names)")
    sck.add_argument("--json", action="store_true", help="print only JSON on stdout")
    sck.add_argument("--expect-version", dest="expect_version", default=None,
                     help="fedbrain version the consortium runs (default: this fedbrain's)")
    sck.add_argument("--python", default=None, help="the python3 the kit's start script runs (default: python3 on PATH)")
    sck.add_argument("--workspace", default=None, help="where FLARE writes job workspaces (default: NVFL_WORKSPACE "
                                                       "or the kit)")
    sck.add_argument("--allow-server-down", dest="allow_server_down", action="store_true",
                     help="an unreachable server is a warning, not a failure (used before a service starts)")
    sck.add_argument("--no-preflight", dest="no_preflight", action="store_true",
                     help="skip FLARE's nvflare preflight-check (it dry-runs the site for ~5 s)")
    sck.add_argument("--need-disk-gib", dest="need_disk_gib", type=float, default=sc.NEED_DISK_GIB)
    sck.add_argument("--need-ram-gib", dest="need_ram_gib", type=float, default=sc.NEED_RAM_GIB)
    sck.add_argument("--need-gpu-gib", dest="need_gpu_gib", type=float, default=sc.NEED_GPU_GIB)
    sck.set_defaults(func=cmd_site_check)
    sis = st_sub.add_parser("install-service", help="write a systemd unit that runs this kit as a service",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            epilog="example: fedbrain site install-service --kit /srv/flare/hospital-a --user fedbrain")
    sis.add_argument("--kit", required=True, help="the site's kit folder")
    sis.add_argument("--user", default="fedbrain", help="the dedicated account the service runs as")
    sis.add_argument("--workspace", default=None, help="writable folder for FLARE's job workspaces "
                                                       "(default: /var/lib/fedbrain/<site>)")
    sis.add_argument("--data", default=None, help="datalist (default: the one local/fedbrain_site.json names)")
    sis.add_argument("--output", default=None, help="unit file to write (default: /etc/systemd/system/fedbrain-<site>.service)")
    sis.set_defaults(func=cmd_site_install_service)

    sts = sub.add_parser("status", help="the consortium as an admin kit sees it: sites, jobs, rounds",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         epilog="example: fedbrain status --admin-kit ~/kits/admin@example-consortium.org --json")
    sts.add_argument("--admin-kit", "--kit", dest="admin_kit", required=True,
                     help="an admin's kit folder (POC or production); the user is its certificate's name")
    sts.add_argument("--json", action="store_true", help="print only JSON on stdout")
    sts.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the admin connection")
    sts.set_defaults(func=cmd_status)
    wt = sub.add_parser("watch", help="the consortium live from an admin kit (Ctrl-C to stop; ends with the job)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        epilog="example: fedbrain watch 3f2a --admin-kit ~/kits/admin@example-consortium.org")
    wt.add_argument("job", nargs="?", default=None, help="a job id (or its first characters); default: every job")
    wt.add_argument("--admin-kit", "--kit", dest="admin_kit", required=True, help="an admin's kit folder")
    wt.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")
    wt.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the admin connection")
    wt.set_defaults(func=cmd_watch)

    eb = sub.add_parser("export-bundle", help="hand a trained segmentation model over as a MONAI bundle")
    eb.add_argument("source", help="a `train --central` output folder, a downloaded FLARE job result, or a model file")
    eb.add_argument("--out", required=True, help="bundle folder to write")
    eb.add_argument("--config", default=None, help="task config JSON (when the source does not carry one)")
    eb.set_defaults(func=cmd_export_bundle)

    r = sub.add_parser("report", help="render the per-site report of any downloaded job result")
    r.add_argument("result", help="downloaded job result folder")
    r.add_argument("--out", default=None)
    r.set_defaults(func=cmd_report)
    return p


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe the user's input (file, site, reason): printed as one line, not a traceback."""
    from fedbrain.bundle import BundleError
    from fedbrain.data.datalist import DatalistError
    from fedbrain.fl.site import SiteConfigError
    from fedbrain.models.start import StartModelError
    from fedbrain.ops.kit import KitError
    from fedbrain.poc.consortium import PocError
    from fedbrain.report.job_report import ReportError

    return (DatalistError, SiteConfigError, KitError, PocError, ReportError, BundleError, StartModelError,
            FileNotFoundError)


def main(argv=None) -> int:
    a = build_parser(argv).parse_args(argv)
    # FLARE's own INFO chatter (connections, cells) drowns the progress bar: keep it at WARNING.
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedbrain").setLevel(logging.DEBUG if a.verbose else logging.INFO)
    if not a.verbose:  # MONAI's note that an optional GPU DICOM decoder is absent, on every CPU-only load
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    try:
        return a.func(a) or 0
    except user_errors() as e:
        if a.verbose:
            raise
        console.print(f"[red]fedbrain {a.command}:[/] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
