"""Ablation sweep files: one YAML file becomes a validated grid of variants (a `SweepSpec`).

A sweep file (see ``docs/sweeps.md``)::

    name: lr_and_mirroring
    datasets: [Dataset004_Hippocampus]
    configs: [3d_fullres]
    folds: [0, 1, 2, 3, 4]
    seeds: [0]
    base: {epochs: 100}                 # applied to every variant
    grid:                               # cartesian product
      lr: [0.01, 0.003]
      augment.mirror: [true, false]
    variants:                           # plus named one-off variants
      big_patch: {plan.3d_fullres.patch_size: [48, 64, 48]}

is parsed and fully validated by `load_sweep` before anything runs (unknown keys, types,
empty grid axes, duplicate variants, unknown datasets: every problem found, one line each
naming the file and the key). YAML is read with YAML 1.2 floats (``1e-3`` is a number, which
PyYAML's YAML 1.1 reads as a string) and YAML 1.1 booleans (``on``/``off``/``yes``/``no``);
on/off knobs take booleans, ``0`` and ``1`` (``compile: false``, ``amp: off``). Trainer keys are
checked by applying them to a `TrainerConfig`; ``plan.<config>.<field>``
keys against `Configuration`'s fields. ``plan.preset`` picks a planner preset (``resenc-l``: its
plans_resenc-l.json, results in ``resenc-l__<config>``), e.g. ``grid: {plan.preset: [default,
resenc-l]}``; it is carried as the plan override ``preset=<name>`` (`split_preset`).

This module is the sweep *records*: `SweepSpec`, `Variant`, the key constants and naming; reading
and validating a file is `autoseg.schedule.sweep.parse`. What a spec becomes on disk and as jobs
(derived plans, the job graph, ``sweep.json``) is in `autoseg.schedule.sweep.jobs`; running it
through the scheduler is `autoseg.schedule.sweep.run`.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import to_jsonable
from autoseg.planning.presets import DEFAULT_PRESET

TOP_LEVEL_KEYS = ("name", "description", "datasets", "configs", "folds", "seeds", "base", "grid",
                  "variants", "baseline", "track")
"""Every key a sweep file may have; anything else is a typo and fails before a job starts."""

REQUIRED_KEYS = ("name", "datasets", "configs")
"""Keys without a sensible default."""

DEFAULT_FOLDS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""nnU-Net's 5-fold cross-validation."""

DEFAULT_SEEDS: tuple[int, ...] = (0,)
"""One seed unless the sweep asks for more."""

PLAN_PREFIX = "plan."
"""Keys ``plan.<config>.<field>`` override a field of one planned `Configuration`."""

PRESET_FIELD = "preset"
"""``plan.preset``: the planner preset a variant trains with (`autoseg.planning.presets`)."""

PLAN_FIELDS_NOT_OVERRIDABLE = frozenset({
    "name", "data_identifier", "median_shape", "previous_stage", "next_stage", "estimated_vram_gb",
    "reasons"})
"""Configuration fields that are bookkeeping or derived, not choices a sweep can vary."""

BASELINE_NAME = "baseline"
"""Name of the grid point whose values all equal the (base-applied) defaults."""

VARIANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")
"""Variant and config names in a sweep file: like `FOLDER_NAME_RE` plus ``=,+`` (``lr=0.003,mirror=false``);
safe inside job ids (no ``:`` or ``/``) and turned into a folder name by `dirname_of`. A sweep's own
name must be a plain folder name (`is_folder_name`): it prefixes its variants' ``--variant`` names."""

MAX_VARIANT_NAME_CHARS = 100
"""Longer derived names are shortened with a hash so folder names stay well below 255 bytes."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: the overrides that distinguish it from the sweep's base."""

    name: str
    """Readable and stable: ``lr=0.003,augment.mirror=false``, ``baseline`` or the given name."""
    trainer_overrides: tuple[str, ...] = ()
    """``key=value`` strings for ``autoseg train --set`` (the sweep's base not included)."""
    plan_overrides: tuple[str, ...] = ()
    """``<config>.<field>=<value>`` strings for `apply_plan_overrides` (base not included)."""
    baseline: bool = False
    """The variant every other one is compared to in the report."""
    origin: str = "grid"
    """``grid`` (a grid point) or ``named`` (from ``variants:``)."""

    @property
    def dirname(self) -> str:
        """The name as a folder: ``lr=0.003,augment.mirror=false`` -> ``lr-0.003__augment.mirror-false``."""
        return dirname_of(self.name)

    def run_name(self, sweep: str) -> str:
        """The TrainingId variant (folder under results/<ds>/<config>/): ``<sweep>.<dirname>``."""
        return f"{sweep}.{self.dirname}"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep file; saved as ``<results>/sweeps/<name>/sweep.json`` when it starts."""

    SCHEMA: ClassVar[str] = "autoseg.sweep"
    VERSION: ClassVar[int] = 1

    name: str
    source: str
    """The YAML file it came from."""
    datasets: tuple[str, ...]
    configs: tuple[str, ...]
    folds: tuple[int | str, ...]
    seeds: tuple[int, ...]
    base_trainer_overrides: tuple[str, ...]
    base_plan_overrides: tuple[str, ...]
    variants: tuple[Variant, ...]
    description: str = ""
    started: str = ""
    """UTC time the sweep record was first written (empty until then)."""
    track: str = ""
    """The file's ``track:`` (``mlflow:http://...``; docs/tracking.md), empty when it has none; ``--track``
    and ``$AUTOSEG_TRACK`` come second and third."""

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.baseline)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise AutosegError(f"sweep {self.name!r} has no variant {name!r}", self.source)

    def trainer_overrides(self, variant: Variant) -> tuple[str, ...]:
        """Base then variant overrides: the variant's value wins for a key set in both."""
        return self.base_trainer_overrides + variant.trainer_overrides

    def plan_overrides(self, variant: Variant) -> tuple[str, ...]:
        return self.base_plan_overrides + variant.plan_overrides

    def preset(self, variant: Variant) -> str:
        """The planner preset a variant trains with (``plan.preset``; the variant's wins over base)."""
        return split_preset(self.plan_overrides(variant))[0]


def split_preset(overrides: typing.Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """``("preset=resenc-l", "3d_fullres.batch_size=2")`` -> ``("resenc-l", ("3d_fullres.batch_size=2",))``;
    the last ``preset=`` wins, none means the default plans."""
    preset, rest = DEFAULT_PRESET, []
    for text in overrides:
        key, _, value = text.partition("=")
        if key == PRESET_FIELD:
            preset = value
        else:
            rest.append(text)
    return preset, tuple(rest)


# --------------------------------------------------------------------------- value helpers


def format_value(value: Any) -> str:
    """A YAML value as the text ``--set key=value`` parses: ``true``, ``0.003``, ``48,64,48``, ``none``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def name_value(value: Any) -> str:
    """A value as it appears in a variant name: like `format_value`, lists joined by ``x`` (48x64x48)."""
    if isinstance(value, (list, tuple)):
        return "x".join(name_value(v) for v in value)
    return format_value(value)


def safe_name(text: str) -> str:
    """A filesystem- and job-id-safe form of a derived name (stable: same text, same result)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text).strip("._") or "variant"
    if len(cleaned) > MAX_VARIANT_NAME_CHARS:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[:MAX_VARIANT_NAME_CHARS - 9]}~{digest}"
    return cleaned


def dirname_of(name: str) -> str:
    """A variant name as a folder/`--variant` name (letters, digits, ``.``, ``_``, ``-`` only):
    ``=`` becomes ``-``, ``,`` becomes ``__``, anything else odd ``_``. Deterministic, so stable."""
    text = name.replace("=", "-").replace(",", "__")
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{augment: {mirror: false}}`` -> ``{"augment.mirror": False}`` (dotted keys pass through)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def canonical_json(obj: Any) -> str:
    """A value as sorted-key JSON: two settings are the same exactly when these texts are equal
    (so ``0.01`` and ``1e-2``, a list and a tuple, compare equal)."""
    return json.dumps(to_jsonable(obj), sort_keys=True)
