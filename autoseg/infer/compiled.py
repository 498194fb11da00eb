"""Compiled networks for long CPU predictions: the same logits (to ~1e-5) about a quarter sooner.

On the CPU, eager PyTorch runs a U-Net's batch-1 3D convolutions partly on its slow im2col path
(oneDNN is only used above a size heuristic) and runs every instance norm and LeakyReLU as
separate passes over memory. ``torch.compile`` with inductor's *freezing* (weights become
constants, prepacked for oneDNN, and the elementwise ops fused) removes both: one full-width
Hippocampus 3d_fullres forward on one core went from 766 to 559 CPU-ms (benchmarks/RESULTS.md).
Compiling costs 45-49 CPU-seconds for that network with a cold inductor cache (its C++ kernels
are built with the system compiler), ~16 with a warm one, so it only pays on long runs (large
volumes, many cases): ``auto`` runs eager until a network has spent `AUTO_COMPILE_AFTER_S` in
forward passes, then compiles it. A compilation that fails (no C++ compiler, no UTF-8 text
encoding) warns once and stays eager.
"""

from __future__ import annotations

import logging
import time

import torch
import torch._inductor.config as inductor_config
from torch import nn

from autoseg.common.encoding import is_utf8, preferred_encoding
from autoseg.common.errors import AutosegError

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
"""``--compile``: compile after `AUTO_COMPILE_AFTER_S` of forwards (CPU only), at once, or never."""

AUTO_COMPILE_AFTER_S = 60.0
"""Seconds of eager forward passes per network before ``auto`` compiles it: more than a cold
compilation costs, so a run that gets this far is likely long enough to win it back."""


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise AutosegError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}", "--compile")
    return mode


class InferenceNet(nn.Module):
    """``net`` in eval mode, switched to a frozen ``torch.compile`` of itself when asked or when worth it.

    Batches smaller than the one compiled for are padded with copies of their last sample (each
    sample's output depends on that sample alone: instance norm, no batch statistics at
    inference), so the last batch of a case does not trigger a second compilation.
    """

    def __init__(self, net: nn.Module, mode: str = "off", after_s: float = AUTO_COMPILE_AFTER_S) -> None:
        super().__init__()
        self.net = net
        self.mode = check_compile_mode(mode)
        self.after_s = after_s
        self.eager_s = 0.0
        self.compiled: nn.Module | None = None
        self.batch: int | None = None
        self.failed = False

    @property
    def deep_supervision(self) -> bool:
        return bool(getattr(self.net, "deep_supervision", False))

    def _wants_compile(self, x: torch.Tensor) -> bool:
        if self.failed or self.mode == "off" or self.compiled is not None:
            return False
        if self.mode == "on":
            return True
        return x.device.type == "cpu" and self.eager_s >= self.after_s

    def _compile(self, x: torch.Tensor) -> None:
        if not is_utf8(preferred_encoding()):
            self._give_up(f"Python's text encoding is {preferred_encoding()!r}, inductor needs UTF-8")
            return
        log.info("compiling the network for inference (after %.1f s of eager forwards)", self.eager_s)
        self.compiled = torch.compile(self.net, dynamic=False)
        self.batch = int(x.shape[0])

    def _give_up(self, why: str) -> None:
        log.warning("torch.compile unavailable, predicting eagerly: %s", why)
        self.failed, self.compiled = True, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._wants_compile(x):
            self._compile(x)
        if self.compiled is not None and x.shape[0] <= (self.batch or 0):
            n = int(x.shape[0])
            padded = x if n == self.batch else torch.cat([x, x[-1:].expand(self.batch - n, *x.shape[1:])])
            try:
                with inductor_config.patch(freezing=True):
                    y = self.compiled(padded)
            except Exception as e:  # a broken toolchain must not cost the prediction
                self._give_up(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                return y[:n] if not isinstance(y, (list, tuple)) else type(y)(t[:n] for t in y)
        t0 = time.perf_counter()
        y = self.net(x)
        self.eager_s += time.perf_counter() - t0
        return y
