"""The console every fedbrain command prints through.

Rich wraps long lines at the terminal's width, and at 80 columns when stdout is not a terminal (a
pipe, a log, CI): a printed command, path or fingerprint then breaks where a newline was inserted,
and copy-paste breaks with it. ``soft_wrap`` leaves lines whole (the terminal folds them for the
eye, not in the text). Tables and progress bars fit the width: a terminal's, else ``COLUMNS``, else
160 (a log or CI page is wider than 80 columns, and an 80-column site table truncates every name).
Emoji codes are off: Rich turns ``:ab:`` into an emoji, so a root CA fingerprint (``...:AB:...``) would print wrong.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

#: Width of tables when the output is not a terminal and COLUMNS is not set.
PIPE_WIDTH = 160


def console(**kwargs) -> Console:
    stream = sys.stderr if kwargs.get("stderr") else sys.stdout
    if "width" not in kwargs and "file" not in kwargs and not os.environ.get("COLUMNS") and not stream.isatty():
        kwargs["width"] = PIPE_WIDTH
    kwargs.setdefault("emoji", False)
    return Console(soft_wrap=True, **kwargs)
