"""TrainerConfig defaults, `--set` parsing and the saved record."""

from __future__ import annotations

import pytest

from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import load_record, save_record
from autoseg.train.config import TrainerConfig, apply_overrides, default_num_workers


def test_defaults_are_nnunets() -> None:
    cfg = TrainerConfig()
    assert (cfg.epochs, cfg.iterations_per_epoch, cfg.val_iterations) == (1000, 250, 50)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip) == (0.01, 0.99, 3e-5, 12.0)
    assert (cfg.optimizer, cfg.lr_schedule, cfg.loss, cfg.oversample_foreground) == ("sgd", "poly", "dice_ce", 0.33)
    assert cfg.batch_size is None and cfg.deep_supervision and cfg.augment.mirror
    assert cfg.head_init == "prior"  # the one deliberate deviation: nnU-Net's is "he" (docs/parity.md)


def test_overrides_parse_by_type() -> None:
    cfg = apply_overrides(TrainerConfig(), [
        "epochs=50", "lr=5e-3", "deep_supervision=no", "batch_size=4", "optimizer=adamw",
        "augment.mirror=false", "augment.scale_range=0.8,1.2", "augment.p_noise=0"])
    assert cfg.epochs == 50 and isinstance(cfg.epochs, int)
    assert cfg.lr == 0.005 and cfg.deep_supervision is False and cfg.batch_size == 4
    assert cfg.optimizer == "adamw"
    assert cfg.augment.mirror is False and cfg.augment.scale_range == (0.8, 1.2)
    assert cfg.augment.p_noise == 0.0
    assert apply_overrides(cfg, ["batch_size=none"]).batch_size is None
    assert apply_overrides(cfg, ["deep_supervision=1"]).deep_supervision is True


@pytest.mark.parametrize("item, where, fragment", [
    ("lrr=0.1", "lrr", "did you mean 'lr'"),
    ("augment.mirorr=false", "augment.mirorr", "augment.mirror"),
    ("epochs=ten", "epochs", "expected an integer"),
    ("amp=maybe", "amp", "must be one of"),
    ("deep_supervision=perhaps", "deep_supervision", "true/false"),
    ("augment.scale_range=1,2,3", "augment.scale_range", "expected 2"),
    ("epochs", "epochs", "KEY=VALUE"),
    ("epochs=0", "epochs", "must be >= 1"),
    ("head_init=zero", "head_init", "must be one of"),
])
def test_bad_overrides_name_the_key(item: str, where: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainerConfig(), [item])
    assert info.value.where == where
    assert fragment in info.value.message


def test_record_round_trip_and_flat_dict(tmp_path) -> None:
    cfg = apply_overrides(TrainerConfig(), ["epochs=7", "augment.gamma=false"])
    save_record(tmp_path / "trainer_config.json", cfg)
    assert load_record(tmp_path / "trainer_config.json", TrainerConfig) == cfg
    flat = cfg.flat_dict()
    assert flat["epochs"] == 7 and flat["augment.gamma"] is False and "augment" not in flat


def test_default_workers_share_the_cpus() -> None:
    assert default_num_workers(2) == 1
    assert default_num_workers(64) == 12
    assert default_num_workers(16, processes=4) == 3
    assert default_num_workers(1) == 0


@pytest.mark.parametrize("item, key, value", [
    ("compile=no", "compile", "false"), ("compile=on", "compile", "true"), ("compile=0", "compile", "false"),
    ("amp=off", "amp", "off"), ("amp=false", "amp", "off"), ("amp=yes", "amp", "auto"), ("amp=bf16", "amp", "bf16"),
    ("deep_supervision=off", "deep_supervision", False), ("augment.mirror=on", "augment.mirror", True),
])
def test_on_off_knobs_take_every_on_off_word(item: str, key: str, value: object) -> None:
    cfg = apply_overrides(TrainerConfig(), [item])
    assert cfg.flat_dict()[key] == value


def test_on_off_modes_from_python_booleans() -> None:
    """What YAML hands over for ``compile: false`` / ``amp: off``."""
    cfg = TrainerConfig(compile=False, amp=False)  # type: ignore[arg-type]
    assert (cfg.compile, cfg.amp) == ("false", "off")


def test_final_validation_modes() -> None:
    assert TrainerConfig().final_validation == "full"
    assert apply_overrides(TrainerConfig(), ["final_validation=off"]).final_validation == "off"
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainerConfig(), ["final_validation=quick"])
    assert info.value.where == "final_validation" and "no_mirroring" in info.value.message


def test_changed_keys_lists_only_what_was_asked_for() -> None:
    from autoseg.train.config import changed_keys, format_changes

    used = apply_overrides(TrainerConfig(), ["epochs=2", "lr=0.003"])
    assert changed_keys(TrainerConfig(), used) == []  # nothing given: nothing to report
    given = apply_overrides(TrainerConfig(), ["epochs=4", "lr=0.003", "num_workers=3"])
    changes = changed_keys(given, used, ignore=("num_workers",))
    assert changes == [("epochs", 2, 4)] and format_changes(changes) == "epochs 2 -> 4"
