"""Networks. Each task config describes its network once as a spec (class path + arguments);
:func:`instantiate` builds it, and FLARE's server persistor builds the same spec, so the
server's initial model and every site's model are one description."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the specs stay importable without torch
    from torch import nn


def instantiate(spec: dict) -> nn.Module:
    """``class_path(**args)``, as FLARE's ``PTFileModelPersistor`` does with a model dict."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**spec["args"])
