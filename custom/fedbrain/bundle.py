"""Hand-over of a trained segmentation model as a MONAI bundle (``fedbrain.bundle.export_bundle``).

A hospital that receives the consortium's model should not need fedbrain to use it: a MONAI
bundle is the format MONAI Label, MONAI Deploy and ``python -m monai.bundle run`` read. So the
bundle names plain MONAI classes (fedbrain's networks only seed their initialisation; the
weights load into MONAI's own ``UNet`` / ``SegResNet`` unchanged), repeats the training
preprocessing from the task config (RAS, the job's spacing, per-channel z-score inside the
brain), and writes a BraTS label map (1 core, 2 oedema, 4 enhancing) in the input's own space.

Layout (MONAI bundle specification)::

    configs/metadata.json    network_data_format: 4 MRI channels in, TC/WT/ET out, channel definitions
    configs/inference.json   python -m monai.bundle run --config_file configs/inference.json
                              --t1 T1 --t1ce T1CE --t2 T2 --flair FLAIR [--output_dir DIR]
    models/model.pt          the state dict
    docs/README.md           what it is, how to run it, the per-site validation of the federated run
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedbrain.contracts import MRI_CONTRAST_LABELS, MRI_CONTRASTS, REGIONS

__all__ = ["BundleError", "export_bundle"]

#: fedbrain network class -> the MONAI class whose state dict it shares.
_MONAI_CLASS = {
    "fedbrain.models.segmentation.SeededUNet": "monai.networks.nets.UNet",
    "fedbrain.models.segmentation.SeededSegResNet": "monai.networks.nets.SegResNet",
}
#: The two model files a FLARE result holds, preferred first.
_FL_MODELS = ("best_FL_global_model.pt", "FL_global_model.pt")


class BundleError(ValueError):
    """The source is not a model fedbrain can hand over; the message says which file and why."""


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _fl_config(result: Path):
    """The task config a FLARE result's site app ran with (its script's ``--config`` JSON), or None."""
    from fedbrain.tasks.segmentation import SegmentationConfig

    for path in sorted(result.rglob("config_fed_client.json")):
        for text in _strings(json.loads(path.read_text())):
            if "--config {" in text:
                config, _ = json.JSONDecoder().raw_decode(text[text.index("--config {") + len("--config "):])
                return SegmentationConfig.from_json(json.dumps(config))
    return None


def _source(source: Path, config_file: Path | None):
    """``(model file, config, per-site table rows, what the model is)`` of a `train --central` output
    folder (model.pt + config.json), a FLARE job result folder, or a model file."""
    from fedbrain.tasks.segmentation import SegmentationConfig

    rows, kind, config = [], "", None
    if source.is_file():
        model, kind = source, f"model file {source.name}"
    elif (source / "model.pt").is_file():
        model, kind = source / "model.pt", "centralized baseline (fedbrain train --central)"
        config_file = config_file or (source / "config.json" if (source / "config.json").is_file() else None)
    else:
        found = [p for name in _FL_MODELS for p in sorted(source.rglob(name))]
        if not found:
            raise BundleError(f"{source}: no model.pt (fedbrain train --central) and no {' / '.join(_FL_MODELS)} "
                              "(a downloaded FLARE job result) found")
        model = found[0]
        kind = f"federated job result ({model.name}: {'best' if model.name.startswith('best') else 'final'} global model)"
        config = _fl_config(source)
        rows = _site_rows(source)
    if config_file is not None:
        try:
            config = SegmentationConfig.from_json(Path(config_file).read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{config_file}: not a segmentation task config ({exc})") from exc
    return model, config, rows, kind


def _site_rows(result: Path) -> list[dict]:
    """Per-site validation of the federated run (the report's final Dice per site and region)."""
    from fedbrain.report.job_report import ReportError, build_report

    try:
        report = build_report(result)
    except (ReportError, OSError, ValueError):
        return []
    rows = []
    for name, entry in sorted(report.get("sites", {}).items()):
        n_val = entry["final"].get("n_val") or entry["rounds"][-1].get("n_val")
        rows.append({"site": name, **{r: entry["final"].get(f"val_dice_{r}") for r in REGIONS},
                     "n_val": int(n_val) if n_val is not None else None, "source": entry["final_source"]})
    return rows


def _state_dict(model_file: Path) -> dict:
    try:
        data = torch.load(model_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same hand-over error
        raise BundleError(f"{model_file}: cannot read the model ({type(exc).__name__}: {exc})") from exc
    state = data.get("model", data) if isinstance(data, dict) else None  # FLARE's persistor wraps it in "model"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{model_file}: not a PyTorch state dict (nor FLARE's {{'model': state dict}})")
    return state


def _network_def(config) -> dict:
    spec = config.model_spec()
    target = _MONAI_CLASS.get(spec["class_path"])
    if target is None:
        raise BundleError(f"network {spec['class_path']} has no MONAI equivalent to hand over")
    args = {k: v for k, v in spec["args"].items() if k != "init_seed" and v is not None}
    return {"_target_": target, **args}


def _inference(config) -> dict:
    """MONAI bundle config: the training preprocessing, sliding-window inference, a BraTS label map."""
    return {
        "imports": ["$import torch", "$import monai"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        **{contrast: "" for contrast in MRI_CONTRASTS},
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_def(config),
        "network": "$@network_def.to(@device)",
        "data": f"$[{{'image': [{', '.join('@' + c for c in MRI_CONTRASTS)}]}}]",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(config.spacing), "mode": "bilinear"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@data", "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(config.roi_size), "sw_batch_size": 1,
                    "overlap": config.val_overlap},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            # TC / WT / ET -> BraTS labels: oedema 2 inside WT, core 1 inside TC, enhancing 4 inside ET
            {"_target_": "Lambdad", "keys": "pred", "func": "$lambda p: torch.where(p[2:3] > 0, 4, "
                                                              "torch.where(p[0:1] > 0, 1, p[1:2] * 2))"},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$torch.uint8", "resample": False, "separate_folder": False},
        ]},
        # a plain loop, not monai.engines: those need pytorch-ignite, which a hospital may not have
        "initialize": ["$torch.set_grad_enabled(False)",
                       "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
                       "map_location=@device, weights_only=True))", "$@network.eval()"],
        "run": ["$[@postprocessing({'image': d['image'], 'pred': @inferer(d['image'][None].to(@device), "
                "@network)[0].cpu()}) for d in @dataset]"],
    }


def _metadata(config, kind: str) -> dict:
    import monai

    channels = dict(enumerate(MRI_CONTRAST_LABELS))
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fedbrain from a {kind}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "required_packages_version": {"nibabel": __import__("nibabel").__version__},
        "name": "fedbrain brain tumour segmentation",
        "task": "Brain tumour segmentation (BraTS regions TC, WT, ET) from co-registered, skull-stripped MRI",
        "description": f"{config.arch} trained by fedbrain ({kind}); input RAS, resampled to {list(config.spacing)} mm",
        "authors": "fedbrain consortium",
        "copyright": "the consortium's hospitals",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": len(channels),
                "spatial_shape": list(config.roi_size), "dtype": "float32", "value_range": [],
                "is_patch_data": True, "channel_def": {str(k): v for k, v in channels.items()},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": len(REGIONS),
                "spatial_shape": list(config.roi_size), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {str(n): r.upper() for n, r in enumerate(REGIONS)},
            }},
        },
    }


def _readme(config, kind: str, rows: list[dict]) -> str:
    def dice(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

    table = ["| site | TC Dice | WT Dice | ET Dice | validation cases | model |", "|---|---|---|---|---|---|"]
    table += [f"| {r['site']} | {dice(r['tc'])} | {dice(r['wt'])} | {dice(r['et'])} | {r.get('n_val') or '-'} | "
              f"{r['source']} |" for r in rows]
    validation = "\n".join(table) if rows else "No per-site validation: this model did not come from a federated job result."
    args = " ".join(f"--{c} {label}.nii.gz" for c, label in zip(MRI_CONTRASTS, MRI_CONTRAST_LABELS))
    return f"""# fedbrain brain tumour segmentation

{config.arch} ({kind}). Input: four co-registered, skull-stripped MRI volumes of one case (T1, T1ce, T2, FLAIR, on
one voxel grid, as BraTS ships them). Output: a label map in the input's space, BraTS 2018-2021 values:
1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour (the network's TC / WT / ET channels, threshold 0.5).

Preprocessing as in training: RAS orientation, {list(config.spacing)} mm voxels, z-score per channel inside the brain
(non-zero voxels). Sliding-window inference with {list(config.roi_size)} windows, overlap {config.val_overlap}.

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . {args} --output_dir out
```

Needs only MONAI, PyTorch and nibabel (`monai.networks.nets.{_network_def(config)["_target_"].rsplit(".", 1)[-1]}`);
writes `out/<T1 name>_seg.nii.gz`.

## Validation at the training sites

{validation}
"""


def export_bundle(source, out, config_file=None) -> Path:
    """Write the MONAI bundle of ``source`` (see the module doc) into ``out``; returns ``out``.

    Raises BundleError naming the file and the reason for anything that cannot be handed over.
    """
    from fedbrain.tasks.segmentation import SegmentationConfig

    source, out = Path(source), Path(out)
    if not source.exists():
        raise BundleError(f"{source}: not found")
    model_file, config, rows, kind = _source(source, Path(config_file) if config_file else None)
    if config is None:
        config = SegmentationConfig()
        kind += "; task config not found, defaults assumed"
    state = _state_dict(model_file)
    network = _instantiate(_network_def(config))
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(f"{model_file}: weights do not fit the {config.arch} of the task config "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    for folder in ("configs", "models", "docs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out / "models" / "model.pt")
    (out / "configs" / "inference.json").write_text(json.dumps(_inference(config), indent=2) + "\n")
    (out / "configs" / "metadata.json").write_text(json.dumps(_metadata(config, kind), indent=2) + "\n")
    (out / "docs" / "README.md").write_text(_readme(config, kind, rows))
    return out


def _instantiate(network_def: dict) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    return ConfigParser({"net": network_def}).get_parsed_content("net")
