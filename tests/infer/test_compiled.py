"""`InferenceNet`: compiled forwards equal eager ones, compile only when asked or worth it, never fail a run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.infer.compiled import InferenceNet


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(0.01),
                         nn.Conv3d(8, 3, 1)).eval()


@torch.inference_mode()
def test_compiled_forwards_equal_eager_ones_including_a_short_last_batch() -> None:
    net = _tiny_net()
    wrapped = InferenceNet(net, mode="on")
    full, short = torch.randn(2, 1, 8, 12, 10), torch.randn(1, 1, 8, 12, 10)
    assert torch.allclose(wrapped(full), net(full), atol=1e-5)
    assert wrapped.compiled is not None and wrapped.batch == 2
    out = wrapped(short)  # padded to the compiled batch of 2, then cut back
    assert out.shape == (1, 3, 8, 12, 10) and torch.allclose(out, net(short), atol=1e-5)
    assert wrapped.eager_s == 0.0  # neither call ran eagerly


@torch.inference_mode()
def test_auto_compiles_only_after_enough_eager_time() -> None:
    x = torch.randn(1, 1, 8, 12, 10)
    patient = InferenceNet(_tiny_net(), mode="auto", after_s=1e9)
    for _ in range(3):
        patient(x)
    assert patient.compiled is None and patient.eager_s > 0
    eager = InferenceNet(_tiny_net(), mode="off", after_s=0.0)
    eager(x), eager(x)
    assert eager.compiled is None


@torch.inference_mode()
def test_a_failing_compilation_warns_once_and_predicts_eagerly(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        def run(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    net = _tiny_net()
    wrapped = InferenceNet(net, mode="on")
    x = torch.randn(1, 1, 8, 12, 10)
    with caplog.at_level(logging.WARNING, logger="autoseg.infer.compiled"):
        first, second = wrapped(x), wrapped(x)
    assert torch.equal(first, net(x)) and torch.equal(second, net(x))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0]


def test_an_unknown_mode_is_one_line() -> None:
    with pytest.raises(AutosegError, match="unknown compile mode 'fast'"):
        InferenceNet(_tiny_net(), mode="fast")


def test_predict_compile_reaches_every_fold_network(hippo_trained, tmp_path, monkeypatch) -> None:
    """The wiring: ``predict --compile on`` compiles each fold's net once (a spy stands in for inductor,
    whose equality with eager is the first test's), ``off`` never; the masks are the same."""
    import numpy as np
    import SimpleITK as sitk
    from click.testing import CliRunner

    import autoseg.cli
    from autoseg.dataset.spec import load_dataset
    from tests.infer.conftest import link_inputs

    compiled: list[nn.Module] = []

    def spy(net: nn.Module, **kwargs: object) -> nn.Module:
        compiled.append(net)
        return net

    monkeypatch.setattr(torch, "compile", spy)
    paths, plan = hippo_trained
    case = load_dataset(paths.raw_dataset("Dataset004_Hippocampus")).cases[2]
    inp = link_inputs(list(case.images), tmp_path / "in")
    base = ["--raw", str(paths.raw), "--results", str(paths.results), "--preprocessed", str(paths.preprocessed),
            "predict", "-d", "4", "-c", "3d_fullres", "-f", "0", "1", "-i", str(inp), "--device", "cpu",
            "--no-tta"]
    masks = {}
    for mode in ("off", "on"):
        result = CliRunner().invoke(autoseg.cli.cli, [*base, "-o", str(tmp_path / mode), "--compile", mode])
        assert result.exit_code == 0, result.output
        assert len(compiled) == (0 if mode == "off" else 2) and len({id(n) for n in compiled}) == len(compiled)
        masks[mode] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / mode / f"{case.case_id}.nii.gz")))
    assert len(np.unique(masks["off"])) > 1 and np.array_equal(masks["on"], masks["off"])
