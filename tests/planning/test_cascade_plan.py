"""Planning the cascade: 3d_cascade_fullres comes with every 3d_lowres, and naming it forces both."""

from __future__ import annotations

import json

import pytest

from autoseg.common.jsonio import record_from_dict, record_to_dict
from autoseg.fingerprint import Fingerprint
from autoseg.planning import rules
from autoseg.planning.plan import plan_dataset
from autoseg.planning.plans import Plan
from tests.planning.conftest import make_fingerprint


@pytest.fixture(scope="module")
def large_ct_fingerprint() -> Fingerprint:
    """30 CT cases of 400 x 512 x 512 voxels: the 3d_fullres patch covers < 25 %, so 3d_lowres is planned."""
    return make_fingerprint([(400, 512, 512)] * 30, [(1.0, 0.8, 0.8)] * 30, channel_names={0: "CT"})


def test_lowres_by_the_rule_brings_the_cascade(large_ct_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(large_ct_fingerprint)
    full, low, cascade = (plan.configuration(n) for n in ("3d_fullres", "3d_lowres", "3d_cascade_fullres"))
    assert cascade.previous_stage == "3d_lowres" and low.next_stage == "3d_cascade_fullres"
    # the fullres network and data, plus the link: no second preprocessing
    assert cascade.data_identifier == full.data_identifier == "3d_fullres"
    assert (cascade.spacing, cascade.patch_size, cascade.strides) == (full.spacing, full.patch_size, full.strides)
    assert full.previous_stage is None and full.next_stage is None
    assert list(plan.configurations)[-1] == "3d_cascade_fullres"


def test_no_lowres_no_cascade_unless_named(hippocampus_like_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint)
    assert set(plan.configurations) == {"2d", "3d_fullres"}
    assert "no 3d_lowres" in plan.reasons["3d_cascade_fullres"]
    assert set(plan_dataset(hippocampus_like_fingerprint, configs=("2d", "3d_fullres")).configurations) == {
        "2d", "3d_fullres"}

    forced = plan_dataset(hippocampus_like_fingerprint, configs=("3d_fullres", "3d_cascade_fullres"))
    assert list(forced.configurations) == ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    full, low = forced.configuration("3d_fullres"), forced.configuration("3d_lowres")
    assert all(lo >= f for lo, f in zip(low.spacing, full.spacing)) and low.spacing != full.spacing
    ratio = (full.median_shape[0] * full.median_shape[1] * full.median_shape[2]) / (
        low.median_shape[0] * low.median_shape[1] * low.median_shape[2])
    assert ratio >= rules.LOWRES_MIN_VOXEL_RATIO * 0.9  # rounding of the median shapes
    assert "forced" in low.reasons["spacing"] and "forced" in forced.reasons["3d_lowres"]
    assert full.batch_dice and not low.batch_dice  # nnU-Net's choice once a lowres stage exists
    # naming 3d_lowres alone forces the same two stages
    again = plan_dataset(hippocampus_like_fingerprint, configs=("3d_lowres",))
    assert list(again.configurations) == ["3d_lowres", "3d_cascade_fullres"]
    assert again.configuration("3d_lowres") == low


def test_cascade_overrides_and_plan_round_trip(large_ct_fingerprint: Fingerprint,
                                              anisotropic_ct_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(large_ct_fingerprint, overrides=["3d_cascade_fullres.batch_size=3"])
    assert plan.configuration("3d_cascade_fullres").batch_size == 3
    assert "set by user" in plan.configuration("3d_cascade_fullres").reasons["batch_size"]
    back = record_from_dict(Plan, json.loads(json.dumps(record_to_dict(plan))))
    assert back == plan
    # a plans.json written before the cascade existed (no stage keys) still loads, fields default to None
    old = record_to_dict(plan_dataset(anisotropic_ct_fingerprint, configs=("3d_fullres",)))
    for cfg in old["configurations"].values():
        cfg.pop("previous_stage"), cfg.pop("next_stage")
    loaded = record_from_dict(Plan, json.loads(json.dumps(old)))
    assert loaded.configuration("3d_fullres").previous_stage is None


def test_unknown_stage_link_is_refused(anisotropic_ct_fingerprint: Fingerprint) -> None:
    from autoseg.common.errors import ConfigError

    with pytest.raises(ConfigError, match="not a configuration"):
        plan_dataset(anisotropic_ct_fingerprint, configs=("3d_fullres",),
                     overrides=["3d_fullres.previous_stage=3d_lowres"])
