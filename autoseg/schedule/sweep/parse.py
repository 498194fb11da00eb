"""Reading a sweep file: YAML -> a fully validated `SweepSpec` (every problem found, one line each).

Trainer keys are checked as typed values against `TrainerConfig` (`apply_overrides` of a
``{key: value}`` mapping, `autoseg.common.values.check_value`), ``plan.<config>.<field>`` keys
against `Configuration`'s fields; the records and naming rules are in `autoseg.schedule.sweep.spec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoseg.common.errors import AutosegError, ConfigError, ConfigErrors
from autoseg.common.jsonio import load_record
from autoseg.common.paths import DATASET_NAME_RE, Paths, is_folder_name
from autoseg.common.values import check_value, did_you_mean
from autoseg.planning.plan import apply_plan_overrides
from autoseg.planning.plans import Configuration, Plan
from autoseg.planning.presets import DEFAULT_PRESET, PRESETS
from autoseg.schedule.sweep.spec import (BASELINE_NAME, DEFAULT_FOLDS, DEFAULT_SEEDS, PLAN_FIELDS_NOT_OVERRIDABLE,
                                         PLAN_PREFIX, PRESET_FIELD, REQUIRED_KEYS, TOP_LEVEL_KEYS, VARIANT_NAME_RE,
                                         SweepSpec, Variant, canonical_json, flatten, format_value, name_value,
                                         safe_name, split_preset)
from autoseg.track.spec import parse_track_spec
from autoseg.train.config import SWITCH_WORDS, TrainerConfig, apply_overrides

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- trainer / plan keys


def _default_trainer_config() -> TrainerConfig:
    return TrainerConfig()


def _apply_trainer(cfg: TrainerConfig, values: typing.Iterable[tuple[str, Any]], where: str) -> TrainerConfig:
    """`apply_overrides` of typed YAML values (checked once, not re-read from text), errors at ``where``."""
    return apply_overrides(cfg, dict(values), where=lambda _key: where)


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class _PlanKey:
    config: str
    field: str

    @property
    def text(self) -> str:
        return f"{PLAN_PREFIX}{self.field}" if self.field == PRESET_FIELD else f"{PLAN_PREFIX}{self.config}.{self.field}"


_CONFIGURATION_TYPES = typing.get_type_hints(Configuration)


def _parse_plan_key(key: str, configs: tuple[str, ...], where: str) -> _PlanKey:
    rest = key[len(PLAN_PREFIX):]
    if rest == PRESET_FIELD:
        return _PlanKey("", PRESET_FIELD)
    config, _, fld = rest.partition(".")
    if not config or not fld:
        raise ConfigError("plan keys look like plan.<config>.<field> (e.g. plan.3d_fullres.patch_size)", where)
    if config not in configs:
        raise ConfigError(f"configuration {config!r} is not one of the sweep's configs {list(configs)}", where)
    allowed = sorted(set(_CONFIGURATION_TYPES) - PLAN_FIELDS_NOT_OVERRIDABLE)
    if fld not in _CONFIGURATION_TYPES:
        raise ConfigError(f"unknown plan field {fld!r}{did_you_mean(fld, allowed)}; "
                          f"overridable: {', '.join(allowed)}", where)
    if fld in PLAN_FIELDS_NOT_OVERRIDABLE:
        raise ConfigError(f"plan field {fld!r} is derived by autoseg and cannot be overridden", where)
    return _PlanKey(config, fld)


def _canonical_plan_value(pk: _PlanKey, value: Any, where: str) -> tuple[str, str]:
    """Type-check a plan value; return (canonical text for comparisons, override string)."""
    if pk.field == PRESET_FIELD:
        if not isinstance(value, str) or value not in PRESETS:
            raise ConfigError(f"expected a plans preset ({', '.join(PRESETS)}), got {value!r}", where)
        return canonical_json(value), f"{PRESET_FIELD}={value}"
    tp = _CONFIGURATION_TYPES[pk.field]
    typed = check_value(value, tp, where)
    return canonical_json(typed), f"{pk.config}.{pk.field}={format_value(typed)}"


# --------------------------------------------------------------------------- parsing


@dataclass
class _Problems:
    """The problems found so far in one sweep file: each check runs under `collect`, so one bad
    key does not hide the next; `raise_all` reports them together (one line each)."""

    found: list[ConfigError] = field(default_factory=list)

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except ConfigErrors as e:
            self.found.extend(e.errors)
        except ConfigError as e:
            self.found.append(e)

    def raise_all(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigErrors(self.found)


@dataclass
class _Ctx:
    """What validating one sweep file needs to carry around (local to one `parse_sweep` call)."""

    source: str
    configs: tuple[str, ...]
    base_cfg: TrainerConfig
    problems: _Problems = field(default_factory=_Problems)
    base_preset: str = DEFAULT_PRESET

    def where(self, key: str) -> str:
        return f"{self.source}:{key}"


@dataclass(frozen=True)
class _Point:
    """A candidate variant while parsing: its overrides, canonical identity and name parts."""

    trainer: tuple[tuple[str, Any], ...]
    plan: tuple[tuple[_PlanKey, Any], ...]
    where: str


def _check_trainer_value(ctx: _Ctx, key: str, value: Any, where: str) -> Any:
    """Validate one trainer override; return the resulting field value (for naming/comparison)."""
    if key == "seed":
        raise ConfigError("set seeds with the top-level 'seeds:' list, not as an override", where)
    if isinstance(value, Mapping):
        raise ConfigError(f"expected a value, got a mapping {dict(value)!r}", where)
    return _get_dotted(_apply_trainer(ctx.base_cfg, [(key, value)], where), key)


def _split_overrides(ctx: _Ctx, body: Mapping[str, Any], where_prefix: str
                     ) -> tuple[list[tuple[str, Any]], list[tuple[_PlanKey, Any]]]:
    """Validate a flat mapping of overrides; separate trainer keys from ``plan.*`` keys."""
    trainer, plan = [], []
    for key, value in flatten(body).items():
        where = ctx.where(f"{where_prefix}{key}")
        with ctx.problems.collect():
            if key.startswith(PLAN_PREFIX):
                pk = _parse_plan_key(key, ctx.configs, where)
                _canonical_plan_value(pk, value, where)
                plan.append((pk, value))
            else:
                _check_trainer_value(ctx, key, value, where)
                trainer.append((key, value))
    return trainer, plan


def _require_list(data: Mapping[str, Any], key: str, source: str, default: tuple = ()) -> list:
    value = data.get(key, list(default))
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"expected a list, got {value!r}", f"{source}:{key}")
    if not value:
        raise ConfigError("must not be empty", f"{source}:{key}")
    if len({json.dumps(v, sort_keys=True, default=str) for v in value}) != len(value):
        raise ConfigError(f"has duplicate entries {value!r}", f"{source}:{key}")
    return value


def _parse_header(data: Mapping[str, Any], source: str, problems: _Problems
                  ) -> tuple[str, str, list, list, list, list]:
    """The top-level keys; each problem goes to ``problems`` (its key then gets an empty value)."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.found.append(ConfigError(f"unknown key{did_you_mean(str(key), TOP_LEVEL_KEYS)}; "
                                              f"allowed: {', '.join(TOP_LEVEL_KEYS)}", f"{source}:{key}"))
    for key in REQUIRED_KEYS:
        if key not in data:
            problems.found.append(ConfigError("missing (required)", f"{source}:{key}"))
    name, description = str(data.get("name", "")), ""
    datasets: list = []
    configs: list = []
    folds: list = []
    seeds: list = []
    with problems.collect():
        if "name" in data and (not isinstance(data["name"], str) or not is_folder_name(data["name"])):
            raise ConfigError(f"expected a name of letters, digits, '_', '.', '-', got {data['name']!r}",
                              f"{source}:name")
    with problems.collect():
        description = data.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"expected text, got {description!r}", f"{source}:description")
    with problems.collect():
        datasets = _require_list(data, "datasets", source) if "datasets" in data else []
    with problems.collect():
        configs = _require_list(data, "configs", source) if "configs" in data else []
        for c in configs:
            if not isinstance(c, str) or not VARIANT_NAME_RE.match(c):
                raise ConfigError(f"expected configuration names like 3d_fullres, got {c!r}", f"{source}:configs")
    with problems.collect():
        folds = _require_list(data, "folds", source, DEFAULT_FOLDS)
        for f in folds:
            if not ((isinstance(f, int) and not isinstance(f, bool) and f >= 0) or f == "all"):
                raise ConfigError(f"folds are integers >= 0 or 'all', got {f!r}", f"{source}:folds")
    with problems.collect():
        seeds = _require_list(data, "seeds", source, DEFAULT_SEEDS)
        for s in seeds:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise ConfigError(f"seeds are integers >= 0, got {s!r}", f"{source}:seeds")
    return name, description, datasets, configs, folds, seeds


def _resolve_datasets(datasets: list, paths: Paths | None, source: str, problems: _Problems) -> tuple[str, ...]:
    """Full dataset names; each must exist in the raw or preprocessed root (each bad one a problem)."""
    out = []
    for ds in datasets:
        with problems.collect():
            out.append(_resolve_dataset(ds, paths, f"{source}:datasets"))
    return tuple(out)


def _resolve_dataset(ds: Any, paths: Paths | None, where: str) -> str:
    if not isinstance(ds, (str, int)) or isinstance(ds, bool):
        raise ConfigError(f"expected dataset names, got {ds!r}", where)
    if paths is None:
        if not DATASET_NAME_RE.match(str(ds)):
            raise ConfigError(f"expected a DatasetXXX_Name, got {ds!r}", where)
        return str(ds)
    try:
        full = paths.resolve_dataset(ds)
    except AutosegError as e:
        raise ConfigError(f"unknown dataset {ds!r}: {e.message}", where) from None
    if not (paths.raw_dataset(full).is_dir() or paths.plans_file(full).is_file()):
        known = paths.list_raw_datasets()
        raise ConfigError(f"unknown dataset {full!r}: not in {paths.raw}{did_you_mean(full, known)}", where)
    return full


def _grid_points(ctx: _Ctx, grid: Any) -> list[_Point]:
    """The cartesian product of the grid axes, each axis validated value by value."""
    if grid is None:
        return []
    if not isinstance(grid, Mapping):
        raise ConfigError("expected a mapping of key: [values]", ctx.where("grid"))
    axes: list[list[tuple[str, Any, bool]]] = []
    for key, values in flatten(grid).items():
        with ctx.problems.collect():
            axes.append(_grid_axis(ctx, key, values))
    points = []
    for combo in itertools.product(*axes):
        trainer = tuple((k, v) for k, v, is_plan in combo if not is_plan)
        plan = tuple((_parse_plan_key(k, ctx.configs, ctx.where(f"grid.{k}")), v)
                     for k, v, is_plan in combo if is_plan)
        points.append(_Point(trainer, plan, ctx.where("grid")))
    return points


def _grid_axis(ctx: _Ctx, key: str, values: Any) -> list[tuple[str, Any, bool]]:
    """One grid axis as ``(key, value, is_plan_key)``; a bad value is a problem, the others are still checked."""
    where = ctx.where(f"grid.{key}")
    if not isinstance(values, list):
        raise ConfigError(f"expected a list of values, got {values!r}", where)
    if not values:
        raise ConfigError("empty grid axis (give at least one value)", where)
    seen: dict[str, Any] = {}
    axis = []
    for value in values:
        with ctx.problems.collect():
            if key.startswith(PLAN_PREFIX):
                pk = _parse_plan_key(key, ctx.configs, where)
                ident, _ = _canonical_plan_value(pk, value, where)
                axis.append((key, value, True))
            else:
                ident = canonical_json(_check_trainer_value(ctx, key, value, where))
                axis.append((key, value, False))
            if ident in seen:
                raise ConfigError(f"values {seen[ident]!r} and {value!r} are the same setting", where)
            seen[ident] = value
    return axis


def _named_points(ctx: _Ctx, variants: Any) -> list[tuple[str, _Point]]:
    if variants is None:
        return []
    if not isinstance(variants, Mapping):
        raise ConfigError("expected a mapping of name: {key: value}", ctx.where("variants"))
    out = []
    for name, body in variants.items():
        where = ctx.where(f"variants.{name}")
        with ctx.problems.collect():
            if not isinstance(name, str) or not VARIANT_NAME_RE.match(name):
                raise ConfigError("variant names use letters, digits and _ . = , + - only", where)
            body = {} if body is None else body
            if not isinstance(body, Mapping):
                raise ConfigError(f"expected a mapping of overrides, got {body!r}", where)
            trainer, plan = _split_overrides(ctx, body, f"variants.{name}.")
            out.append((name, _Point(tuple(trainer), tuple(plan), where)))
    return out


def _point_identity(ctx: _Ctx, point: _Point) -> str:
    cfg = _apply_trainer(ctx.base_cfg, point.trainer, point.where)
    plan = sorted((pk.text, _canonical_plan_value(pk, v, point.where)[0]) for pk, v in point.plan
                  if not _is_base_preset(ctx, pk, v))
    return canonical_json({"trainer": cfg, "plan": plan})


def _grid_variant(ctx: _Ctx, point: _Point) -> Variant:
    """Name a grid point by the keys whose value differs from the base; all-defaults is the baseline."""
    parts, trainer = [], []
    for key, value in point.trainer:
        changed = _get_dotted(_apply_trainer(ctx.base_cfg, [(key, value)], point.where), key)
        if canonical_json(changed) != canonical_json(_get_dotted(ctx.base_cfg, key)):
            # on/off knobs are named by the setting (amp=off, augment.mirror=false), not by how YAML spelled it
            shown = changed if key in SWITCH_WORDS or isinstance(changed, bool) else value
            parts.append(f"{key}={name_value(shown)}")
            trainer.append(f"{key}={format_value(value)}")
    plan = []
    for pk, value in point.plan:
        if _is_base_preset(ctx, pk, value):  # plan.preset: [default, resenc-l]: the default is the baseline
            continue
        parts.append(f"{pk.text}={name_value(value)}")
        plan.append(_canonical_plan_value(pk, value, point.where)[1])
    name = safe_name(",".join(parts)) if parts else BASELINE_NAME
    return Variant(name=name, trainer_overrides=tuple(trainer), plan_overrides=tuple(plan), origin="grid")


def _is_base_preset(ctx: _Ctx, pk: _PlanKey, value: Any) -> bool:
    """A ``plan.preset`` value that is what the variant would get anyway (the base's, or the default)."""
    return pk.field == PRESET_FIELD and value == ctx.base_preset


def _named_variant(name: str, point: _Point) -> Variant:
    trainer = tuple(f"{k}={format_value(v)}" for k, v in point.trainer)
    plan = tuple(_canonical_plan_value(pk, v, point.where)[1] for pk, v in point.plan)
    return Variant(name=name, trainer_overrides=trainer, plan_overrides=plan, origin="named")


def _choose_baseline(ctx: _Ctx, variants: list[Variant], identities: list[str], requested: Any) -> list[Variant]:
    if requested is not None:
        names = [v.name for v in variants]
        if requested not in names:
            raise ConfigError(f"no variant named {requested!r}{did_you_mean(str(requested), names)}",
                              ctx.where("baseline"))
        index = names.index(requested)
    else:
        plain = canonical_json({"trainer": ctx.base_cfg, "plan": []})
        index = identities.index(plain) if plain in identities else 0
        if plain not in identities:
            log.info("sweep %s has no all-defaults variant; %s is the reference", ctx.source, variants[0].name)
    return [dataclasses.replace(v, baseline=(i == index)) for i, v in enumerate(variants)]


def parse_sweep(data: Any, source: str | Path, paths: Paths | None = None) -> SweepSpec:
    """Validate a sweep file's content and expand it into variants; nothing is run or written.

    Every problem is a `ConfigError` whose ``where`` is ``<file>:<key>``. With ``paths``, datasets
    must exist and, where a dataset is already planned, configs and plan overrides are checked
    against its plan too.
    """
    source = str(source)
    if not isinstance(data, Mapping):
        raise ConfigError("a sweep file is a YAML mapping (name:, datasets:, configs:, grid:, ...)", source)
    problems = _Problems()
    name, description, datasets, configs, folds, seeds = _parse_header(data, source, problems)
    try:  # a typo in track: fails before anything runs, not in every child
        parse_track_spec(str(data.get("track") or ""), f"{source}:track")
    except AutosegError as e:
        problems.found.append(ConfigError(e.message, e.where))
    resolved = _resolve_datasets(datasets, paths, source, problems)
    ctx = _Ctx(source=source, configs=tuple(configs), base_cfg=_default_trainer_config(), problems=problems)
    base = data.get("base") or {}
    base_trainer: list[tuple[str, Any]] = []
    base_plan: list[tuple[_PlanKey, Any]] = []
    with problems.collect():
        if not isinstance(base, Mapping):
            raise ConfigError(f"expected a mapping of overrides, got {base!r}", ctx.where("base"))
        base_trainer, base_plan = _split_overrides(ctx, base, "base.")
    base_trainer_strings = tuple(f"{k}={format_value(v)}" for k, v in base_trainer)
    with problems.collect():  # each key is valid alone; together they may not be (a cross-field check)
        ctx.base_cfg = _apply_trainer(ctx.base_cfg, base_trainer, ctx.where("base"))
    base_plan_strings = tuple(_canonical_plan_value(pk, v, ctx.where(f"base.{pk.text}"))[1]
                              for pk, v in base_plan)
    ctx.base_preset = split_preset(base_plan_strings)[0]

    grid: list[_Point] = []
    named: list[tuple[str, _Point]] = []
    with problems.collect():
        grid = _grid_points(ctx, data.get("grid"))
    with problems.collect():
        named = _named_points(ctx, data.get("variants"))
    problems.raise_all()  # every problem of the file so far, one line each
    if not grid and not named:
        raise ConfigError("a sweep needs a 'grid:' or 'variants:' (or both)", source)
    variants = [_grid_variant(ctx, p) for p in grid] + [_named_variant(n, p) for n, p in named]
    wheres = [p.where for p in grid] + [p.where for _, p in named]
    identities = [_point_identity(ctx, p) for p in grid] + [_point_identity(ctx, p) for _, p in named]
    seen_ident: dict[str, str] = {}
    seen_name: set[str] = set()
    seen_dir: dict[str, str] = {}
    for v, ident, where in zip(variants, identities, wheres):
        if ident in seen_ident:
            raise ConfigError(f"duplicate variant: {v.name!r} has the same overrides as "
                              f"{seen_ident[ident]!r}", where)
        if v.name in seen_name:
            raise ConfigError(f"duplicate variant name {v.name!r}", where)
        if v.dirname in seen_dir:
            raise ConfigError(f"variants {seen_dir[v.dirname]!r} and {v.name!r} would share the folder "
                              f"{v.dirname!r}; rename one", where)
        seen_ident[ident] = v.name
        seen_name.add(v.name)
        seen_dir[v.dirname] = v.name
    variants = _choose_baseline(ctx, variants, identities, data.get("baseline"))
    spec = SweepSpec(name=name, source=source, datasets=resolved, configs=tuple(configs),
                     folds=tuple(folds), seeds=tuple(seeds), base_trainer_overrides=base_trainer_strings,
                     base_plan_overrides=base_plan_strings, variants=tuple(variants),
                     description=description, track=str(data.get("track") or ""))
    if paths is not None:
        _check_against_plans(spec, paths, dict(zip((v.name for v in variants), wheres)))
    return spec


def _check_against_plans(spec: SweepSpec, paths: Paths, wheres: dict[str, str]) -> None:
    """Where a dataset is planned already: its configs exist and every plan override applies."""
    for ds in spec.datasets:
        for preset in dict.fromkeys(spec.preset(v) for v in spec.variants):
            _check_against_plan(spec, paths, ds, preset, wheres)


def _check_against_plan(spec: SweepSpec, paths: Paths, ds: str, preset: str, wheres: dict[str, str]) -> None:
    if not paths.plans_file(ds, preset).is_file():
        return
    plan = load_record(paths.plans_file(ds, preset), Plan)
    for c in spec.configs:
        if c not in plan.configurations:
            raise ConfigError(f"configuration {c!r} is not in the plan of {ds} "
                              f"(planned: {', '.join(plan.configurations)})", f"{spec.source}:configs")
    for v in spec.variants:
        if spec.preset(v) != preset:
            continue
        overrides = split_preset(spec.plan_overrides(v))[1]
        if overrides:
            try:
                apply_plan_overrides(plan, list(overrides))
            except AutosegError as e:
                raise ConfigError(f"{ds}: {e.message}", wheres[v.name]) from None


class _SweepLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's exponent floats without a dot (``1e-3``, ``5E-4``).

    PyYAML follows YAML 1.1, whose float pattern needs a dot, so ``lr: [1e-3]`` came out as the
    string ``'1e-3'``; every other YAML reader (and the user) sees a number.
    """


_SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_sweep(file: str | Path, paths: Paths | None = None) -> SweepSpec:
    """Read and validate a sweep YAML file (see `parse_sweep`)."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("sweep file not found", file) from None
    except OSError as e:
        raise ConfigError(f"cannot read ({e.strerror})", file) from None
    try:
        data = yaml.load(text, Loader=_SweepLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{line}: {getattr(e, 'problem', None) or e}", file) from None
    return parse_sweep(data, file, paths)
