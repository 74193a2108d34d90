"""Pretraining on public data: the starting model a consortium fine-tunes, under DP or not.

Why: sample-level DP-SGD from random weights leaves both models at chance at epsilon 8 (the noise on
each step swamps what 100 patients can teach ~1 M parameters). Started from a model trained on public
data, a hospital only has to adapt a small part to its scanners and patients, and that part trains
under DP (``dp_part``). Nothing of a hospital's patients is in the start: it saw public data only.

The centralized loop of :mod:`fedbrain.tasks.loop` trains it (same code as every other run), with
the DP-ready network (``dp_ready``) so DP and non-DP fine-tuning share the same start.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from fedbrain.models.start import StartModel, save
from fedbrain.privacy.clip import RECORD_KEY

#: Public cases per site of the synthetic public cohort and how many public "centres" it pools.
PUBLIC_CASES = 100
PUBLIC_SITES = 2
#: Epochs, batch size and learning rate of a public start per task (what `fedbrain demo --dp-epsilon` pretrains
#: when it has no start, and the benchmark's): a job's own batch and lr are for fine-tuning, not the start.
EPOCHS = {"segmentation": 8, "classification": 20}
BATCH = {"segmentation": 4, "classification": 16}
LR = {"segmentation": 1e-2, "classification": 1e-3}


def synthesize_public(out_dir, *, task: str, cases: int = PUBLIC_CASES, sites: int = PUBLIC_SITES, seed: int = 0,
                      progress: bool = True) -> list[Path]:
    """A synthetic public cohort for ``task`` (:func:`fedbrain.synthetic.cohort.public_site_profiles`): other
    scanners and protocol, mostly large HGG, no CT, patients drawn apart from every hospital's. Its datalists."""
    from fedbrain.synthetic.cohort import public_site_profiles, synthesize_consortium

    out_dir = Path(out_dir)
    profiles = public_site_profiles(sites, seed, task)
    if not all((out_dir / p.name / "datalist.json").is_file() for p in profiles):
        synthesize_consortium(out_dir, sites=sites, cases=cases, seed=seed, profiles=profiles, progress=progress)
    return [out_dir / p.name / "datalist.json" for p in profiles]


def _describe(datalist: Path, cases: dict) -> dict:
    import json

    text = datalist.read_bytes()
    head = json.loads(text)
    return {"site": head.get("site", datalist.parent.name), "description": head.get("description", ""),
            "n_training": len(cases["training"]), "n_validation": len(cases["validation"]),
            "datalist_sha256": hashlib.sha256(text).hexdigest()}


def pretrain(config, datalists, out_dir, *, epochs: int, trainer_cls, progress: bool = True) -> StartModel:
    """Train ``config``'s network on the public ``datalists`` for ``epochs`` and write ``start.pt`` +
    ``start.json`` into ``out_dir`` (see :mod:`fedbrain.models.start`)."""
    from fedbrain import __version__
    from fedbrain.data.datalist import load_datalist
    from fedbrain.tasks.loop import train_central

    config = config.replace(dp_ready=True, start_model=None, dp_epsilon=None, dp_noise_multiplier=None)
    train, val, data = [], [], []
    for path in map(Path, datalists):
        cases = load_datalist(path)
        train += cases["training"]
        val += cases["validation"]
        data.append(_describe(path, cases))
    trainer = trainer_cls(train, val, config, progress=progress)
    if not len(trainer.train_ds):
        raise ValueError(f"no usable public training case in {', '.join(map(str, datalists))}")
    model = trainer.build_model()
    history = train_central(trainer, epochs=epochs, model=model, progress=progress, validate_every=epochs)
    final = history[-1]
    record = {
        "task": config.TASK,
        "model_spec": config.model_spec(),
        "public_data": data,
        "settings": config.to_dict(),
        "epochs": epochs,
        "public_validation": {k: v for k, v in final.items() if k.startswith("val_") and isinstance(v, (int, float))},
        "n_train": len(trainer.train_ds), "n_val": len(trainer.val_ds), "skipped": len(trainer.skipped),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fedbrain_version": __version__,
    }
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # as trained, whatever measuring does
    record.update(public_clip_record(config, train, val, trainer_cls, model))
    return save(weights, out_dir, record)


def public_clip_record(config, training: list, validation: list, trainer_cls, model) -> dict:
    """The start record's clips: per trainable part of ``model`` (the start), the DP-SGD clip chosen on public
    cases, the median norm of a case's gradient (:mod:`fedbrain.privacy.clip`), and which cases. Validation cases,
    which the start never trained on, stand closest to a hospital's; training cases only where there are none."""
    from fedbrain.privacy.clip import public_clips

    cases, split = (validation, "validation") if validation else (training, "training")
    dp = config.replace(dp_ready=True, start_model=None, dp_epsilon=None, dp_noise_multiplier=1.0)
    trainer = trainer_cls(cases, [], dp, progress=False)
    return {RECORD_KEY: public_clips(trainer, model, list(config.PARTS)), "public_gradient_norms_cases": split}


def with_public_clips(start: StartModel, config, datalists, trainer_cls) -> StartModel:
    """``start`` with its public clips recorded (a start written before they were): measured once, written into
    its ``start.json`` (the weights and their hash are unchanged)."""
    import json

    from fedbrain.data.datalist import load_datalist
    from fedbrain.models.start import load

    if RECORD_KEY in start.record:
        return start
    cases = {"training": [], "validation": []}
    for path in datalists:
        for split, found in load_datalist(path).items():
            cases.setdefault(split, []).extend(found)
    model = config.replace(dp_ready=True, start_model=str(start.weights)).build_model()
    record = {**start.record, **public_clip_record(config, cases["training"], cases["validation"], trainer_cls, model)}
    start.weights.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return load(start.weights)


def cached_start(cache_dir, config, trainer_cls, *, console=None) -> StartModel:
    """The synthetic public start for ``config``'s network, made once into ``cache_dir`` and reused
    (``fedbrain demo`` with DP, or the classify demo, and no ``start_model``): keyed by the network and its
    training settings (the task's pretraining :data:`BATCH` and :data:`LR`, whatever the job's) and its public
    cohort."""
    import json
    from dataclasses import asdict

    from fedbrain.models.start import StartModelError, load
    from fedbrain.synthetic.cohort import public_site_profiles

    # seed 0 whatever the job's: one public start per network (`fedbrain demo --seed 3` draws other hospitals and
    # would otherwise pretrain, and be measured on, a start of its own)
    ready = config.replace(dp_ready=True, start_model=None, dp_epsilon=None, dp_noise_multiplier=None,
                           batch_size=BATCH[config.TASK], lr=LR[config.TASK], seed=0)
    cohort = [asdict(p) for p in public_site_profiles(PUBLIC_SITES, 0, config.TASK)]
    key = hashlib.sha256(json.dumps([ready.model_spec(), EPOCHS[config.TASK], PUBLIC_CASES, ready.lr,
                                     ready.batch_size, cohort], sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"{config.TASK}-{key}"
    data = Path(cache_dir) / f"public_data-{config.TASK}"
    try:
        found = load(out)
    except StartModelError:
        found = None
    if found is not None:
        return with_public_clips(found, ready, synthesize_public(data, task=config.TASK, progress=False), trainer_cls)
    if console is not None:
        console.print(f"    no public start yet: pretraining one on the synthetic public cohort into {out} (once)")
    datalists = synthesize_public(data, task=config.TASK, cases=PUBLIC_CASES, progress=console is not None)
    return pretrain(ready, datalists, out, epochs=EPOCHS[config.TASK], trainer_cls=trainer_cls,
                    progress=console is not None)
