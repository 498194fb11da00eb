"""Sweep files: parsing, validation (one error naming file and key), variant naming, the sweep record."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.schedule.sweep import (
    BASELINE_NAME,
    MAX_VARIANT_NAME_CHARS,
    SweepSpec,
    format_value,
    load_sweep,
    name_value,
    parse_sweep,
    safe_name,
)
from autoseg.schedule.sweep.jobs import record_sweep, sweep_record_file
from tests.sweep_fixtures import minimal_sweep, write_sweep

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sweeps"


def _error(tmp_path: Path, body: dict, paths: Paths | None = None) -> ConfigError:
    file = write_sweep(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_sweep(file, paths)
    assert info.value.where.startswith(str(file))
    return info.value


# --------------------------------------------------------------------------- valid files


def test_grid_names_leave_out_default_values_and_baseline_is_all_defaults(tmp_path: Path) -> None:
    spec = load_sweep(write_sweep(tmp_path, minimal_sweep()))
    names = [v.name for v in spec.variants]
    assert names == [BASELINE_NAME, "augment.mirror=false", "lr=0.003", "lr=0.003,augment.mirror=false"]
    assert [v.baseline for v in spec.variants] == [True, False, False, False]
    assert spec.baseline.trainer_overrides == ()
    assert spec.variant("lr=0.003,augment.mirror=false").trainer_overrides == ("lr=0.003", "augment.mirror=false")
    assert spec.base_trainer_overrides == ("epochs=1",)
    assert spec.trainer_overrides(spec.variant("lr=0.003")) == ("epochs=1", "lr=0.003")
    assert spec.folds == (0, 1) and spec.seeds == (0,)


def test_names_are_stable_and_adding_a_value_only_adds_variants(tmp_path: Path) -> None:
    first = load_sweep(write_sweep(tmp_path, minimal_sweep()))
    again = load_sweep(write_sweep(tmp_path, minimal_sweep(), "again.yaml"))
    assert [v.name for v in first.variants] == [v.name for v in again.variants]
    grown = load_sweep(write_sweep(tmp_path, minimal_sweep(grid={"lr": [0.01, 0.003, 0.001],
                                                                  "augment.mirror": [True, False]}), "grown.yaml"))
    assert {v.name for v in first.variants} < {v.name for v in grown.variants}
    assert len(grown.variants) == 6
    # a new grid key that includes its default value keeps the old names too
    more = load_sweep(write_sweep(tmp_path, minimal_sweep(grid={"lr": [0.01, 0.003], "augment.mirror": [True, False],
                                                                 "loss": ["dice_ce", "dice"]}), "more.yaml"))
    assert {v.name for v in first.variants} < {v.name for v in more.variants}


def test_the_shipped_examples_parse(tmp_path: Path) -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 3
    for file in files:
        spec = load_sweep(file)
        assert sum(v.baseline for v in spec.variants) == 1, file
        assert len({v.name for v in spec.variants}) == len(spec.variants)
    lr = load_sweep(EXAMPLES / "lr_and_mirroring.yaml")
    assert lr.variant("big_patch").plan_overrides == ("3d_fullres.patch_size=48,64,48",)
    assert lr.variant("big_patch").origin == "named"


def test_nested_mappings_flatten_to_dotted_keys(tmp_path: Path) -> None:
    body = minimal_sweep(grid=None, variants={"no_mirror": {"augment": {"mirror": False}},
                                               "plain": {},
                                               "patch": {"plan": {"3d_fullres": {"patch_size": [40, 56, 40]}}}})
    spec = load_sweep(write_sweep(tmp_path, body))
    assert spec.variant("no_mirror").trainer_overrides == ("augment.mirror=false",)
    assert spec.variant("patch").plan_overrides == ("3d_fullres.patch_size=40,56,40",)
    assert spec.baseline.name == "plain"  # an empty named variant is the all-defaults one


def test_plan_keys_in_a_grid_are_always_named(tmp_path: Path) -> None:
    body = minimal_sweep(grid={"plan.3d_fullres.patch_size": [[32, 48, 32], [40, 56, 40]]})
    spec = load_sweep(write_sweep(tmp_path, body))
    assert [v.name for v in spec.variants] == ["plan.3d_fullres.patch_size=32x48x32",
                                               "plan.3d_fullres.patch_size=40x56x40"]
    assert spec.variants[0].baseline  # no all-defaults point: the first is the reference
    assert spec.variants[1].plan_overrides == ("3d_fullres.patch_size=40,56,40",)


def test_explicit_baseline(tmp_path: Path) -> None:
    spec = load_sweep(write_sweep(tmp_path, minimal_sweep(baseline="lr=0.003")))
    assert spec.baseline.name == "lr=0.003"
    err = _error(tmp_path, minimal_sweep(baseline="lr=0.03"))
    assert err.where.endswith(":baseline") and "lr=0.003" in err.message


def test_single_values_and_default_folds(tmp_path: Path) -> None:
    spec = load_sweep(write_sweep(tmp_path, minimal_sweep(folds=None, seeds=[0, 1, 2], datasets="Dataset004_Hippocampus")))
    assert spec.folds == (0, 1, 2, 3, 4)
    assert spec.seeds == (0, 1, 2)
    assert spec.datasets == ("Dataset004_Hippocampus",)


# --------------------------------------------------------------------------- invalid files


def test_unknown_top_level_key(tmp_path: Path) -> None:
    body = minimal_sweep()
    body["gird"] = body.pop("grid")
    err = _error(tmp_path, body)
    assert err.where.endswith(":gird") and "did you mean 'grid'" in err.message


def test_unknown_trainer_key_suggests(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(grid={"lrr": [0.01]}))
    assert err.where.endswith(":grid.lrr") and "lr" in err.message
    err = _error(tmp_path, minimal_sweep(base={"epoch": 3}))
    assert err.where.endswith(":base.epoch") and "epochs" in err.message
    err = _error(tmp_path, minimal_sweep(variants={"x": {"augment.mirrror": False}}))
    assert err.where.endswith(":variants.x.augment.mirrror")


@pytest.mark.parametrize("key,values,expected", [
    ("lr", ["fast"], "number"),
    ("augment.mirror", [2], "bool"),  # 0 and 1 are on/off, 2 is neither
    ("epochs", [1.5], "int"),
    ("lr", ["0.01"], "float"),
    ("augment.scale_range", [[0.7]], "tuple"),
])
def test_wrong_types(tmp_path: Path, key: str, values: list, expected: str) -> None:
    err = _error(tmp_path, minimal_sweep(grid={key: values}))
    assert err.where.endswith(f":grid.{key}")
    assert expected in err.message or "expected" in err.message


def test_wrong_type_of_list_fields(tmp_path: Path) -> None:
    assert _error(tmp_path, minimal_sweep(folds=[0, -1])).where.endswith(":folds")
    assert _error(tmp_path, minimal_sweep(seeds=["a"])).where.endswith(":seeds")
    assert _error(tmp_path, minimal_sweep(grid={"lr": 0.01})).where.endswith(":grid.lr")
    assert _error(tmp_path, minimal_sweep(base=[1, 2])).where.endswith(":base")
    assert _error(tmp_path, minimal_sweep(name="a/b")).where.endswith(":name")
    assert _error(tmp_path, minimal_sweep(configs=[])).where.endswith(":configs")


def test_empty_grid_axis(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(grid={"lr": [0.01, 0.003], "augment.mirror": []}))
    assert err.where.endswith(":grid.augment.mirror") and "empty" in err.message


def test_no_variants_at_all(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(grid=None))
    assert "grid" in err.message


def test_duplicate_values_on_an_axis(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(grid={"lr": [0.01, 1e-2]}))
    assert err.where.endswith(":grid.lr") and "same setting" in err.message


def test_named_variant_duplicating_a_grid_point(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(variants={"slow": {"lr": 0.003}}))
    assert err.where.endswith(":variants.slow") and "lr=0.003" in err.message
    err = _error(tmp_path, minimal_sweep(variants={"also_default": {"lr": 0.01}}))
    assert err.where.endswith(":variants.also_default") and "baseline" in err.message


def test_seed_is_not_an_override(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(base={"seed": 3}))
    assert err.where.endswith(":base.seed") and "seeds" in err.message


@pytest.mark.parametrize("key,problem", [
    ("plan.3d_fullres.patchsize", "patch_size"),
    ("plan.2d.batch_size", "configs"),
    ("plan.3d_fullres.data_identifier", "cannot be overridden"),
    ("plan.3d_fullres", "plan.<config>.<field>"),
])
def test_bad_plan_keys(tmp_path: Path, key: str, problem: str) -> None:
    err = _error(tmp_path, minimal_sweep(variants={"p": {key: 2}}))
    assert err.where.endswith(f":variants.p.{key}") and problem in err.message


def test_plan_value_type(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(variants={"p": {"plan.3d_fullres.patch_size": "big"}}))
    assert err.where.endswith(":variants.p.plan.3d_fullres.patch_size") and "expected" in err.message


def test_unknown_dataset_needs_paths(tmp_path: Path, paths: Paths) -> None:
    (paths.raw / "Dataset004_Hippocampus").mkdir(parents=True)
    ok = load_sweep(write_sweep(tmp_path, minimal_sweep(datasets=[4])), paths)
    assert ok.datasets == ("Dataset004_Hippocampus",)
    err = _error(tmp_path, minimal_sweep(datasets=["Dataset005_Prostate"]), paths)
    assert err.where.endswith(":datasets") and "Dataset005_Prostate" in err.message
    err = _error(tmp_path, minimal_sweep(datasets=[7]), paths)
    assert err.where.endswith(":datasets")


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="mapping"):
        parse_sweep(["a", "b"], "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- helpers and the record


@pytest.mark.parametrize("value,text", [(True, "true"), (False, "false"), (None, "none"), (0.003, "0.003"),
                                        (3e-5, "3e-05"), (12, "12"), ([48, 64, 48], "48,64,48"), ("dice", "dice")])
def test_format_value(value: object, text: str) -> None:
    assert format_value(value) == text


def test_name_value_and_safe_name() -> None:
    assert name_value([48, 64, 48]) == "48x64x48"
    assert safe_name("a b/c:d") == "a_b_c_d"
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    short = safe_name(long)
    assert len(short) <= MAX_VARIANT_NAME_CHARS and short == safe_name(long)
    assert short != safe_name(long + "x")


def test_record_is_written_and_guards_changed_meaning(tmp_path: Path, paths: Paths) -> None:
    spec = load_sweep(write_sweep(tmp_path, minimal_sweep()))
    recorded = record_sweep(spec, paths)
    back = load_record(sweep_record_file(paths, "toy"), SweepSpec)
    assert back == recorded and back.started
    grown = load_sweep(write_sweep(tmp_path, minimal_sweep(folds=[0, 1, 2], grid={"lr": [0.01, 0.003, 0.001]}), "b.yaml"))
    assert record_sweep(grown, paths).started == recorded.started  # adding is fine
    changed = load_sweep(write_sweep(tmp_path, minimal_sweep(base={"epochs": 5}), "c.yaml"))
    with pytest.raises(ConfigError, match="new name"):
        record_sweep(changed, paths)


def test_variant_folders_are_safe_for_the_trainer(tmp_path: Path) -> None:
    from autoseg.common.paths import FOLDER_NAME_RE

    spec = load_sweep(write_sweep(tmp_path, minimal_sweep(variants={"tiny+lr": {"lr": 1e-20}})))
    runs = [v.run_name(spec.name) for v in spec.variants]
    assert "toy.lr-0.003__augment.mirror-false" in runs and "toy.tiny_lr" in runs
    assert all(FOLDER_NAME_RE.fullmatch(r) for r in runs)
    assert spec.variant("tiny+lr").trainer_overrides == ("lr=1e-20",)


def test_variants_sharing_a_folder_are_refused(tmp_path: Path) -> None:
    err = _error(tmp_path, minimal_sweep(variants={"lr-0.003": {"lr": 0.005}}))
    assert err.where.endswith(":variants.lr-0.003") and "folder" in err.message


# --------------------------------------------------------------------------- YAML's own spellings


def _yaml_file(tmp_path: Path, body: str) -> Path:
    file = tmp_path / "typed.yaml"
    file.write_text("name: typed\ndatasets: [Dataset004_Hippocampus]\nconfigs: [3d_fullres]\n" + body)
    return file


def test_yaml_booleans_numbers_and_on_off_words_are_accepted(tmp_path: Path) -> None:
    """``compile: false`` and ``amp: off`` are YAML booleans, ``1e-3`` is a YAML 1.2 float (PyYAML: a string)."""
    file = _yaml_file(tmp_path, "base: {compile: false, deep_supervision: 0}\n"
                                "grid:\n  amp: [auto, off]\n  lr: [1e-3, 0.01]\n  augment.mirror: [on, no]\n")
    spec = load_sweep(file)
    names = {v.name for v in spec.variants}
    assert "amp=off,lr=0.001,augment.mirror=false" in names
    assert spec.base_trainer_overrides == ("compile=false", "deep_supervision=0")
    off = spec.variant("amp=off,lr=0.001,augment.mirror=false")
    from autoseg.train.config import TrainerConfig, apply_overrides
    cfg = apply_overrides(TrainerConfig(), spec.trainer_overrides(off))
    assert (cfg.compile, cfg.amp, cfg.lr, cfg.augment.mirror, cfg.deep_supervision) == ("false", "off", 0.001,
                                                                                       False, False)


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    file = _yaml_file(tmp_path, "folds: [0, -1]\nbase: {epoch: 3}\n"
                                "grid:\n  lr: [fast, 0.01]\n  augment.mirrror: [true]\n"
                                "variants:\n  x: {optimizer: adam}\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(file)
    lines = str(info.value).splitlines()
    keys = [line.split(": ")[0] for line in lines]
    assert keys == [f"{file}:{k}" for k in ("folds", "base.epoch", "grid.lr", "grid.augment.mirrror",
                                            "variants.x.optimizer")]
    assert info.value.where == f"{file}:folds"  # the first, for callers that read one error
