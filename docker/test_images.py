"""The images, built and run for real: `make image-test` (minutes: the build installs torch; not part of
`make test`). Run it whenever docker/ or the requirements change.

Podman runs the containers (daemonless; Docker's daemon is not needed, the Dockerfile is the same). Where no image
registry is reachable (our build machines), the base image is made from Debian's own packages with mmdebstrap
(``apt-get install podman mmdebstrap runc``); set FEDBRAIN_BASE_IMAGE to use another. The build reaches the
package index with this machine's pip settings (its pip.conf, PIP_* variables, CA file), mounted into the build
steps only: nothing of them stays in an image.

What runs: both images build from this checkout; a server container and two site containers start from
production kits (`fedbrain provision --trial`), each kit mounted read-only at /kit as docker/compose.yml does;
the third site runs from its Kubernetes chart (`fedbrain kit k8s`, rendered by Helm's Go SDK) with `podman kube
play`: the Deployment and workspace claim as rendered, the kit's Secret laid out as the kubelet would. Every
container runs the entry point's `fedbrain site check` first; an encrypted segmentation job submitted from this
machine's admin kit completes with every site's update; the health check passes. Sizes and build times are printed
(docs/hospital-it.md, Containers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the production-kit deployment harness the suite uses

PODMAN = ["podman", "--cgroup-manager=cgroupfs", "--runtime", "runc"]
#: This machine refuses raised rlimits; podman's defaults ask for them.
LIMITS = ["--ulimit", "nofile=10000:10000", "--ulimit", "nproc=1000:1000"]
BASE = "localhost/fedbrain-base:bookworm-jemalloc"
TAG = "image-test"
UID = 1000  # the images' user (docker/Dockerfile)


def _run(args, timeout=1800, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args[:6]))} ... exit {res.returncode}:\n{res.stdout[-3000:]}\n"
                             f"{res.stderr[-3000:]}")
    return res


def _base_image(work: Path) -> str:
    if os.environ.get("FEDBRAIN_BASE_IMAGE"):
        return os.environ["FEDBRAIN_BASE_IMAGE"]
    if subprocess.run([*PODMAN, "image", "exists", BASE]).returncode == 0:
        return BASE
    if not shutil.which("mmdebstrap"):
        pytest.skip("no base image: apt-get install mmdebstrap (or set FEDBRAIN_BASE_IMAGE)")
    rootfs = work / "rootfs.tar"
    _run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates,passwd,libjemalloc2", "bookworm",
          str(rootfs)])
    _run([*PODMAN, "import", str(rootfs), BASE])
    rootfs.unlink()
    return BASE


def _pip_settings(work: Path) -> list[str]:
    """Mounts that give the build this machine's pip settings: one pip.conf with every setting pip sees here
    (files and PIP_* variables), and each local file or folder it names, at the same path."""
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    settings = {}
    for line in res.stdout.splitlines():
        key, _, value = line.partition("=")
        if key and value:
            settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    conf = work / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for key, value in settings.items():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if "index-url" in key:
                path = path.parent  # a local index's pages link to files beside its simple/ folder
            if path.is_absolute() and path.exists() and f"{path}:{path}:ro" not in mounts:
                mounts += ["-v", f"{path}:{path}:ro"]
    return mounts


def _torch_index() -> list[str]:
    """The Dockerfile's default (PyTorch's CPU index) where reachable; else the package index (with a local CPU
    wheel, pip's find-links, picked first)."""
    try:
        urllib.request.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5)
        return []
    except OSError:
        return ["--build-arg", "TORCH_INDEX=https://pypi.org/simple"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman runc)")
    work = tmp_path_factory.mktemp("build")
    base = _base_image(work)
    built = {}
    for target in ("site", "server"):
        started = time.time()
        _run([*PODMAN, "build", "--format", "docker", "--network", "host", *_pip_settings(work), *LIMITS,
              "-f", "docker/Dockerfile", "--target", target, "--build-arg", f"BASE_IMAGE={base}", *_torch_index(),
              "-t", f"fedbrain-{target}:{TAG}", "."], cwd=REPO, timeout=3600)
        size = int(_run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", f"fedbrain-{target}:{TAG}"]).stdout)
        built[target] = {"image": f"fedbrain-{target}:{TAG}", "seconds": round(time.time() - started),
                         "size_mb": round(size / 1e6)}
    print("\nimages:", json.dumps(built))
    return built


def test_the_images_run_the_installed_fedbrain_as_uid_1000(images):
    for target, info in images.items():
        out = _run([*PODMAN, "run", "--rm", *LIMITS, info["image"], "sh", "-c", "id -u; fedbrain --version; "
                    "python3 -c 'import torch, nvflare, monai, tenseal, opacus; print(torch.__version__)'"]).stdout
        uid, version, torch = out.strip().splitlines()[:3]
        assert uid == str(UID) and "fedbrain" in out and torch.startswith("2.13.0"), out


#: The site started from its Kubernetes chart (`fedbrain kit k8s`) instead of `podman run`.
CHART_SITE = "hospital-c"


def _play_chart(site: str, kit: Path, image: str, data: Path, work: Path) -> tuple[list[str], str, dict]:
    """Run a site from its chart with `podman kube play`: the rendered Deployment and workspace claim as they are,
    except the Secret volume (podman 4.3's kube play crashes on Secret volumes with items) and the data claim,
    which become host folders holding the same files. Returns (the command that takes it down, the container's
    name, the environment podman needs)."""
    import helm_python as helm
    import yaml
    from test_k8s import secret_volume  # tests/: the kubelet's Secret volume layout

    from fedbrain.ops.k8s import prepare_chart

    chart = prepare_chart(kit, work / "chart-out", image=f"localhost/{image}", data_claim=f"{site}-data")
    with helm.Chart.load(str(chart.chart)) as loaded:
        objects = [d for t in loaded.render({}, name=chart.release, namespace="default").values()
                   for d in yaml.safe_load_all(t) if d]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    claims = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    spec = deployment["spec"]["template"]["spec"]
    for volume in spec["volumes"]:
        if volume["name"] == "kit-secret":
            layout = secret_volume(yaml.safe_load(chart.secret.read_text()), volume["secret"]["items"],
                                   work / "secret-volume", group=UID)
            volume.pop("secret")
            volume["hostPath"] = {"path": str(layout), "type": "Directory"}
        elif volume["name"] == "data":
            volume.pop("persistentVolumeClaim")
            volume["hostPath"] = {"path": str(data), "type": "Directory"}
    played = work / "play.yaml"
    played.write_text(yaml.safe_dump_all([*claims, deployment], sort_keys=False))
    conf = work / "containers.conf"  # kube play takes no --ulimit or --cgroup-manager: the same settings, as config
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=10000:10000", "nproc=1000:1000"]\n'
                    '[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    _run(["podman", "kube", "play", "--network", "host", str(played)], env=env)
    return ["podman", "kube", "down", str(played)], f"{deployment['metadata']['name']}-pod-0-fedbrain", env


@pytest.fixture(scope="module")
def consortium(images, tmp_path_factory):
    from deployment import Deployment
    from fedbrain.fl.site import write_site_config
    from fedbrain.ops.k8s import server_storage_root
    from fedbrain.synthetic.cohort import synthesize_consortium

    root = tmp_path_factory.mktemp("containers")
    dep = Deployment(root)
    dep.provision()
    data = root / "data"
    synthesize_consortium(data, sites=len(dep.sites), cases=6, seed=3, site_names=dep.sites, progress=False)
    for site in dep.sites:
        write_site_config(dep.kit(site), data / site / "datalist.json", num_threads=1, min_validation_cases=1)
    server = next(p["name"] for p in dep.project["participants"] if p["type"] == "server")
    storage = Path(server_storage_root(dep.kit(server)))  # the trial's job store, under the test folder
    for path in (dep.kits, data, storage):
        path.mkdir(exist_ok=True)
        shutil.chown(path, UID, UID)
        for p in path.rglob("*"):  # the kits' owner becomes the containers' user (docs/hospital-it.md)
            os.chown(p, UID, UID, follow_symlinks=False)
    names, played = [], None
    try:
        for name, image in [(server, images["server"]["image"])] + [(s, images["site"]["image"]) for s in dep.sites
                                                                     if s != CHART_SITE]:
            workspace = root / "ws" / name
            workspace.mkdir(parents=True)
            shutil.chown(workspace, UID, UID)
            container = f"fedbrain-test-{name}"
            subprocess.run([*PODMAN, "rm", "-f", container], capture_output=True)
            # As docker/compose.yml: the kit read-only at /kit, a writable workspace, data read-only.
            _run([*PODMAN, "run", "-d", "--name", container, "--network", "host", *LIMITS,
                  "-v", f"{dep.kit(name)}:/kit:ro", "-v", f"{workspace}:/workspace",
                  "-v", f"{data}:{data}:ro", "-v", f"{storage}:{storage}", image])
            names.append(container)
        down, container, kube_env = _play_chart(CHART_SITE, dep.kit(CHART_SITE), images["site"]["image"],
                                                data / CHART_SITE, root / "k8s")
        played = (down, kube_env)
        names.append(container)
        dep.wait_for_sites(dep.sites, timeout=300)
        yield dep, root, names
    finally:
        if played:
            (root / f"{names[-1]}.log").write_text(
                subprocess.run([*PODMAN, "logs", names[-1]], capture_output=True, text=True).stdout)
            subprocess.run(played[0], capture_output=True, env=played[1])
            subprocess.run([*PODMAN, "volume", "rm", "-f", f"{CHART_SITE}-workspace"], capture_output=True)
            names = names[:-1]
        for container in names:
            (root / f"{container}.log").write_text(
                subprocess.run([*PODMAN, "logs", container], capture_output=True, text=True).stdout)
            subprocess.run([*PODMAN, "rm", "-f", "-t", "10", container], capture_output=True)


def test_a_containerised_consortium_completes_an_encrypted_job(consortium):
    from fedbrain.jobs.segmentation import export
    from fedbrain.poc.runner import submit_and_wait
    from fedbrain.report.job_report import find_workspace
    from fedbrain.tasks.segmentation import SegmentationConfig

    dep, root, names = consortium
    config = SegmentationConfig(rounds=2, epochs_per_round=1, max_steps=2, min_clients=len(dep.sites), he=True)
    job = export(config, root / "jobs")
    meta, result = submit_and_wait(dep, job, rounds=2, result_dir=root / "result")
    assert meta["status"] == "FINISHED:COMPLETED", meta
    workspace = find_workspace(result)
    rounds = [json.loads(line) for line in (workspace / "he_aggregation.jsonl").read_text().splitlines()]
    assert [(r["round"], r["updates"], r["trained"]) for r in rounds] == [(0, 3, 3), (1, 3, 3)], rounds
    received = [json.loads(line) for line in (workspace / "received_updates.jsonl").read_text().splitlines()]
    assert sorted((u["round"], u["site"]) for u in received) == sorted((r, s) for r in (0, 1) for s in dep.sites)
    assert all(p["dtype"] == "CKKSVector" for u in received for p in u["params"].values())  # ciphertext only
    participants = [n.removeprefix("fedbrain-test-") for n in names[:-1]] + [CHART_SITE]
    for container, name in zip(names, participants):
        res = _run([*PODMAN, "logs", container])
        logs = res.stdout + res.stderr
        assert f"Site check: {name}" in logs and "signed manifest of" in logs, logs[-2000:]  # the entry point's check
        _run([*PODMAN, "exec", container, "healthcheck.sh"])  # FLARE's process is alive
        flare_maps = 'cat "/proc/$(cat "${NVFL_WORKSPACE:-/workspace}/pid.fl")/maps"'
        maps = _run([*PODMAN, "exec", container, "sh", "-c", flare_maps]).stdout
        assert "libjemalloc.so.2" in maps, f"{name}: FLARE runs without jemalloc"  # the image's preload took


def _site_rows(result: Path) -> list[dict]:
    from fedbrain.report.job_report import find_workspace

    lines = (find_workspace(result) / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    return [{s["name"]: {m["name"]: m["value"] for m in s["metrics"]} for s in json.loads(line)["sites"]}
            for line in lines]


def test_a_restarted_site_container_keeps_counting_its_privacy_budget(consortium):
    """In a container FLARE copies the kit afresh at every start: the ledger's head record must outlive that, or a
    restarted site refuses every DP job as a tampered ledger (the bug this test was written for)."""
    from fedbrain.contracts import DP_EPSILON_SPENT, DP_WITHHELD, TRAIN_STEPS
    from fedbrain.fl.site import write_site_config
    from fedbrain.jobs.segmentation import export
    from fedbrain.poc.runner import submit_and_wait
    from fedbrain.tasks.segmentation import SegmentationConfig

    dep, root, _ = consortium
    site, container = "hospital-a", "fedbrain-test-hospital-a"
    datalist = root / "data" / site / "datalist.json"
    config = write_site_config(dep.kit(site), datalist, num_threads=1, min_validation_cases=1,
                               dp_budget={"epsilon": 1e6, "delta": 1e-5})  # a budget: every release is recorded
    os.chown(config, UID, UID)
    workspace = root / "ws" / site
    spent = []

    def registrations() -> int:
        res = _run([*PODMAN, "logs", container])
        return (res.stdout + res.stderr).count(f"Successfully registered client:{site}")

    for n in (1, 2):
        before = registrations()
        asked = time.monotonic()
        _run([*PODMAN, "restart", "-t", "40", container])  # the kit (and local/) copied in afresh
        # The entry point passes SIGTERM on to FLARE: without that, podman waits out the 40 s before it kills.
        assert time.monotonic() - asked < 20, f"podman restart took {time.monotonic() - asked:.0f} s"
        deadline = time.time() + 300  # the server still lists the site from before: wait for it to register again
        while registrations() <= before:
            assert time.time() < deadline, f"{site} did not register again within 300 s of its restart"
            time.sleep(3)
        # Plaintext DP: hospital-c (scope `encrypted`) refuses it, and the round policy goes on with the other two.
        job = export(SegmentationConfig(name=f"container_dp_{n}", rounds=1, epochs_per_round=1, max_steps=2,
                                        min_clients=2, dp_noise_multiplier=1.0, dp_delta=1e-5), root / f"dp_jobs{n}")
        meta, result = submit_and_wait(dep, job, rounds=1, result_dir=root / f"dp_result{n}")
        assert meta["status"] == "FINISHED:COMPLETED", meta
        mine = _site_rows(result)[0][site]
        assert mine[TRAIN_STEPS] > 0 and DP_WITHHELD not in mine, mine  # trained, not refused as tampered
        spent.append(mine[DP_EPSILON_SPENT])
        assert (workspace / "privacy_ledger_head.json").is_file()  # beside the ledger, not in the kit's copy
        assert not (workspace / "kit" / "local" / "privacy_ledger_head.json").exists()
    assert spent[1] > spent[0]  # the second job went on from the first one's epsilon
    ledger = [json.loads(line) for line in (workspace / "privacy" / "ledger.jsonl").read_text().splitlines()]
    assert len({e.get("job_id") for e in ledger if e.get("job_id")}) == 2, ledger
