"""Batch loaders: shapes/dtypes, deep-supervision targets vs. the net, oversampling, seeds, workers."""

from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path

import pytest
import torch

from autoseg.common.errors import AutosegError
from autoseg.data.augment import AugmentConfig
from autoseg.data.loader import LoaderSpec, make_train_loader, make_val_loader
from autoseg.nets.unet import build_unet
from tests.data.conftest import CONFIG_2D, CONFIG_3D, CONFIG_3D_ANISO

torch.set_num_threads(1)


def _spec(cases: tuple[Path, tuple[str, ...]], **changes: object) -> LoaderSpec:
    folder, ids = cases
    spec = LoaderSpec(data_dir=folder, case_ids=ids + ("tiny",), config=CONFIG_3D, augment=AugmentConfig(),
                      batch_size=3, num_workers=0, seed=0, deep_supervision=True)
    return dataclasses.replace(spec, **changes)


def _take(loader_batches: object, n: int) -> list[dict]:
    return [next(loader_batches) for _ in range(n)]  # type: ignore[call-overload]


@pytest.mark.parametrize("config", [CONFIG_3D, CONFIG_3D_ANISO, CONFIG_2D], ids=["3d", "3d_aniso", "2d"])
def test_train_batches_fit_the_network(preprocessed_cases: tuple[Path, tuple[str, ...]], config) -> None:
    augment = AugmentConfig(p_rotation=1.0, p_scaling=1.0)  # exercise the spatial path every time
    with make_train_loader(_spec(preprocessed_cases, config=config, augment=augment)) as loader:
        batch = next(loader)
    data, target = batch["data"], batch["target"]
    assert data.dtype == torch.float32 and data.shape == (3, 2) + config.patch_size
    net = build_unet(config, in_channels=2, num_classes=3)
    with torch.no_grad():
        outputs = net(data)
    assert isinstance(target, list) and len(target) == len(outputs)
    for t, o in zip(target, outputs):
        assert t.dtype == torch.int64 and t.shape == (3, 1) + tuple(o.shape[2:])
        assert set(torch.unique(t).tolist()) <= {0, 1, 2}


def test_without_deep_supervision_the_target_is_one_tensor(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    with make_val_loader(_spec(preprocessed_cases, deep_supervision=False, config=CONFIG_2D)) as loader:
        batch = next(loader)
    assert isinstance(batch["target"], torch.Tensor) and batch["target"].shape == (3, 1) + CONFIG_2D.patch_size


def test_forced_third_holds_foreground(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    spec = _spec(preprocessed_cases, batch_size=6, deep_supervision=False)
    with make_val_loader(spec) as val, make_train_loader(dataclasses.replace(spec, augment=AugmentConfig.disabled())) \
            as train:
        for loader in (val, train):
            batches = _take(loader, 5)
            forced = [bool(b["target"][i].max() > 0) for b in batches for i in (4, 5)]
            free = [bool(b["target"][i].max() > 0) for b in batches for i in range(4)]
            assert all(forced)
            assert not all(free)  # the tiny corner boxes are rarely hit by uniform patches


def test_same_seed_same_batches_in_process_and_with_workers(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    spec = _spec(preprocessed_cases, augment=AugmentConfig(p_rotation=0.5, p_noise=0.5))
    runs = {}
    for workers in (0, 2):
        for repeat in range(2):
            with make_train_loader(dataclasses.replace(spec, num_workers=workers)) as loader:
                runs[workers, repeat] = _take(loader, 4)
    for workers in (0, 2):
        for a, b in zip(runs[workers, 0], runs[workers, 1]):
            torch.testing.assert_close(a["data"], b["data"], rtol=0, atol=0)
            for ta, tb in zip(a["target"], b["target"]):
                assert torch.equal(ta, tb)
    # worker 0 of the pool makes batches 0 and 2: the same stream as the in-process loader
    torch.testing.assert_close(runs[2, 0][0]["data"], runs[0, 0][0]["data"], rtol=0, atol=0)
    torch.testing.assert_close(runs[2, 0][2]["data"], runs[0, 0][1]["data"], rtol=0, atol=0)
    with make_train_loader(dataclasses.replace(spec, seed=1)) as other:
        assert not torch.equal(next(other)["data"], runs[0, 0][0]["data"])


def test_close_stops_every_worker(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    before = set(multiprocessing.active_children())
    loader = make_train_loader(_spec(preprocessed_cases, num_workers=2))
    next(loader)
    assert len(set(multiprocessing.active_children()) - before) == 2
    loader.close()
    loader.close()  # idempotent
    assert set(multiprocessing.active_children()) - before == set()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_bad_specs_are_user_errors(preprocessed_cases: tuple[Path, tuple[str, ...]], tmp_path: Path) -> None:
    with pytest.raises(AutosegError, match="preprocessed file missing") as e:
        make_train_loader(_spec(preprocessed_cases, case_ids=("case_a", "ghost")))
    assert e.value.where is not None and e.value.where.endswith("ghost.npy")
    with pytest.raises(AutosegError, match="not found"):
        make_val_loader(_spec(preprocessed_cases, data_dir=tmp_path / "nowhere"))
    with pytest.raises(AutosegError, match="no cases"):
        make_train_loader(_spec(preprocessed_cases, case_ids=()))
    with pytest.raises(AutosegError) as e:
        make_train_loader(_spec(preprocessed_cases, batch_size=0))
    assert e.value.where == "batch_size"


def test_batches_are_finite(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    with make_train_loader(_spec(preprocessed_cases, augment=AugmentConfig(p_rotation=1.0, p_gamma=1.0))) as loader:
        assert all(bool(torch.isfinite(b["data"]).all()) for b in _take(loader, 3))


def test_a_failing_worker_becomes_a_user_error(preprocessed_cases: tuple[Path, tuple[str, ...]],
                                               tmp_path: Path) -> None:
    folder, ids = preprocessed_cases
    for f in folder.glob("case_a*"):
        (tmp_path / f.name).symlink_to(f)
    loader = make_train_loader(_spec((tmp_path, ("case_a",)), case_ids=("case_a",), num_workers=1))
    (tmp_path / "case_a.npy").unlink()  # workers start on the first batch, after this
    with pytest.raises(AutosegError, match="worker process") as e:
        next(loader)
    assert e.value.where == str(tmp_path)
    loader.close()
