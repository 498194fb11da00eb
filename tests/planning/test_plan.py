"""plan_dataset on hand-built fingerprints: nnU-Net's goldens, configurations, overrides, plans.json."""

from __future__ import annotations

import json

import pytest

from autoseg.common.errors import AutosegError, ConfigError
from autoseg.fingerprint import Fingerprint
from autoseg.planning.plan import apply_plan_overrides, plan_dataset
from autoseg.planning.store import load_plan, load_plan_file, plan_differences, save_plan
from tests.planning.conftest import make_fingerprint


def test_hippocampus_goldens(hippocampus_like_fingerprint: Fingerprint) -> None:
    """nnU-Net v2's plans for Dataset004_Hippocampus (nnUNetPlans.json, 8 GB)."""
    plan = plan_dataset(hippocampus_like_fingerprint)
    assert list(plan.configurations) == ["2d", "3d_fullres"]
    full = plan.configuration("3d_fullres")
    assert full.spacing == (1.0, 1.0, 1.0)
    assert full.patch_size == (40, 56, 40)
    assert full.num_pools_per_axis == (3, 3, 3)
    assert full.batch_size == 9
    assert full.features_per_stage == (32, 64, 128, 256)
    assert full.batch_dice is False
    two = plan.configuration("2d")
    assert (two.patch_size, two.batch_size, two.spacing) == ((56, 40), 366, (1.0, 1.0))
    assert plan.transpose_forward == (0, 1, 2)
    assert plan.normalization[0].scheme == "zscore" and not plan.normalization[0].use_nonzero_mask
    assert "3d_lowres" in plan.reasons and "no 3d_lowres" in plan.reasons["3d_lowres"]


def test_thick_slice_ct_goldens(anisotropic_ct_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(anisotropic_ct_fingerprint)
    full = plan.configuration("3d_fullres")
    assert full.spacing == (5.0, 0.7, 0.7)
    assert plan.transpose_forward == (0, 1, 2)
    assert full.patch_size == (28, 192, 192)
    assert full.kernel_sizes[0] == (1, 3, 3) and full.strides[1] == (1, 2, 2)
    assert plan.normalization[0].scheme == "ct"
    assert (plan.normalization[0].clip_low, plan.normalization[0].clip_high) == (-80.0, 310.0)
    assert "3d_lowres" not in plan.configurations
    assert all(c.reasons.get(k) for c in plan.configurations.values()
               for k in ("patch_size", "batch_size", "strides", "spacing", "estimated_vram_gb"))


def test_transposed_data_gets_the_same_network(anisotropic_ct_fingerprint: Fingerprint) -> None:
    """The coarse axis last in the files: transposed first, then planned exactly as before."""
    z_last = make_fingerprint([(192, 192, 25)] * 20, [(0.7, 0.7, 5.0)] * 20, channel_names={0: "CT"},
                              labels={"background": 0, "organ": 1})
    plan, ref = plan_dataset(z_last), plan_dataset(anisotropic_ct_fingerprint)
    assert plan.transpose_forward == (2, 0, 1)
    assert plan.transpose_backward == (1, 2, 0)
    assert plan.original_median_spacing == (0.7, 0.7, 5.0)
    for name in ("2d", "3d_fullres"):
        a, b = plan.configuration(name), ref.configuration(name)
        assert (a.spacing, a.patch_size, a.strides, a.kernel_sizes) == (b.spacing, b.patch_size, b.strides,
                                                                      b.kernel_sizes)


def test_large_ct_gets_a_lowres_stage() -> None:
    fp = make_fingerprint([(400, 512, 512)] * 30, [(1.0, 0.8, 0.8)] * 30, channel_names={0: "CT"})
    plan = plan_dataset(fp)
    full, low = plan.configuration("3d_fullres"), plan.configuration("3d_lowres")
    assert all(lo > fu for lo, fu in zip(low.spacing, full.spacing))
    assert low.median_shape[0] < full.median_shape[0]
    assert full.batch_dice is True and low.batch_dice is False
    assert low.data_identifier != full.data_identifier
    assert plan.configuration("2d").patch_size == (512, 512)


def test_configs_restrict_what_is_planned(hippocampus_like_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint, configs=("3d_fullres",))
    assert list(plan.configurations) == ["3d_fullres"]
    with pytest.raises(ConfigError, match="did you mean '3d_fullres'"):
        plan_dataset(hippocampus_like_fingerprint, configs=("3d_fulres",))
    with pytest.raises(ConfigError, match="GPU memory"):
        plan_dataset(hippocampus_like_fingerprint, gpu_memory_gb=0)


def test_2d_images_get_only_a_2d_configuration() -> None:
    fp = make_fingerprint([(1, 256, 256)] * 10, [(999.0, 0.5, 0.5)] * 10)
    plan = plan_dataset(fp)
    assert list(plan.configurations) == ["2d"]
    assert plan.configuration("2d").patch_size == (256, 256)


def test_more_memory_means_a_bigger_patch() -> None:
    fp = make_fingerprint([(300, 300, 300)] * 50, [(1.0, 1.0, 1.0)] * 50)
    small = plan_dataset(fp, 8.0).configuration("3d_fullres")
    big = plan_dataset(fp, 80.0).configuration("3d_fullres")
    assert big.patch_size[0] * big.patch_size[1] * big.patch_size[2] > \
        small.patch_size[0] * small.patch_size[1] * small.patch_size[2]
    assert big.estimated_vram_gb > small.estimated_vram_gb


# --------------------------------------------------------------------------- overrides


def test_patch_override_rederives_topology_and_memory(hippocampus_like_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint)
    new = apply_plan_overrides(plan, ["3d_fullres.patch_size=48,64,48", "3d_fullres.batch_size=4"])
    full = new.configuration("3d_fullres")
    assert (full.patch_size, full.batch_size) == ((48, 64, 48), 4)
    assert full.num_pools_per_axis == (3, 3, 3)
    assert len(full.features_per_stage) == len(full.strides) == len(full.kernel_sizes)
    assert full.estimated_vram_gb != plan.configuration("3d_fullres").estimated_vram_gb
    assert full.reasons["patch_size"].startswith("set by user")
    assert new.overrides == ("3d_fullres.patch_size=48,64,48", "3d_fullres.batch_size=4")
    assert new.configuration("2d") == plan.configuration("2d")


def test_bigger_patch_gets_more_stages(hippocampus_like_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint, overrides=["3d_fullres.patch_size=128,128,128"])
    full = plan.configuration("3d_fullres")
    assert full.num_pools_per_axis == (5, 5, 5)
    assert full.features_per_stage == (32, 64, 128, 256, 320, 320)
    assert "re-derived" in full.reasons["strides"]


def test_typed_overrides(hippocampus_like_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint, overrides=[
        "2d.features_per_stage=[16,32,64,128]", "2d.batch_dice=false", "3d_fullres.strides=1,1,1;2,2,2;2,2,2",
        "3d_fullres.resample_order_data=1"])
    two, full = plan.configuration("2d"), plan.configuration("3d_fullres")
    assert two.features_per_stage == (16, 32, 64, 128) and two.batch_dice is False
    assert full.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2))
    assert len(full.kernel_sizes) == 3 and full.features_per_stage == (32, 64, 128)
    assert full.resample_order_data == 1


def test_spacing_override_gets_its_own_data(hippocampus_like_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint, overrides=["3d_fullres.spacing=2,2,2",
                                                                 "3d_fullres.patch_size=24,32,24"])
    full = plan.configuration("3d_fullres")
    assert full.spacing == (2.0, 2.0, 2.0)
    assert full.median_shape == (18, 25, 18)
    assert full.data_identifier == "3d_fullres_2x2x2"


@pytest.mark.parametrize("override, message", [
    ("3d_fullres.patch_sise=48,64,48", "did you mean 'patch_size'"),
    ("3d_fulres.patch_size=48,64,48", "did you mean '3d_fullres'"),
    ("3d_fullres.batch_size=four", "cannot read 'four' as an integer"),
    ("3d_fullres.patch_size=48,64", "needs 3 values"),
    ("3d_fullres.patch_size=50,64,48", "not a multiple of 8"),
    ("3d_fullres.features_per_stage=32,64", "stages"),
    ("3d_fullres.name=x", "unknown key"),
    ("patch_size=48,64,48", "CONFIG.KEY=VALUE"),
    ("3d_fullres.next_stage=3d_lowres", "not a configuration"),
])
def test_bad_overrides_are_config_errors(hippocampus_like_fingerprint: Fingerprint, override: str,
                                         message: str) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint)
    with pytest.raises(ConfigError, match=message):
        apply_plan_overrides(plan, [override])


# --------------------------------------------------------------------------- plans.json


def test_plan_json_round_trip(paths, anisotropic_ct_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(anisotropic_ct_fingerprint, overrides=["3d_fullres.batch_size=3"])
    file = save_plan(paths, plan)
    data = json.loads(file.read_text(encoding="utf-8"))
    assert (data["schema"], data["schema_version"]) == ("autoseg.plan", 2)
    assert load_plan(paths, plan.dataset) == plan
    assert load_plan_file(file) == plan
    assert plan_differences(plan, load_plan_file(file)) == []


def test_missing_or_broken_plan_is_a_clear_error(paths) -> None:
    with pytest.raises(AutosegError, match="autoseg plan"):
        load_plan(paths, "Dataset004_Hippocampus")
    file = paths.plans_file("Dataset004_Hippocampus")
    file.parent.mkdir(parents=True)
    file.write_text('{"schema": "autoseg.plan", "schema_version": 1, "dataset": "x"}')
    with pytest.raises(AutosegError, match="missing key"):
        load_plan(paths, "Dataset004_Hippocampus")
