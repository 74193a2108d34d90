"""Pieces both training loops share (segmentation and classification): device, AMP, an
optimizer that persists across FL rounds, progress bars, small conversions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from monai.data import DataLoader, MetaTensor
from monai.utils import set_determinism
from torch import nn

logger = logging.getLogger("fedbrain")


def three(v) -> tuple:
    return tuple(v) if isinstance(v, Sequence) else (v, v, v)


def plain(x) -> torch.Tensor:
    """Drop MONAI metadata before the network: plain tensors are faster and what Opacus expects."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TrainerBase:
    """Optimizer persistence and mixed precision; subclasses say which optimizer (``_new_optimizer``).

    The model is passed to each call rather than owned, because an FL site loads new global
    weights into it every round: ``load_state_dict`` keeps the same parameter objects, so the
    optimizer's moments carry on; a *different* model object gets a new optimizer with the
    old state transferred.
    """

    optimizer: torch.optim.Optimizer | None = None
    _opt_params: list = []
    use_amp: bool = False

    def _setup(self, config, load, train_cases, val_cases, train_transform, val_transform, *,
               val_batch_size: int, progress: bool) -> None:
        """What every trainer's ``__init__`` does: threads, seeds, device, AMP, the cases loaded
        once by ``load`` (bad ones skipped and kept in ``self.skipped``), loaders, optimizer state.

        ``config`` needs ``num_threads``, ``seed``, ``device``, ``amp``, ``batch_size``, ``num_workers``.
        """
        self.config = config
        self._apply_threads()
        set_determinism(seed=config.seed)
        self.device = resolve_device(config.device)
        self.use_amp = bool(config.amp and self.device.type == "cuda")
        self.train_ds, train_skipped = load(train_cases, train_transform, progress=progress)
        self.val_ds, val_skipped = load(val_cases, val_transform, progress=progress)
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
        self.val_loader = DataLoader(self.val_ds, batch_size=val_batch_size, num_workers=config.num_workers,
                                     pin_memory=pin)
        self.optimizer = None
        self._opt_params = []
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.total_steps = 0
        self.last_step_losses: list[float] = []

    def _apply_threads(self) -> None:
        """Re-applied on every call: the setting is process-wide and others may change it."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)

    def _new_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError

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

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()


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
