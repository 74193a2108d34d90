"""Sample-level DP-SGD with Opacus, as one hook of the one training loop (both tasks,
centralized and federated).

Per step: Poisson sampling of the site's training cases (each case in a batch with
probability ``q = 1 / batches_per_epoch``), per-sample gradients clipped to
``dp_max_grad_norm`` (from a public start: its clip chosen on public data, :mod:`.clip`), Gaussian noise of
``noise_multiplier * clip`` added to
their sum. An empty Poisson batch is a noise-only step (skipping it would change the
mechanism the accountant analyses). Epsilon comes from Opacus' RDP accountant, whose
history ``[(noise, q, steps), ...]`` composes over rounds and jobs (:mod:`.budget` keeps it).

Noise and sampling draw from the operating system's random source, never from the job's
``seed``: the server knows the seed, and noise it can regenerate protects nothing.

Per-sample gradients come one of two ways (:data:`PER_SAMPLE_MODES`), the same numbers either way:
``vmap`` differentiates each case's own loss, vectorised over the batch with ``torch.func``, so PyTorch's
batched convolution kernels do the work; ``hooks`` is Opacus' GradSampleModule, which expands per-sample
gradients from each layer's activations and output gradients: for 3D convolutions that unfolds every
input patch, 2.5-5x a plain step on a CPU (docs/benchmarks.md). :func:`default_per_sample_mode` picks
by what trains.
"""

from __future__ import annotations

import os
import warnings

import torch
from opacus import GradSampleModule
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap

from fedbrain.contracts import DP_DELTA, DP_EPSILON_SPENT, DP_NOISE_MULTIPLIER
from fedbrain.privacy.accounting import ACCOUNTANT, default_delta, epsilon_of
from fedbrain.tasks.loop import TrainingHook

# With a frozen encoder (DP on a part of a public start) the first trained layer's inputs need no gradient, and
# torch says so on every step in the site's log; Opacus' per-sample gradients do not depend on it.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs since no inputs require gradients")


#: How per-sample gradients are computed (see the module docstring).
PER_SAMPLE_MODES = ("vmap", "hooks")


def default_per_sample_mode(model: nn.Module) -> str:
    """``vmap`` when a convolution trains, else ``hooks``. Opacus' hooks unfold every input patch of a
    convolution (2.5-5x a plain step here), while for linear layers they are one product per layer, where
    vmap would also vectorise the frozen trunks' forward pass (a linear head: 1.06x vs 1.36x a plain step;
    docs/benchmarks.md)."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    trains_conv = any(isinstance(m, convs) and any(p.requires_grad for p in m.parameters(recurse=False))
                      for m in model.modules())
    return "vmap" if trains_conv else "hooks"


class Stateless(nn.Module):
    """``model`` called with the parameters :func:`per_sample_gradients` differentiates (while it runs), else
    as it is. Named like Opacus' wrapper (``_module``), so code that reads parameter names reads both alike."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._module = model
        self.substitute: dict | None = None

    def forward(self, *args, **kwargs):
        if self.substitute is None:
            return self._module(*args, **kwargs)
        return functional_call(self._module, self.substitute, args, kwargs)


def per_sample_gradients(loss_of, net: Stateless, batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``({name: [n, *shape]}, mean loss terms)``: for each trainable parameter of ``net``'s model, the
    gradient of each case's own loss (``loss_of(batch)`` returns named terms, summed) in one vectorised pass.

    The batch's tensors are cut along their first axis (the size of its first tensor); anything else
    (case IDs) is passed as it is. A parameter a case's loss does not reach gets a zero gradient."""
    model = net._module
    n = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim), None)
    if n is None:
        raise ValueError("a batch without a batched tensor has no cases to differentiate")
    cut = {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in batch.items()
           if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n}
    rest = {k: v for k, v in batch.items() if k not in cut}
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    fixed = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    fixed.update(model.named_buffers())

    def one_case(params, case):
        net.substitute = {**fixed, **params}
        try:
            parts = loss_of({**rest, **{k: v.unsqueeze(0) for k, v in case.items()}})
        finally:
            net.substitute = None
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    grads, parts = vmap(grad(one_case, has_aux=True), in_dims=(None, 0), randomness="different")(trained, cut)
    return grads, {k: v.mean() for k, v in parts.items()}


def os_generator(device="cpu") -> torch.Generator:
    """A generator seeded from the OS (see the module docstring)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def validate_model(model: torch.nn.Module) -> None:
    """Raise with Opacus' reasons when per-sample gradients cannot be computed for ``model``."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError("model is not DP-SGD compatible: " + "; ".join(str(e) for e in errors))


class _EmptySafeCollate:
    """Poisson sampling may draw no case: collate that to ``{}`` (the loop takes a noise-only step)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        return self.collate(items) if items else {}


class DPSGD(TrainingHook):
    """DP-SGD for one trainer: noise fixed for the job (calibrated once to ``dp_epsilon`` over
    the planned steps, or ``dp_noise_multiplier``), the Poisson loader, and the accountant.

    ``history`` is everything this data has spent (the site loop loads earlier jobs' history
    from the site's store); ``pending`` is what was spent since the last :meth:`drain`.
    """

    def __init__(self, trainer, planned_steps: int | None = None, history=(), per_sample: str | None = None):
        if per_sample is not None and per_sample not in PER_SAMPLE_MODES:
            raise ValueError(f"per_sample must be one of {PER_SAMPLE_MODES}, got {per_sample!r}")
        self.per_sample = per_sample  # None: chosen by what trains, when the loop wraps the model
        config = trainer.config
        self.n_train = len(trainer.train_ds)
        self.steps_per_epoch = len(trainer.train_loader)
        self.max_grad_norm = config.dp_clip()
        self.delta = float(config.dp_delta) if config.dp_delta is not None else default_delta(self.n_train)
        self.sample_rate = 1.0 / self.steps_per_epoch if self.steps_per_epoch else 0.0
        self.expected_batch_size = max(1, int(round(self.n_train * self.sample_rate)))
        self.target_epsilon = config.dp_epsilon
        self.planned_steps = planned_steps if planned_steps is not None else config.rounds * trainer.round_steps()
        self.noise_multiplier = self._noise(config)
        self.history: list[tuple] = [tuple(h) for h in history]
        self.job_history: list[tuple] = []  # this job's (this trainer's) steps only: the dp_epsilon cap
        self.pending: list[tuple] = []
        self._loader = None
        if self.n_train:
            self._loader = self._poisson_loader(trainer.train_loader)
        self._gsm = self._stateless = self._terms = None

    @classmethod
    def attach(cls, trainer, planned_steps: int | None = None, history=(), per_sample: str | None = None) -> "DPSGD":
        """Give ``trainer`` its DP-SGD hook (its ``train()`` refuses to run DP configs without one)."""
        trainer.privacy = cls(trainer, planned_steps=planned_steps, history=history, per_sample=per_sample)
        return trainer.privacy

    def _noise(self, config) -> float:
        if config.dp_noise_multiplier is not None:
            return float(config.dp_noise_multiplier)
        if not self.n_train or not self.planned_steps:
            return 0.0  # nothing will be trained
        return float(get_noise_multiplier(target_epsilon=config.dp_epsilon, target_delta=self.delta,
                                          sample_rate=self.sample_rate, steps=self.planned_steps,
                                          accountant=ACCOUNTANT))

    def _poisson_loader(self, loader):
        from monai.data import DataLoader

        sampler = UniformWithReplacementSampler(num_samples=self.n_train, sample_rate=self.sample_rate,
                                                generator=os_generator(), steps=self.steps_per_epoch)
        return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(loader.collate_fn),
                          num_workers=loader.num_workers, pin_memory=loader.pin_memory)

    # ------------------------------------------------------------------ accounting
    def _record(self, steps: int = 1) -> None:
        entry = (self.noise_multiplier, self.sample_rate)
        for hist in (self.history, self.job_history, self.pending):
            if hist and tuple(hist[-1][:2]) == entry:
                hist[-1] = (*entry, hist[-1][2] + steps)
            else:
                hist.append((*entry, steps))

    def epsilon(self, delta: float | None = None, extra_steps: int = 0, job_only: bool = False) -> float:
        """Epsilon spent (all jobs, or this job only), optionally after ``extra_steps`` more steps."""
        hist = list(self.job_history if job_only else self.history)
        if extra_steps:
            hist.append((self.noise_multiplier, self.sample_rate, extra_steps))
        return epsilon_of(hist, self.delta if delta is None else delta)

    def would_exceed_job_epsilon(self, steps: int) -> bool:
        """Whether ``steps`` more steps would take this job past its ``dp_epsilon``."""
        return self.target_epsilon is not None and self.epsilon(extra_steps=steps, job_only=True) > self.target_epsilon

    def drain(self) -> list[tuple]:
        """The history since the last drain (for the site's store), and forget it."""
        out, self.pending = self.pending, []
        return out

    def metrics(self) -> dict:
        return {DP_EPSILON_SPENT: self.epsilon(), DP_DELTA: self.delta, DP_NOISE_MULTIPLIER: self.noise_multiplier}

    # ------------------------------------------------------------------ the hook
    def wrap(self, model, optimizer, loader, hooks):
        validate_model(model)
        # Opacus needs a per-sample gradient of every parameter in every step: no skipped streams.
        self._skipping = [m for m in model.modules() if getattr(m, "skip_unused_streams", False)]
        for m in self._skipping:
            m.skip_unused_streams = False
        if (self.per_sample or default_per_sample_mode(model)) == "hooks":
            net = self._gsm = GradSampleModule(model, loss_reduction="mean")
        else:
            net = self._stateless = Stateless(model)
        # Loss terms of other hooks (FedProx) do not depend on data: Opacus drops their gradient
        # when it replaces p.grad by the noisy sum, so it is added back after the noise, at no privacy cost.
        self._terms = [h for h in hooks if h is not self and h.term is not None]
        dp_opt = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                             expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                             generator=os_generator(next(model.parameters()).device))
        dp_opt.attach_step_hook(lambda opt: self._on_step(opt, model))
        return net, dp_opt, self._loader

    def backward(self, loss_of, batch) -> dict | None:
        """``vmap``: each case's gradient into ``p.grad_sample``, where the DP optimizer clips it."""
        if self._stateless is None:
            return None  # Opacus' hooks fill p.grad_sample during the loop's own backward pass
        grads, parts = per_sample_gradients(loss_of, self._stateless, batch)
        for name, p in self._stateless._module.named_parameters():
            if name in grads:
                p.grad_sample = grads[name]
        return parts

    def _on_step(self, optimizer, model) -> None:
        """Called by the DP optimizer after clipping and noise, before the update: count the step."""
        self._record()
        if self._terms:
            params = optimizer.params
            with torch.enable_grad():
                extra = sum(h.loss_term(model) for h in self._terms)
                grads = torch.autograd.grad(extra, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = p.grad + g

    def empty_step(self, model) -> None:
        """No case drawn: zero per-sample gradients, so the optimizer's step releases noise only."""
        for p in model.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def unwrap(self) -> dict:
        if self._gsm is not None:
            self._gsm._close()  # removes Opacus' hooks and per-sample attributes from the model
            self._gsm = None
        if self._stateless is not None:  # what the DP optimizer left on the parameters, as Opacus' _close removes
            for p in self._stateless._module.parameters():
                for attr in ("grad_sample", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
            self._stateless = None
        for m in getattr(self, "_skipping", ()):
            m.skip_unused_streams = True
        return self.metrics()
