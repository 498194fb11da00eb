"""The GPU-only code paths, run for real on the CPU: bf16 autocast and torch.compile.

On CUDA `resolve_runtime` turns both on by default (amp=auto -> bf16, compile=auto -> on), so a
typo in either path would only show on a GPU. Here both run through `fit` on the tiny network,
and through the CLI resolution of the settings.
"""

from __future__ import annotations

import json

import pytest
import torch

from autoseg.train.config import TrainerConfig
from autoseg.train.loop import fit, resolve_runtime
from tests.train.conftest import make_setup


def _log(tmp_path):
    return [json.loads(s) for s in (tmp_path / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]


def test_resolve_runtime_maps_settings_to_the_cuda_defaults_and_explicit_cpu_choices() -> None:
    cpu = resolve_runtime(TrainerConfig(), "cpu")
    assert cpu.amp_dtype is None and cpu.compile is False  # auto on the CPU: neither
    forced = resolve_runtime(TrainerConfig(amp="bf16", compile="true"), "cpu")
    assert forced.amp_dtype is torch.bfloat16 and forced.compile is True and not forced.use_grad_scaler
    assert resolve_runtime(TrainerConfig(amp="fp16"), "cpu").use_grad_scaler is True


def test_bf16_autocast_trains_and_writes_float32_weights(tmp_path) -> None:
    cfg = TrainerConfig(epochs=3, iterations_per_epoch=5, val_iterations=2, amp="bf16", compile="false")
    rt = resolve_runtime(cfg, "cpu", quiet=True)
    setup = make_setup(tmp_path, cfg)
    seen: list[torch.dtype] = []
    hook = setup.net.register_forward_hook(lambda m, i, o: seen.append(
        (o[0] if isinstance(o, list | tuple) else o).dtype))
    result = fit(setup, rt)
    hook.remove()
    lines = _log(tmp_path)
    assert result.epochs_completed == 3
    assert torch.bfloat16 in seen  # the forward really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in setup.net.parameters())  # master weights stay fp32
    assert all(torch.isfinite(p).all() for p in setup.net.parameters())
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path) -> None:
    """torch.compile (inductor, CPU C++ backend) gives the eager losses within float tolerance."""
    cfg = TrainerConfig(epochs=2, iterations_per_epoch=3, val_iterations=1, compile="false")
    eager = fit(make_setup(tmp_path / "eager", cfg), resolve_runtime(cfg, "cpu", quiet=True))
    compiled_cfg = TrainerConfig(epochs=2, iterations_per_epoch=3, val_iterations=1, compile="true")
    compiled = fit(make_setup(tmp_path / "compiled", compiled_cfg), resolve_runtime(compiled_cfg, "cpu", quiet=True))
    assert compiled.epochs_completed == eager.epochs_completed == 2
    for a, b in zip(eager.history, compiled.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3, abs=2e-4)
    # the checkpoint holds the plain module's keys, not torch.compile's "_orig_mod." wrapper
    from autoseg.train.checkpoint import load_checkpoint
    state = load_checkpoint(tmp_path / "compiled" / "checkpoint_final.pt").model_state
    assert not any(k.startswith("_orig_mod.") for k in state)
