"""A hospital's personal classifier head, kept on the site's disk and never sent.

It lives in the site workspace (the folder holding the kit's startup/ and local/), not in the
job's folder, so it survives rounds, job restarts and new jobs that use the same store name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fedbrain.fl.site import site_workspace
from fedbrain.models.classifier import head_parameter_names


#: The file a site keeps its personal part in: a whole head, or (algorithm ``mixed``) a correction of the
#: federated shared head. Kept apart, so a job of one kind never loads, or overwrites, the other's.
HEAD_FILES = {False: "head.pt", True: "head_correction.pt"}


class PersonalHeadStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_site(cls, store: str, start: Path | None = None, *, correction: bool = False) -> "PersonalHeadStore":
        """The store named ``store`` (the job's name) in this site's workspace; ``correction``: the personal
        head corrects a shared one (``config.shared_head``)."""
        # Outside FLARE (tests, centralized runs) the store sits beside the caller.
        workspace = site_workspace(start) or (start or Path.cwd()).resolve()
        return cls(workspace / "personal" / store / HEAD_FILES[bool(correction)])

    def exists(self) -> bool:
        return self.path.is_file()

    def load_into(self, model: nn.Module) -> dict | None:
        """Overwrite the model's head with the stored one; returns what was stored with it
        (job, round), or None on the very first round of the very first job."""
        if not self.exists():
            return None
        stored = torch.load(self.path, map_location="cpu", weights_only=True)
        saved = stored["head"]
        names = head_parameter_names(model)
        if sorted(saved) != sorted(names):
            raise ValueError(f"{self._where()}: stored head has parameters {sorted(saved)[:3]}..., model expects {names[:3]}...")
        state = model.state_dict()
        # Check every tensor before copying any: a refused head must leave the model's head untouched.
        for k in names:
            have, want = tuple(saved[k].shape), tuple(state[k].shape)
            if have != want:
                raise ValueError(f"{self._where()}: stored head tensor {k} has shape {have}, this model expects "
                                 f"{want}: the head belongs to another model configuration; move it away to "
                                 "start a fresh head")
        for k in names:
            state[k].copy_(saved[k].to(state[k].device))
        return {k: v for k, v in stored.items() if k != "head"}

    def _where(self) -> str:
        """The store's path, with the site whose workspace holds it when it is in one."""
        workspace = site_workspace(self.path.parent)
        return f"{self.path} (site {workspace.name})" if workspace is not None else str(self.path)

    def save_from(self, model: nn.Module, **info) -> None:
        """Write atomically: a crash mid-save must not lose the previous head."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = model.state_dict()
        head = {k: state[k].detach().cpu().clone() for k in head_parameter_names(model)}
        tmp = self.path.with_suffix(".tmp")
        torch.save({"head": head, **info}, tmp)
        os.replace(tmp, self.path)
