"""plans.json on disk: save, load strictly, resolve ``--plans``, and compare two plans.

Reading a plan needs only the persisted `Plan` and the presets' names, not the planner
(fingerprinting, verification): the trainer, the scheduler and the CLI read plans through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record, record_to_dict, save_record
from autoseg.common.paths import Paths
from autoseg.planning.plans import Plan
from autoseg.planning.presets import DEFAULT_PRESET, PRESETS, get_preset


def save_plan(paths: Paths, plan: Plan) -> Path:
    """Write ``preprocessed/<dataset>/plans.json`` (``plans_<preset>.json`` for a preset) atomically."""
    return save_record(paths.plans_file(plan.dataset, plan.preset), plan)


def load_plan_file(path: str | Path) -> Plan:
    """Read a plans.json strictly (schema, version, keys)."""
    return load_record(path, Plan)


def load_plan(paths: Paths, dataset: str, preset: str = DEFAULT_PRESET) -> Plan:
    """The saved plan of a dataset (of a preset), or an error telling the user to run ``autoseg plan``."""
    get_preset(preset)
    file = paths.plans_file(dataset, preset)
    if not file.exists():
        if preset == DEFAULT_PRESET:
            raise AutosegError(f"no plan yet; run `autoseg plan {dataset}` first", file)
        raise AutosegError(f"no {preset} plan yet; run `autoseg plan {dataset} --preset {preset}` first", file)
    plan = load_plan_file(file)
    if plan.preset != preset:
        raise AutosegError(f"this file holds a {plan.preset!r} plan, expected {preset!r}", file)
    return plan


def resolve_plans(paths: Paths, dataset: str, plans: str | Path | None = None) -> Plan:
    """What ``--plans`` names: nothing (plans.json), a preset (``resenc-l``: plans_resenc-l.json) or a file.

    A preset whose plans file is missing fails with the ``autoseg plan --preset`` to run; a
    value that is neither a preset nor an existing file fails naming the known presets.
    """
    if plans is None or str(plans) in PRESETS:
        return load_plan(paths, dataset, DEFAULT_PRESET if plans is None else str(plans))
    file = Path(plans)
    if not file.is_file():
        if file.suffix or len(file.parts) > 1:  # meant as a file
            raise AutosegError("plan file not found", file)
        raise AutosegError(f"neither a plans preset ({', '.join(PRESETS)}) nor an existing plans file", file)
    return load_plan_file(file)


def plan_differences(old: Plan, new: Plan) -> list[str]:
    """Human-readable ``key: old -> new`` lines for the numbers that differ (reasons ignored)."""
    a, b = _comparable(old), _comparable(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key, '(absent)')} -> {b.get(key, '(absent)')}")
    return out


def _comparable(plan: Plan) -> dict[str, Any]:
    body = json.loads(json.dumps(record_to_dict(plan)))
    flat: dict[str, Any] = {}
    for key, value in body.items():
        if key == "configurations":
            for cname, cfg in value.items():
                flat.update({f"{cname}.{k}": v for k, v in cfg.items() if k != "reasons"})
        elif key != "reasons":
            flat[key] = value
    return flat

