"""State-dict keys of nnU-Net's networks <-> autoseg's `DynamicUNet`, parameter for parameter.

autoseg's U-Net is built module for module like dynamic_network_architectures' ``PlainConvUNet``
and ``ResidualEncoderUNet`` (tests/parity check the logits), so a checkpoint moves between the
two by renaming keys only:

=========================================================  ======================================
nnU-Net                                                    autoseg
=========================================================  ======================================
``encoder.stages.S.0.convs.I.{conv,norm}.P`` (plain)       ``encoder.S.{3I, 3I+1}.P``
``encoder.stem.convs.0.{conv,norm}.P`` (residual)          ``encoder.0.0.{0,1}.P``
``encoder.stages.S.blocks.B.conv{1,2}.{conv,norm}.P``      ``encoder.S.B'.conv{1,2}.{0,1}.P``
``encoder.stages.S.blocks.B.skip.K.{conv,norm}.P``         ``encoder.S.B'.skip.K.{0,1}.P``
``decoder.stages.D.convs.I.{conv,norm}.P``                 ``decoder.D.{3I, 3I+1}.P``
``decoder.transpconvs.D.P``                                ``upsample.D.P``
``decoder.seg_layers.D.P``                                 ``heads.D.P``
=========================================================  ======================================

(B' = B + 1 in stage 0 of a residual encoder, whose first module is the stem.) nnU-Net's state
dict also lists every conv and norm a second time (``...all_modules.{0,1}.P``, the same tensors
as ``conv``/``norm``) and the whole encoder again under ``decoder.encoder.``; importing drops
those aliases, exporting writes them, so ``load_state_dict(strict=True)`` accepts the result.
"""

from __future__ import annotations

import re

import torch

from autoseg.common.errors import AutosegError

_UNIT = {"conv": 0, "norm": 1}
"""Position of the conv and the norm in one of our conv -> norm (-> LeakyReLU) Sequentials, and in
nnU-Net's ``all_modules`` (no dropout: a plan with dropout is refused before keys are mapped)."""

_PLAIN_ENCODER = re.compile(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)")
_STEM = re.compile(r"encoder\.stem\.convs\.0\.(conv|norm)\.(weight|bias)")
_BLOCK = re.compile(r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.(conv1|conv2|skip\.\d+)\.(conv|norm)\.(weight|bias)")
_DECODER = re.compile(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)")
_SIMPLE = {"decoder.transpconvs.": "upsample.", "decoder.seg_layers.": "heads."}
_ALIAS = re.compile(r"(^decoder\.encoder\.)|(\.all_modules\.\d+\.)")

_OURS_PLAIN_ENCODER = re.compile(r"encoder\.(\d+)\.(\d+)\.(weight|bias)")
_OURS_RESIDUAL = re.compile(r"encoder\.(\d+)\.(\d+)\.(conv1|conv2|skip\.\d+|\d+)\.?(\d+)?\.(weight|bias)")
_OURS_DECODER = re.compile(r"decoder\.(\d+)\.(\d+)\.(weight|bias)")


def _unit_index(i: str, kind: str) -> int:
    return 3 * int(i) + _UNIT[kind]


def autoseg_key(key: str, residual: bool) -> str:
    """Our parameter name for a canonical (non-alias) nnU-Net one; KeyError for anything else."""
    for prefix, ours in _SIMPLE.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    m = _DECODER.fullmatch(key)
    if m:
        return f"decoder.{m[1]}.{_unit_index(m[2], m[3])}.{m[4]}"
    if not residual:
        m = _PLAIN_ENCODER.fullmatch(key)
        if m:
            return f"encoder.{m[1]}.{_unit_index(m[2], m[3])}.{m[4]}"
        raise KeyError(key)
    m = _STEM.fullmatch(key)
    if m:
        return f"encoder.0.0.{_UNIT[m[1]]}.{m[2]}"
    m = _BLOCK.fullmatch(key)
    if m:
        stage, block = int(m[1]), int(m[2]) + (1 if m[1] == "0" else 0)
        return f"encoder.{stage}.{block}.{m[3]}.{_UNIT[m[4]]}.{m[5]}"
    raise KeyError(key)


def nnunet_keys(key: str, residual: bool) -> list[str]:
    """Every nnU-Net name of one of our parameters: the canonical one, then its aliases."""
    for prefix, ours in _SIMPLE.items():
        if key.startswith(ours):
            return [prefix + key[len(ours):]]
    m = _OURS_DECODER.fullmatch(key)
    if m:
        unit, kind = divmod(int(m[2]), 3)
        return _with_aliases(f"decoder.stages.{m[1]}.convs.{unit}", kind, m[3], False)
    if not residual:
        m = _OURS_PLAIN_ENCODER.fullmatch(key)
        if m:
            unit, kind = divmod(int(m[2]), 3)
            return _with_aliases(f"encoder.stages.{m[1]}.0.convs.{unit}", kind, m[3], True)
        raise KeyError(key)
    m = _OURS_RESIDUAL.fullmatch(key)
    if m:
        stage, block, part, kind, param = int(m[1]), int(m[2]), m[3], m[4], m[5]
        if stage == 0 and block == 0 and kind is None:  # the stem: encoder.0.0.<unit>.<param>
            return _with_aliases("encoder.stem.convs.0", int(part), param, True)
        if kind is not None:
            b = block - 1 if stage == 0 else block
            return _with_aliases(f"encoder.stages.{stage}.blocks.{b}.{part}", int(kind), param, True)
    raise KeyError(key)


def _with_aliases(unit: str, kind: int, param: str, in_encoder: bool) -> list[str]:
    if kind not in (0, 1):
        raise KeyError(f"{unit}.{kind}.{param}")
    name = ("conv", "norm")[kind]
    keys = [f"{unit}.{name}.{param}", f"{unit}.all_modules.{kind}.{param}"]
    return keys + [f"decoder.{k}" for k in keys] if in_encoder else keys


def to_autoseg_state(state: dict[str, torch.Tensor], residual: bool, where: object = None) -> dict[str, torch.Tensor]:
    """An nnU-Net network state dict renamed for our U-Net (aliases dropped).

    A key that is neither an alias nor one of the table's (another network) is an `AutosegError`
    naming it; shapes are checked when the result is loaded (`load_model_state`).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("_orig_mod.").removeprefix("module.")
        if _ALIAS.search(key):
            continue
        try:
            out[autoseg_key(key, residual)] = value
        except KeyError:
            kind = "ResidualEncoderUNet" if residual else "PlainConvUNet"
            raise AutosegError(f"network weight {key!r} is not one of nnU-Net's {kind}", where) from None
    return out


def to_nnunet_state(state: dict[str, torch.Tensor], residual: bool) -> dict[str, torch.Tensor]:
    """Our state dict under nnU-Net's names, aliases included (what its network's state_dict() lists)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for name in nnunet_keys(key, residual):
            out[name] = value
    return out
