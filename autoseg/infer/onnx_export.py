"""Export a trained fold's network to ONNX, verified against torch before it is kept.

The exported graph takes one fixed-size patch batch ``(B, C, *patch_size)`` (batch dynamic,
spatial size fixed to the planned patch) and returns full-resolution logits (deep
supervision off). A JSON record next to it (``model.json`` for ``model.onnx``) holds the
opset and everything a deployment needs to reproduce autoseg's inference around the graph
(patch size, spacing, transpose, normalization, labels, mirror axes). The export runs
onnxruntime on a random patch and compares the logits with torch's; if they disagree
beyond the tolerance the file is not written and the export fails.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import save_record
from autoseg.common.paths import DEFAULT_PLANS, Paths, TrainingId
from autoseg.dataset.spec import LabelValue
from autoseg.planning.plans import ChannelNormalization
from autoseg.infer.predict import load_model

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
"""ONNX opset: 17 is supported by every onnxruntime of the last years and covers 3D (transposed) convs."""

DEFAULT_ATOL = 1e-3
"""Largest allowed |onnxruntime - torch| logit difference (float32 kernels differ in summation order)."""

INPUT_NAME, OUTPUT_NAME = "image", "logits"


@dataclass(frozen=True)
class OnnxExportRecord:
    """Sidecar of an exported model: how it was made and how to feed it."""

    SCHEMA: ClassVar[str] = "autoseg.onnx_export"
    VERSION: ClassVar[int] = 1

    dataset: str
    config: str
    fold: int | str
    variant: str
    checkpoint: str
    opset: int
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    """(1, C, *patch); the batch axis is dynamic."""
    num_classes: int
    labels: dict[str, LabelValue]
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, int, int]
    normalization: tuple[ChannelNormalization, ...]
    mirror_axes: tuple[int, ...]
    max_abs_diff: float
    """Measured difference to torch on the check patch."""
    tolerance: float
    torch_version: str
    onnxruntime_version: str
    plans: str = DEFAULT_PLANS
    """The planner preset the fold was trained with."""


def _check_with_onnxruntime(onnx_path: Path, net: torch.nn.Module, x: torch.Tensor) -> float:
    import onnxruntime as ort

    with torch.inference_mode():
        expected = net(x).float().numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != expected.shape:
        raise AutosegError(f"ONNX output shape {got.shape} differs from torch {expected.shape}", onnx_path)
    return float(np.max(np.abs(got - expected)))


def export_onnx(paths: Paths, dataset: str, config: str, fold: int | str, output: Path, variant: str = "default",
                checkpoint: str = "final", opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL,
                force: bool = False, seed: int = 0, plans: str = DEFAULT_PLANS) -> OnnxExportRecord:
    """Export one fold to ``output`` (+ ``.json`` record) after checking onnxruntime agrees with torch."""
    import onnxruntime as ort

    output = Path(output)
    record_path = output.with_suffix(".json")
    if output.exists() and not force:
        raise AutosegError("exists; use --force to overwrite", output)
    tid = TrainingId(dataset, config, fold, variant, plans=plans)
    config, plans = tid.config, tid.plans
    fold_dir = paths.training_dir(tid)
    model = load_model([fold_dir], device="cpu", checkpoint=checkpoint)
    net = model.nets[0].float().eval()
    patch = tuple(int(p) for p in model.config.patch_size)
    # a cascade stage also takes K-1 one-hot channels of its previous stage
    extra = model.num_classes - 1 if model.config.previous_stage is not None else 0
    shape = (1, model.plan.num_channels + extra, *patch)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".onnx", dir=output.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(net, (x,), tmp, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"},
                                                                        OUTPUT_NAME: {0: "batch"}})
        diff = _check_with_onnxruntime(Path(tmp), net, x)
        if not diff <= atol:
            raise AutosegError(f"onnxruntime logits differ from torch by {diff:.3g} (> {atol:g}); "
                               "not writing the model", output)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = OnnxExportRecord(
        dataset=dataset, config=config, fold=fold, variant=variant, checkpoint=checkpoint, opset=opset,
        input_name=INPUT_NAME, output_name=OUTPUT_NAME, input_shape=shape, num_classes=model.num_classes,
        labels=dict(model.plan.labels), patch_size=patch, spacing=tuple(model.config.spacing),
        transpose_forward=model.plan.transpose_forward, normalization=model.plan.normalization,
        mirror_axes=model.mirror_axes, max_abs_diff=diff, tolerance=atol, torch_version=torch.__version__,
        onnxruntime_version=ort.__version__, plans=plans)
    save_record(record_path, record)
    log.info("exported %s (max |onnx - torch| = %.2g)", output, diff)
    return record
