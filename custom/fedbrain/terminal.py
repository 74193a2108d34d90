"""The console every fedbrain command prints through.

Rich wraps long lines at the terminal's width, and at 80 columns when stdout is not a terminal (a
pipe, a log, CI): a printed command, path or fingerprint then breaks where a newline was inserted,
and copy-paste breaks with it. ``soft_wrap`` leaves lines whole (the terminal folds them for the
eye, not in the text). Tables and progress bars still fit the width.
"""

from __future__ import annotations

from rich.console import Console


def console(**kwargs) -> Console:
    return Console(soft_wrap=True, **kwargs)
