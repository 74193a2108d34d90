"""The two conversions a site script needs between FLARE payloads and torch state dicts.

Kept here, not in the site scripts, so every task's script stays glue only.
"""

from __future__ import annotations

import numpy as np
import torch


def state_dict_from_params(params: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """FLARE may deliver numpy arrays or tensors; give back tensors shaped and typed like the model's."""
    own = model.state_dict()
    missing = sorted(set(own) - set(params))
    if missing:
        raise KeyError(f"global model lacks {len(missing)} parameters of the local model, e.g. {missing[:3]}")
    out = {}
    for name, ref in own.items():
        value = params[name]
        tensor = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        out[name] = tensor.to(dtype=ref.dtype).reshape(ref.shape)
    return out


def weight_diff(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local update as a difference (what FedAvg with DIFF transfer expects), on CPU for transport."""
    return {k: (after[k].detach().cpu() - before[k].detach().cpu()) for k in after}
