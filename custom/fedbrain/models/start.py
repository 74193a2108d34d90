"""A public starting model: the weights ``fedbrain pretrain`` wrote and the record of where they came from.

Two files side by side: ``start.pt`` (a plain state_dict, loadable with ``weights_only``: FLARE's
server persistor reads it as the job's initial global model) and ``start.json`` (its provenance:
task, network spec, the public data it saw, the settings, and the weights' sha256). A job names a
start by that hash, never by a path (:func:`bind`): the exported job carries both files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

#: File names of a start inside an exported job's server app (``config/``).
JOB_START_WEIGHTS = "fedbrain_start.pt"
JOB_START_RECORD = "fedbrain_start.json"
#: How a job's config names the start it carries.
HASH_PREFIX = "sha256:"


class StartModelError(ValueError):
    """A start model that cannot be used; the message names the file and why, in one line."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _comparable(spec: dict) -> dict:
    """A network spec without its init seed (the start's weights replace the initial draw)."""
    return {"class_path": spec["class_path"], "args": {k: v for k, v in spec["args"].items() if k != "init_seed"}}


@dataclass
class StartModel:
    weights: Path
    record: dict

    @property
    def sha256(self) -> str:
        return self.record["sha256"]

    @property
    def reference(self) -> str:
        """What a job's config says in ``start_model``: the hash, not the admin's path."""
        return HASH_PREFIX + self.sha256

    def state_dict(self) -> dict:
        import torch

        return torch.load(self.weights, map_location="cpu", weights_only=True)

    def check_spec(self, config) -> None:
        """Refuse a config whose network is not the one the start was trained as."""
        if self.record.get("task") != config.TASK:
            raise StartModelError(f"{self.weights}: a start for {self.record.get('task')!r}, not {config.TASK!r}")
        if _comparable(self.record["model_spec"]) != _comparable(config.model_spec()):
            raise StartModelError(f"{self.weights}: trained as another network than this job's settings build "
                                  f"(compare model_spec in {self.weights.with_suffix('.json').name} with the job's); "
                                  f"use the settings it was pretrained with")


def load(path) -> StartModel:
    """The start at ``path`` (its ``.pt``, or the folder holding ``start.pt``), hash verified."""
    path = Path(path)
    weights = path / "start.pt" if path.is_dir() else path
    record_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise StartModelError(f"{weights}: no start model there (write one with `fedbrain pretrain`)")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as e:
        raise StartModelError(f"{record_path}: the start's provenance record is missing or unreadable ({e})") from None
    actual = sha256_of(weights)
    if record.get("sha256") != actual:
        raise StartModelError(f"{weights}: sha256 {actual[:12]}... is not the {str(record.get('sha256'))[:12]}... "
                              f"its record names: the weights were changed or belong to another start")
    return StartModel(weights, record)


def save(state_dict: dict, out_dir, record: dict) -> StartModel:
    """Write ``start.pt`` and ``start.json`` (``record`` plus the weights' sha256) into ``out_dir``."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "start.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, weights)
    record = {**record, "sha256": sha256_of(weights)}
    (out_dir / "start.json").write_text(json.dumps(record, indent=2) + "\n")
    return StartModel(weights, record)


def bind(config):
    """``(config naming the start by hash, StartModel)`` for a config whose ``start_model`` is a path;
    ``(config, None)`` without one. The network the config builds must be the start's. A config without its own
    ``dp_max_grad_norm`` gets the start's public clip for the part it trains (:mod:`fedbrain.privacy.clip`)."""
    if config.start_model is None:
        return config, None
    if config.start_model.startswith(HASH_PREFIX):  # the job would claim a start it does not carry
        raise StartModelError(f"start_model {config.start_model[:19]}...: a job is given the start's file (the "
                              f"path of its start.pt), not its hash; the exported job carries the file")
    start = load(config.start_model)
    bound = config.replace(start_model=start.reference)
    start.check_spec(bound)
    if bound.dp_max_grad_norm is None:  # the sites cannot read the start's record: the job carries its clip
        from fedbrain.privacy.clip import clip_from_record

        bound = bound.replace(dp_max_grad_norm=clip_from_record(start.record, bound))
    return bound, start


def _server_app_of_its_own(job_folder: Path, sites) -> None:
    """A job whose one app goes to every participant (``@ALL``) gets a server app of its own and names its
    sites: the start must not travel to the sites (they never load it, and a job message of over 4 MB
    closes FLARE's HTTP connection: the sites then time out deploying, FINISHED:FAILED_TO_RUN)."""
    import shutil

    meta_path = job_folder / "meta.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    deploy = meta.get("deploy_map", {})
    if len(deploy) != 1 or list(deploy.values())[0] != ["@ALL"]:
        return
    if not sites:
        raise StartModelError(f"{job_folder}: a job carrying a start model names its sites (--sites ...): the start "
                              f"goes to the server only, so the job cannot deploy one app to @ALL")
    app = job_folder / next(iter(deploy))
    server_app = job_folder / "app_server"
    shutil.copytree(app, server_app)
    (server_app / "config" / "config_fed_client.json").unlink()
    (app / "config" / "config_fed_server.json").unlink()
    meta["deploy_map"] = {"app_server": ["server"], app.name: list(sites)}
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")


def ship(job_folder: Path, start: StartModel, sites=None) -> None:
    """Put the start into the server app of an exported job: FLARE's persistor loads
    ``config/fedbrain_start.pt`` as the initial global model (``APP_CKPT`` of the app's
    ``config/environment.json``), and the report reads the record beside it."""
    import shutil

    _server_app_of_its_own(Path(job_folder), sites)
    servers = sorted(Path(job_folder).glob("*/config/config_fed_server.json"))
    if not servers:
        raise StartModelError(f"{job_folder}: no server app to carry the start model")
    for server in servers:
        config_dir = server.parent
        shutil.copyfile(start.weights, config_dir / JOB_START_WEIGHTS)
        (config_dir / JOB_START_RECORD).write_text(json.dumps(start.record, indent=2) + "\n")
        env_path = config_dir / "environment.json"
        env = json.loads(env_path.read_text()) if env_path.is_file() else {}
        env["APP_CKPT"] = f"config/{JOB_START_WEIGHTS}"
        env_path.write_text(json.dumps(env, indent=2) + "\n")


def record_in_run(workspace: Path) -> dict | None:
    """The start record a server run folder carries (``app_server/config/``), or None."""
    for path in sorted(Path(workspace).glob(f"app*/config/{JOB_START_RECORD}")):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None
