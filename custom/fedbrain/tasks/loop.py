"""The one training loop, shared by both tasks, by the centralized baseline and by FL sites.

A task subclasses :class:`Trainer` and says only what differs: how it loads cases, its
transforms, the loss of one batch (:meth:`Trainer.loss_terms`), its optimizer and how it
validates. Everything per step that is not the task's own (the FedProx term, SCAFFOLD's
correction, DP-SGD (:mod:`fedbrain.privacy.dpsgd`), soon fault handling) is a
:class:`TrainingHook`: written once, used by both tasks. The model is passed to each call rather than owned, because an FL site
loads new global weights into it every round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from monai.data import DataLoader, MetaTensor
from monai.utils import set_determinism
from torch import nn

from fedbrain.contracts import DATA_COUNTS, TRAIN_LOSS
from fedbrain import terminal

logger = logging.getLogger("fedbrain")


def plain(x) -> torch.Tensor:
    """Drop MONAI metadata before the network: plain tensors are faster and what Opacus expects."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


#: The layout 5D tensors (3D convolutions' weights and inputs) train in on a CPU: oneDNN's 3D convolutions run
#: 1.3-1.6x faster channels-last, and only when both the weights and the input are (docs/maintainers.md). Weights
#: go back to the usual layout when ``train()`` returns: what a site sends, saves or validates with is unchanged.
CPU_TRAINING_LAYOUT = torch.channels_last_3d


def set_layout(model: nn.Module, layout: torch.memory_format) -> None:
    """Put ``model``'s 5D parameters in ``layout`` in place (the same parameter objects: an optimizer keeps them)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 5 and not p.is_contiguous(memory_format=layout):
                p.data = p.data.contiguous(memory_format=layout)


def in_layout(batch: dict, layout: torch.memory_format) -> dict:
    """``batch`` with its 5D tensors in ``layout`` (values unchanged)."""
    return {k: v.contiguous(memory_format=layout) if isinstance(v, torch.Tensor) and v.dim() == 5 else v
            for k, v in batch.items()}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TrainingHook:
    """Per-step behaviour that is not the task's: an extra loss term and/or work after each step;
    a hook may also wrap the model, optimizer and batches of one ``train()`` call (DP-SGD does)."""

    #: Name of the loss term this hook adds (reported as the mean over steps), or None.
    term: str | None = None

    def wrap(self, model: nn.Module, optimizer, loader, hooks: Sequence["TrainingHook"]) -> tuple:
        """``(model, optimizer, loader)`` this call trains with; ``hooks`` are all of the call's hooks."""
        return model, optimizer, loader

    def unwrap(self) -> dict:
        """End of the call: undo :meth:`wrap`; returns metrics added to ``train()``'s result."""
        return {}

    def backward(self, loss_of: Callable[[dict], dict], batch: dict) -> dict | None:
        """Compute the step's gradients itself (DP-SGD's per-sample gradients by vmap): return the batch's loss terms, or
        None to leave the backward pass to the loop. ``loss_of(batch)`` is the task's loss terms of a batch."""
        return None

    def empty_step(self, model: nn.Module) -> None:
        """Before a step on an empty batch (only a hook whose loader can yield one needs this)."""
        return None

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, step: int, loss: float) -> None:
        return None


def apply_trainable_part(model: nn.Module, config) -> list[str]:
    """Freeze every parameter outside the part that trains under ``config`` (``dp_part`` under DP-SGD,
    all otherwise): frozen parameters get no gradient, no per-sample gradient and no noise, and stay as
    the model they came with. Returns the trained names."""
    names = [n for n, _ in model.named_parameters()]
    keep = set(config.trainable_names(names))
    if not keep:
        raise ValueError(f"dp_part {config.trained_part!r} names no parameter of this network")
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return [n for n in names if n in keep]


class FedProx(TrainingHook):
    """FedProx: ``mu/2 * sum ||w - w_global||^2`` over the parameters that are federated.

    Personal parameters (``exclude``) are never averaged, so pulling them towards a global
    copy would be wrong. ``global_params`` maps state_dict names to tensors or numpy arrays
    (what FLARE delivers); names it lacks are ignored.
    """

    term = "prox_loss"

    def __init__(self, global_params: Mapping, mu: float, device, exclude: Sequence[str] = ()):
        self.mu = float(mu)
        self.exclude = set(exclude)
        self.global_params = {k: (v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))).to(device)
                              for k, v in global_params.items()}

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        return proximal_term(model, self.global_params, self.mu, self.exclude)


def proximal_term(model: nn.Module, global_params: Mapping, mu: float, exclude=()) -> torch.Tensor:
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for name, p in model.named_parameters():
        if not p.requires_grad or name in exclude:
            continue
        # An Opacus-wrapped model names its parameters "_module.<name>"; FLARE's do not.
        key = name if name in global_params else name.removeprefix("_module.")
        if key not in global_params or key in exclude:
            continue
        g = torch.as_tensor(global_params[key], dtype=p.dtype, device=p.device)
        total = total + (p - g).pow(2).sum()
    return 0.5 * mu * total


class Trainer:
    """Data, loss and optimizer of one site (or of the central baseline), and the loop.

    The optimizer persists across ``train()`` calls: ``load_state_dict`` keeps the same
    parameter objects, so its moments carry on; a *different* model object gets a new
    optimizer with the old state transferred.
    """

    #: Validation batch size (whole volumes for segmentation: 1).
    val_batch_size: int = 1
    #: The validation metric that picks the best model (higher is better).
    key_metric: str = ""

    def __init__(self, train_cases: Sequence[dict], val_cases: Sequence[dict], config, *, progress: bool = False):
        self.config = config
        self._apply_threads()
        set_determinism(seed=config.seed)
        self.device = resolve_device(config.device)
        # DP-SGD clips per-sample gradients itself; a loss scaler's skipped steps would break its accounting.
        self.use_amp = bool(config.amp and self.device.type == "cuda" and not config.dp)
        train_transform, val_transform = self.transforms(True), self.transforms(False)
        self.train_ds, train_skipped = self.load_cases(train_cases, train_transform, progress=progress)
        self.val_ds, val_skipped = self.load_cases(val_cases, val_transform, progress=progress)
        self.skipped = train_skipped + val_skipped
        if self.train_ds.transform is not None:
            self.train_ds.transform.set_random_state(seed=config.seed)
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            self.train_ds,
            batch_size=config.batch_size,
            shuffle=len(self.train_ds) > 0,  # RandomSampler refuses an empty dataset
            num_workers=config.num_workers,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(config.seed),
            persistent_workers=config.num_workers > 0,
        )
        self.val_loader = DataLoader(self.val_ds, batch_size=self.val_batch_size, num_workers=config.num_workers,
                                     pin_memory=pin)
        self.optimizer: torch.optim.Optimizer | None = None
        self._opt_params: list = []
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.total_steps = 0
        self.last_step_losses: list[float] = []
        #: The DP-SGD hook when the config asks for DP (set by fedbrain.privacy.dpsgd.DPSGD.attach).
        self.privacy: TrainingHook | None = None

    # ------------------------------------------------------------------ what a task says
    def transforms(self, train: bool):
        raise NotImplementedError

    def load_cases(self, cases, transform, *, progress: bool):
        """``(dataset, skipped)``: bad cases skipped and named, never fatal."""
        raise NotImplementedError

    def loss_terms(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The task's own loss of one batch, as named terms (summed into the step's loss)."""
        raise NotImplementedError

    def validate(self, model: nn.Module, **kwargs) -> dict:
        raise NotImplementedError

    def _new_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def data_summary(self) -> dict:
        return dict(zip(DATA_COUNTS, (len(self.train_ds), len(self.val_ds), len(self.skipped))))

    def training_case_ids(self) -> list[str]:
        """The case IDs this trainer trains on (what the site's privacy ledger keys its patients by)."""
        return list(self.train_ds.case_ids)

    def personal_parameter_names(self, model: nn.Module) -> list[str]:
        """state_dict keys that stay at the site (none unless the task has a personal part)."""
        return []

    def summary_line(self, record: dict) -> str:
        return f"loss {record[TRAIN_LOSS]:.4f}"

    # ------------------------------------------------------------------ shared
    def build_model(self) -> nn.Module:
        """The network the config describes (same spec as the server's initial model)."""
        return self.config.build_model()

    def _apply_threads(self) -> None:
        """Re-applied on every call: the setting is process-wide and others may change it."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)

    def _optimizer_for(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        same = len(params) == len(self._opt_params) and all(a is b for a, b in zip(params, self._opt_params))
        if self.optimizer is None or not same:
            old = self.optimizer
            self.optimizer = self._new_optimizer(params)
            if old is not None:
                try:  # a new model object of the same architecture: keep the moments
                    self.optimizer.load_state_dict(old.state_dict())
                except (ValueError, RuntimeError, KeyError):
                    logger.info("Model changed shape; starting a fresh optimizer")
            self._opt_params = params
        return self.optimizer

    def round_steps(self, epochs: int | None = None) -> int:
        """Optimizer steps of one ``train(epochs=...)`` call (default ``config.epochs_per_round``,
        capped by ``config.max_steps``): what a round costs, e.g. in privacy."""
        n_epochs = self.config.epochs_per_round if epochs is None else epochs
        steps = n_epochs * len(self.train_loader)
        return min(steps, self.config.max_steps) if self.config.max_steps is not None else steps

    def training_layout(self) -> torch.memory_format | None:
        """The layout the network trains in: :data:`CPU_TRAINING_LAYOUT` on a CPU, as it is elsewhere (the GPU
        paths have not been measured with it)."""
        return CPU_TRAINING_LAYOUT if self.device.type == "cpu" else None

    def _hooks_backward(self, net: nn.Module, batch: dict, hooks: Sequence[TrainingHook]) -> dict | None:
        """The loss terms of the first hook that takes the backward pass itself, or None if none does."""
        for hook in hooks:
            parts = hook.backward(lambda b: self.loss_terms(net, b), batch)
            if parts is not None:
                return parts
        return None

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()

    # ------------------------------------------------------------------ the loop
    def train(
        self,
        model: nn.Module,
        *,
        epochs: int | None = None,
        steps: int | None = None,
        global_params: Mapping | None = None,
        hooks: Sequence[TrainingHook] = (),
        progress: bool = False,
        on_step: Callable[[int, float], None] | None = None,
    ) -> dict:
        """Train in place for ``steps`` optimizer steps, or ``epochs`` passes (default
        ``config.epochs_per_round``, capped by ``config.max_steps``).

        With ``global_params`` (the global model of this round) and the config's algorithm
        FedProx, the proximal term is added (personal parameters excluded). ``hooks`` add
        loss terms and after-step work; with DP on in the config, :attr:`privacy` (the DP-SGD
        hook) is always one of them and its metrics join the result. Returns ``train_loss`` (mean total loss per step),
        the mean of every named term (e.g. ``ce_loss``, ``prox_loss``), ``steps`` (optimizer
        steps actually taken: what FedAvg weights by), ``epochs`` and ``train_seconds``.
        ``on_step(step, loss)`` gets the trainer's running step count (a TensorBoard step).
        The model is moved to the trainer's device and left there.
        """
        if epochs is not None and steps is not None:
            raise ValueError("give epochs or steps, not both")
        hooks = list(hooks)
        if global_params is not None and self.config.uses_fedprox:
            hooks.append(FedProx(global_params, self.config.fedprox_mu, self.device,
                                 exclude=self.personal_parameter_names(model)))
        if self.config.dp:
            if self.privacy is None:
                raise RuntimeError("the config turns DP-SGD on but no DP-SGD hook is attached: "
                                   "call fedbrain.privacy.dpsgd.DPSGD.attach(trainer) first")
            hooks.append(self.privacy)
        batches_per_epoch = len(self.train_loader)
        if steps is None:
            steps = self.round_steps(epochs)
        self.last_step_losses = []
        if batches_per_epoch == 0 or steps <= 0:
            if batches_per_epoch == 0:
                logger.warning("No training cases left (%d skipped); not training", len(self.skipped))
            return {TRAIN_LOSS: math.nan, "steps": 0, "epochs": 0.0, "train_seconds": 0.0}

        self._apply_threads()
        model.to(self.device)
        layout = self.training_layout()
        if layout is not None:
            set_layout(model, layout)
        model.train()
        apply_trainable_part(model, self.config)
        net, optimizer, loader = model, self._optimizer_for(model), self.train_loader
        for hook in hooks:
            net, optimizer, loader = hook.wrap(net, optimizer, loader, hooks)
        losses, terms, taken, seen = [], {}, 0, 0
        start = time.perf_counter()
        try:
            with maybe_progress(progress, "Training", steps) as advance:
                while seen < steps:
                    for batch in loader:
                        if seen >= steps:
                            break
                        optimizer.zero_grad(set_to_none=True)
                        if batch and layout is not None:
                            batch = in_layout(batch, layout)
                        if batch:
                            parts = self._hooks_backward(net, batch, hooks)
                            if parts is not None:  # a hook took the backward pass; other terms are reported
                                with torch.no_grad():
                                    parts.update({h.term: h.loss_term(model) for h in hooks if h.term is not None})
                                loss, scale = sum(parts.values()), None
                            else:
                                with self._autocast():
                                    parts = self.loss_terms(net, batch)
                                for hook in hooks:
                                    if hook.term is not None:
                                        parts[hook.term] = hook.loss_term(model)
                                loss = sum(parts.values())
                                scale = self.scaler.get_scale() if self.use_amp else None
                                self.scaler.scale(loss).backward()
                        else:  # Poisson sampling (DP-SGD) drew no case: a noise-only step, no loss
                            parts, loss, scale = {}, None, None
                            for hook in hooks:
                                hook.empty_step(model)
                        self.scaler.step(optimizer)
                        self.scaler.update()
                        # With AMP an overflowing step is skipped (and the scale lowered).
                        if not self.use_amp or self.scaler.get_scale() >= scale:
                            taken += 1
                        seen += 1
                        value = float(loss.detach()) if loss is not None else math.nan
                        if loss is not None:
                            losses.append(value)
                        for name, part in parts.items():
                            terms.setdefault(name, []).append(float(part.detach()))
                        for hook in hooks:
                            hook.after_step(model, self.total_steps + seen, value)
                        if on_step is not None:
                            on_step(self.total_steps + seen, value)
                        advance(value)
        finally:
            extra = {}
            for hook in reversed(hooks):
                extra.update(hook.unwrap())
            if layout is not None:
                set_layout(model, torch.contiguous_format)
        seconds = time.perf_counter() - start
        self.total_steps += taken
        self.last_step_losses = losses
        return {
            TRAIN_LOSS: float(np.mean(losses)) if losses else math.nan,
            **{name: float(np.mean(values)) for name, values in terms.items()},
            "steps": taken,
            "epochs": seen / batches_per_epoch,
            "train_seconds": seconds,
            **extra,
        }


def train_central(
    trainer: Trainer,
    *,
    epochs: int,
    model: nn.Module | None = None,
    log_dir: str | None = None,
    progress: bool = True,
    best_path: str | None = None,
    validate_every: int = 1,
) -> list[dict]:
    """Centralized training of pooled cases with the same trainer, one validation per epoch (or every
    ``validate_every`` epochs and after the last: a pretraining run only needs its final score).

    Returns one dict per epoch: ``epoch``, the ``train()`` and ``validate()`` metrics and
    ``data_summary()``'s counts.
    With ``log_dir`` the scalars go to TensorBoard with the epoch as step. Pass ``model``
    to keep (and save) the trained network; otherwise one is built from the config. With
    ``best_path`` the weights of the epoch with the best ``trainer.key_metric`` are saved
    there (that epoch's record gets ``best: True``).
    """
    if epochs < 1 or validate_every < 1:
        raise ValueError(f"epochs and validate_every must be >= 1, got {epochs} and {validate_every}")
    summary = {k: v for k, v in trainer.data_summary().items() if isinstance(v, (int, float))}
    model = model if model is not None else trainer.build_model()
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
    console = None
    if progress:

        console = terminal.console(stderr=True)
    history = []
    try:
        for epoch in range(1, epochs + 1):
            record = {"epoch": epoch, **trainer.train(model, epochs=1, progress=progress)}
            validated = epoch % validate_every == 0 or epoch == epochs
            if validated:
                record.update(trainer.validate(model))
            record.update(summary)
            score = record.get(trainer.key_metric, math.nan)
            if best_path is not None and score == score and score > max(
                    (h[trainer.key_metric] for h in history if h.get("best")), default=-math.inf):
                torch.save(model.state_dict(), best_path)
                record["best"] = True
            history.append(record)
            if writer is not None:
                for name, value in record.items():
                    if name != "epoch" and isinstance(value, (int, float)):
                        writer.add_scalar(name, value, epoch)
                writer.flush()
            line = f"epoch {epoch}/{epochs}  {record['steps']} steps {record['train_seconds']:.0f}s  " + \
                (trainer.summary_line(record) if validated else Trainer.summary_line(trainer, record))
            if console is not None:
                console.print(line)
            else:
                logger.info(line)
    finally:
        if writer is not None:
            writer.close()
    return history


class maybe_progress:
    """A rich progress bar when asked, else a no-op; yields ``advance(loss_or_None)``."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda _value: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total, info="")

        def advance(value):
            info = f"loss {value:.4f}" if value is not None else ""
            self.bar.update(task, advance=1, info=info)

        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
