"""``autoseg plan``: verify the raw dataset, fingerprint it (cached), plan it, write plans.json.

`plan_and_save` composes the stage: `autoseg.planning.plan.plan_dataset` (pure) or
`autoseg.planning.transfer.transfer_plan` (``--from-plans``), then `autoseg.planning.store`
writes ``preprocessed/<dataset>/plans.json`` atomically, refusing to replace a different plan
without ``force`` because preprocessed data and trainings depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths
from autoseg.dataset.spec import DatasetSpec
from autoseg.dataset.verify import verify_dataset
from autoseg.fingerprint import load_or_extract_fingerprint
from autoseg.planning.plan import check_config_names, check_override_syntax, plan_dataset
from autoseg.planning.plans import Plan
from autoseg.planning.presets import DEFAULT_PRESET, get_preset
from autoseg.planning.store import load_plan_file, plan_differences, save_plan
from autoseg.planning.transfer import load_source_plan, transfer_plan


@dataclass(frozen=True)
class PlanRequest:
    """What ``autoseg plan`` was asked for."""

    gpu_memory_gb: float | None = None
    """None: the preset's own target (8 GB for the default planner, 8 / 24 / 40 GB for ResEnc M / L / XL)."""
    configs: tuple[str, ...] | None = None
    overrides: tuple[str, ...] = ()
    num_workers: int = 1
    force: bool = False
    """Re-extract the fingerprint and replace a different existing plans.json."""
    progress_bar: bool = True
    from_plans: str | None = None
    """Take the configurations of this dataset's plans (or plans.json file) instead of planning
    them (`autoseg.planning.transfer`): the topology a pretrained network needs."""
    preset: str = DEFAULT_PRESET
    """Planner preset (`autoseg.planning.presets`); a preset other than the default writes
    ``plans_<preset>.json`` beside plans.json."""


@dataclass(frozen=True)
class PlanOutcome:
    """The plan and what happened to plans.json."""

    plan: Plan
    plans_file: Path
    written: bool
    """False when an identical plans.json was already there."""


def verify_raw_dataset(root: Path, num_workers: int = 1, show_progress: bool = True) -> DatasetSpec:
    """Full verification (every image read): planning on a broken dataset would mislead."""
    return verify_dataset(root, num_workers=num_workers, show_progress=show_progress)


def plan_and_save(paths: Paths, dataset: str, request: PlanRequest = PlanRequest()) -> PlanOutcome:
    """Verify, fingerprint (cached), plan and write plans.json (``autoseg plan``).

    With ``request.from_plans`` the configurations come from another dataset's plans
    (`autoseg.planning.transfer.transfer_plan`) and only the fingerprint is this dataset's. An
    existing, different plans file is replaced only with ``request.force``: preprocessed data and
    trainings were made with it.
    """
    check_config_names(request.configs)
    get_preset(request.preset)
    check_override_syntax(request.overrides)  # fail on a typo before reading any image
    name = paths.resolve_dataset(dataset)
    source = None
    if request.from_plans is not None:  # a missing source fails before reading any image too
        source = load_source_plan(paths, request.from_plans)
    spec = verify_raw_dataset(paths.raw_dataset(name), request.num_workers, request.progress_bar)
    fp = load_or_extract_fingerprint(paths, name, request.num_workers, request.force, spec=spec,
                                     progress_bar=request.progress_bar)
    if source is None:
        plan = plan_dataset(fp, request.gpu_memory_gb, request.configs, request.overrides, request.preset)
    else:
        plan = transfer_plan(source, fp, request.overrides)
    file = paths.plans_file(name, request.preset)
    if file.exists():
        try:
            diffs = plan_differences(load_plan_file(file), plan)
        except AutosegError as e:
            diffs = [f"the existing file is unreadable ({e.message})"]
        if not diffs:
            return PlanOutcome(plan, file, written=False)
        if not request.force:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise AutosegError(f"a different plan exists ({shown}); preprocessed data and trainings depend on "
                               "it: rerun with --force to replace it", file)
    save_plan(paths, plan)
    return PlanOutcome(plan, file, written=True)
