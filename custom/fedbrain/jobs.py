"""Find the job definitions in the checkout's jobs/ folder (they are scripts, not package modules)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

PROJECT_ROOT = Path(__file__).resolve().parents[2]
JOBS_DIR = PROJECT_ROOT / "jobs"


def load_job_module(name: str) -> ModuleType:
    """Import jobs/<name>/job.py; its build_recipe() is the one definition of that job."""
    path = JOBS_DIR / name / "job.py"
    if not path.is_file():
        raise FileNotFoundError(f"no job definition at {path} (known: {sorted(p.parent.name for p in JOBS_DIR.glob('*/job.py'))})")
    spec = importlib.util.spec_from_file_location(f"fedbrain_job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
