"""What a site exchanges with the server: FLARE payloads <-> torch state dicts, weight
differences, and SCAFFOLD's control variates (a training hook of the one loop)."""

from __future__ import annotations

import numpy as np
import torch

from fedbrain.tasks.loop import TrainingHook


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


class SharedScaffold(TrainingHook):
    """SCAFFOLD control variates (FLARE's ``PTScaffoldHelper``) over the *shared* modules only.

    Why not the whole model: a control difference is ``(w_global - w_local) / (steps * lr)``
    minus known terms, i.e. the local update in disguise, and it travels in the result's meta,
    which ExcludeVars does not filter. Restricting the controls to the modules that are
    federated anyway keeps a personal head's update on site. The helper works on a
    ``ModuleDict`` view of those modules, whose parameter names equal the full model's.

    Per round: ``begin_round(global controls from meta)`` -> ``after_step()`` after every
    optimizer step -> ``end_round(global_model)`` returns the control difference to send.
    """

    def __init__(self, model: torch.nn.Module, lr: float, exclude: tuple[str, ...] = ("head",)):
        from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

        self.view = torch.nn.ModuleDict(
            {name: child for name, child in model.named_children() if name not in exclude and child is not None})
        self.lr = float(lr)
        self.helper = PTScaffoldHelper()
        self.helper.init(self.view)
        self._c_global = self._c_local = None

    def names(self) -> list[str]:
        return [name for name, _ in self.view.named_parameters()]

    def begin_round(self, global_controls: dict | None) -> None:
        if global_controls:
            self.helper.load_global_controls(global_controls)
        self._c_global, self._c_local = self.helper.get_params()

    def after_step(self, *_) -> None:
        """Correct the step just taken by ``c_global - c_local`` (usable as a trainer ``on_step``)."""
        self.helper.model_update(self.view, self.lr, self._c_global, self._c_local)

    def end_round(self, global_model: torch.nn.Module) -> dict:
        """New local controls from this round's drift; returns their change (numpy, per name)."""
        if self.helper.cnt == 0:  # nothing trained (e.g. no cases): no drift to report
            return {name: np.zeros(tuple(p.shape), np.float32) for name, p in self.view.named_parameters()}
        self.helper.terms_update(self.view, self.lr, self._c_global, self._c_local, global_model)
        return self.helper.get_delta_controls()
