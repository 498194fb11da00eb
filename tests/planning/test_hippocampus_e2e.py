"""End to end on the real MSD Hippocampus (260 cases): nnU-Net's plan, and `autoseg plan` as a user runs it."""

from __future__ import annotations

import json

from click.testing import CliRunner

import autoseg.cli
from autoseg.common.paths import Paths
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.planning.store import load_plan

DATASET = "Dataset004_Hippocampus"


def _plan(paths: Paths, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                "--results", str(paths.results), "plan", *args])


def test_real_hippocampus_matches_nnunet(hippocampus_full_copy: Paths) -> None:
    """nnU-Net v2's Dataset004 plans (8 GB): 1 mm, [40, 56, 40] x 9 in 3D, [56, 40] x 366 in 2D."""
    outcome = plan_and_save(hippocampus_full_copy, "4", PlanRequest(gpu_memory_gb=8.0, progress_bar=False))
    plan = outcome.plan
    full, two = plan.configuration("3d_fullres"), plan.configuration("2d")
    assert full.spacing == (1.0, 1.0, 1.0)
    assert full.patch_size == (40, 56, 40)
    assert full.num_pools_per_axis == (3, 3, 3)
    assert full.batch_size == 9
    assert full.median_shape == (36, 50, 35)
    assert (two.patch_size, two.batch_size) == ((56, 40), 366)
    assert "3d_lowres" not in plan.configurations
    assert outcome.written and load_plan(hippocampus_full_copy, DATASET) == plan


def test_cli_plans_prints_reasons_and_protects_the_plan(hippocampus_full_copy: Paths) -> None:
    paths = hippocampus_full_copy
    first = _plan(paths, "4", "--gpu-memory", "8", "--configs", "2d", "3d_fullres")
    assert first.exit_code == 0, first.output
    assert "40 x 56 x 40" in first.stdout and "capped so a batch covers at most 5%" in first.stdout
    assert "written" in first.stdout
    again = _plan(paths, DATASET, "--gpu-memory", "8")
    assert again.exit_code == 0 and "unchanged" in again.stdout

    changed = _plan(paths, DATASET, "--gpu-memory", "8", "--set", "3d_fullres.patch_size=48,64,48")
    assert changed.exit_code == 2
    assert "plans.json: a different plan exists" in changed.stderr and "--force" in changed.stderr
    assert load_plan(paths, DATASET).configuration("3d_fullres").patch_size == (40, 56, 40)

    forced = _plan(paths, DATASET, "--gpu-memory", "8", "--set", "3d_fullres.patch_size=48,64,48", "--force")
    assert forced.exit_code == 0, forced.output
    saved = json.loads(paths.plans_file(DATASET).read_text(encoding="utf-8"))
    assert saved["configurations"]["3d_fullres"]["patch_size"] == [48, 64, 48]
    assert saved["overrides"] == ["3d_fullres.patch_size=48,64,48"]


def test_cli_configs_take_several_values_and_typos_fail_early(hippocampus_full_copy: Paths) -> None:
    paths = hippocampus_full_copy
    only = _plan(paths, "--configs", "3d_fullres", "2d", "--gpu-memory", "8", "4")
    assert only.exit_code == 0, only.output
    assert set(load_plan(paths, DATASET).configurations) == {"2d", "3d_fullres"}
    typo = _plan(paths, DATASET, "--configs", "3d_fulres")
    assert typo.exit_code == 2
    assert typo.stderr.strip() == ("error: --configs: unknown configuration '3d_fulres'; did you mean "
                                   "'3d_fullres'? (known: 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres)")
    bad_key = _plan(paths, DATASET, "--set", "3d_fullres.batchsize=2")
    assert bad_key.exit_code == 2 and "did you mean 'batch_size'" in bad_key.stderr
    missing = _plan(paths, "Dataset123_Nothing")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ")
