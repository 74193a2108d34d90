"""The DP-SGD clip of a public start, chosen from public data.

Why: DP-SGD adds noise in proportion to the clip, whatever the gradients' size. A clip far above the
per-case gradient norms clips nothing and adds noise for signal that is not there; one far below
throws direction information away. The usual choice is near the median norm (Andrew et al. 2021 adapt
the clip to it). Measured on a hospital's cases it would leak something of them, so ``fedbrain
pretrain`` measures it on public cases the start never trained on (the public validation split) and
records it per trainable part in the start's record; a job from that start uses it unless the job sets
``dp_max_grad_norm`` (:func:`fedbrain.models.start.bind`). Nothing of a hospital's data is involved.
"""

from __future__ import annotations

import statistics

#: The clip when no public start says otherwise (Opacus' customary 1.0).
DEFAULT_CLIP = 1.0
#: Key of the start record holding the per-part figures.
RECORD_KEY = "public_gradient_norms"


def per_case_gradient_norms(trainer, model, part: str) -> list[float]:
    """The L2 norm of each training case's gradient over ``part`` of ``model`` (the rest frozen), one pass over
    ``trainer``'s training loader (its augmentation and crops, as training sees them). ``trainer`` is built with
    DP on (its loss is then a per-case mean); the model is left as it came (all trainable, usual layout)."""
    import torch

    from fedbrain.privacy.dpsgd import Stateless, per_sample_gradients
    from fedbrain.tasks.loop import apply_trainable_part, in_layout, set_layout

    config = trainer.config
    trainer.config = config.replace(dp_part=part)
    layout = trainer.training_layout()
    model.to(trainer.device)
    if layout is not None:
        set_layout(model, layout)
    model.train()
    norms: list[float] = []
    try:
        apply_trainable_part(model, trainer.config)
        net = Stateless(model)
        for batch in trainer.train_loader:
            if layout is not None:
                batch = in_layout(batch, layout)
            grads, _ = per_sample_gradients(lambda b: trainer.loss_terms(net, b), net, batch)
            squares = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
            norms += squares.sqrt().tolist()
    finally:
        trainer.config = config
        for p in model.parameters():
            p.requires_grad_(True)
        if layout is not None:
            set_layout(model, torch.contiguous_format)
    return norms


def summarize(norms: list[float]) -> dict:
    """The record of one part: the clip (the median norm, 2 significant digits) and the spread it came from."""
    q = statistics.quantiles(norms, n=10) if len(norms) > 1 else [norms[0]] * 9
    median = statistics.median(norms)
    return {"clip": float(f"{median:.2g}"), "median": median, "p10": q[0], "p90": q[-1], "n_cases": len(norms)}


def public_clips(trainer, model, parts) -> dict:
    """``{part: summarize(...)}`` for every part in ``parts`` (``all`` included if named)."""
    return {part: summarize(per_case_gradient_norms(trainer, model, part)) for part in parts}


def clip_from_record(record: dict | None, config) -> float | None:
    """The clip a start's record chose for the part ``config`` trains, or None: the task does not take it
    (``PUBLIC_CLIP``), or the start has no record (one written before it had)."""
    entry = ((record or {}).get(RECORD_KEY) or {}).get(config.trained_part)
    return float(entry["clip"]) if entry and config.PUBLIC_CLIP else None
