"""`kdci-ray export`: a distilled student alone, for deployment, as ONNX, TorchScript or safetensors, with its card.

The exported ONNX / TorchScript model takes RGB (or grey) images in [0, 1], float32 NCHW, and includes the
normalisation the student was trained with (from its card): callers need no preprocessing beyond scaling
pixels. The safetensors export is the student's weights and card as they are (the normalisation stays on
the card). Each export is checked against the student in torch on test images: the same top-1 and the
largest logit difference are reported (ONNX through onnxruntime when it is installed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from .io import ModelCard, card_path, load_classifier

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}


def deployable(student: nn.Module, mean: list[float], std: list[float]) -> nn.Module:
    """The student with its input normalisation (the loops' own `Normalize`): [0, 1] images in, logits out."""
    from ..data import Normalize

    return nn.Sequential(Normalize(mean, std), student).eval()


def export_student(run_dir: str | Path, fmt: str, out: str | Path | None = None, check_images: int = 512,
                   data_root: str | Path | None = None) -> dict:
    """Export `run_dir`'s student (a finished distillation run) as `fmt`; returns what was written and checked.
    The check reads the student's dataset from `data_root`, else from where the run's config.yaml says."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    weights = run_dir / "student.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: --run must be the folder of a finished distillation run "
                                "(it writes student.safetensors at the end)")
    model, card = load_classifier(weights)
    out = Path(out) if out is not None else run_dir / f"student{SUFFIX[fmt]}"
    if fmt != "safetensors" and out.suffix != SUFFIX[fmt]:
        raise ValueError(f"--out {out}: a {fmt} export ends in {SUFFIX[fmt]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    images, labels = _check_set(card, check_images, data_root or _run_data_root(run_dir))
    mean, std = _normalisation(card)
    exportable = deployable(model.float().eval(), mean, std)
    with torch.no_grad():
        reference = exportable(images)
    if fmt == "safetensors":
        if out.resolve() != weights.resolve():
            shutil.copy2(weights, out)
            shutil.copy2(card_path(weights), card_path(out))
        exported, checked_with = load_classifier(out)[0].eval(), "torch"
        with torch.no_grad():
            logits = deployable(exported, mean, std)(images)
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(exportable, images[:2])
        traced.save(str(out))
        with torch.no_grad():
            logits = torch.jit.load(str(out))(images)
        checked_with = "torch.jit"
    else:
        logits, checked_with = _onnx(exportable, images, out)
    if fmt != "safetensors":
        export_card = ModelCard(**{**card.__dict__, "extra": {**card.extra, "export": {
            "format": fmt, "input": f"float32 NCHW in [0, 1], {card.in_channels} channel(s); normalisation included",
            "source": str(weights)}}})
        export_card.write(out.with_name(out.name + ".json"))  # student.onnx.json: the student's own card stays as it is
    result = {"format": fmt, "out": str(out), "card": str(out.with_name(out.name + ".json") if fmt != "safetensors" else card_path(out)),
              "checked_with": checked_with,
              "images": int(images.shape[0])}
    if logits is not None:
        result.update(max_logit_diff=float((logits - reference).abs().max()),
                      top1_torch=round(float((reference.argmax(1) == labels).float().mean() * 100), 2),
                      top1_export=round(float((logits.argmax(1) == labels).float().mean() * 100), 2),
                      same_predictions=bool((logits.argmax(1) == reference.argmax(1)).all()))
    return result


def _normalisation(card: ModelCard) -> tuple[list[float], list[float]]:
    if card.normalize_mean and card.normalize_std:
        return list(card.normalize_mean), list(card.normalize_std)
    from ..data import dataset_info

    info = dataset_info(card.dataset)
    return list(info.mean), list(info.std)


def _run_data_root(run_dir: Path) -> str | None:
    import yaml

    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    return ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("root")


def _check_set(card: ModelCard, n: int, root) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `n` labelled test images of the student's dataset, as [0, 1] floats."""
    from ..data import dataset_info, load_dataset

    if not card.dataset:
        raise ValueError("the student's card names no dataset: its test split checks the export")
    info = dataset_info(card.dataset)
    data = load_dataset(card.dataset, root, split=info.eval_split, limit=n)
    if not hasattr(data, "images"):
        raise ValueError(f"{card.dataset}: the export check reads in-memory datasets (digits, CIFAR); use --format safetensors")
    images = torch.as_tensor(data.images[:n])
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    return images.float().div(255).contiguous(), torch.as_tensor(data.labels[:n]).long()


def _onnx(model: nn.Module, images: torch.Tensor, out: Path):
    """Write the ONNX file (batch dimension dynamic) and run it with onnxruntime when installed."""
    try:
        torch.onnx.export(model, (images[:2],), str(out), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except ImportError as exc:
        raise ValueError(f"ONNX export needs the onnx package ({exc}): pip install onnx onnxruntime") from None
    try:
        import onnxruntime
    except ImportError:
        return None, "not run (onnxruntime is not installed)"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    return logits, f"onnxruntime {onnxruntime.__version__}"
